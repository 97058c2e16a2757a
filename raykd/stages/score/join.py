"""Join: pair scores back to one part's triples, in a Ray task per part, as soon as the part's pairs are scored.

The driver reads the pipeline's stream and gathers each pending part's pair rows (:class:`PartGather`); a
repeated row (a block retried after its actor died) is dropped. When a part holds every one of its unique
pairs, the driver submits :func:`join_part` for it and goes on reading; the task reads the part's planned
triples, attaches pos/neg score per teacher, computes the weighted-mean ensemble and margin, quarantines
(lenient) or refuses (strict) non-finite scores, writes the part's unique pair scores
(``pair_scores/part-NNNNN.parquet``, :func:`pair_score_table`) and then commits the part with one atomic write.
Its work statistics go in the part's Parquet footer, so the manifest sums them over parts whichever run wrote
them. A part's pair scores are written before the part, so a committed part always has them.
Because the qid hash put all pairs of a query in one part, each part's join is independent of the others.

A normalised ensemble (``normalization`` zscore or minmax) needs every teacher's statistics over all the run's
pairs before any part's ensemble can be computed, so its join has two passes: :func:`stage_part` (as each part
completes) checks the part's scores (strict mode refuses a NaN here, early) and keeps its raw pair scores with
their :class:`~raykd.ensemble.ScoreStats` per teacher in the footer (``_work/raw_pairs/part-NNNNN.parquet``);
once every part has them, the driver merges the statistics (:func:`run_stats`, in plan order, so a resumed run
gets the same floats) and :func:`join_part` commits each part from its raw pair scores with them.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raykd import storage
from raykd.ensemble import ScoreStats
from raykd.errors import UserError
from raykd.formats import scores as fmt
from raykd.stages.score.plan import partition_unique, triples_uri

STATS_KEY = b"raykd.score.stats"
PAIR_SCORES = "pair_scores"  # the folder of unique pair scores in a score output
RAW_PAIRS = "raw_pairs"  # _work/raw_pairs/: a normalised run's scored pairs, before the join


def raw_pairs_uri(out: str, p: int) -> str:
    return storage.join(out, "_work", RAW_PAIRS, fmt.part_name(p))


class PartGather:
    """The driver's per-part collection of streamed pair scores: ``add(batch)`` returns the parts it
    completed, each as one table of its unique pairs' rows."""

    def __init__(self, expected: dict[int, int]):
        self.expected = dict(expected)
        self.rows: dict[int, list[pa.Table]] = {p: [] for p in expected}
        self.count = dict.fromkeys(expected, 0)
        self.done: set[int] = set()

    def add(self, batch: pa.Table) -> list[tuple[int, pa.Table]]:
        if batch.num_rows == 0:
            return []
        complete = []
        for p in pc.unique(batch["part"]).to_pylist():
            if p in self.done:
                continue  # a retried block of a part already handed to its join
            mine = batch.filter(pc.equal(batch["part"], p))
            self.rows[p].append(mine)
            self.count[p] += mine.num_rows
            if self.count[p] >= self.expected[p]:
                table = _first_per_pair(pa.concat_tables(self.rows[p]))
                self.rows[p], self.count[p] = [table], table.num_rows
                if table.num_rows == self.expected[p]:
                    complete.append((p, table))
                    self.done.add(p)
                    del self.rows[p]
        return complete

    def missing(self) -> dict[int, int]:
        """Pairs still missing per part that has not completed."""
        return {p: self.expected[p] - self.count[p] for p in self.expected if p not in self.done}


def _first_per_pair(t: pa.Table) -> pa.Table:
    index, _ = partition_unique([t["qid"].to_numpy(), t["pid"].to_numpy()])
    return t.take(pa.array(index))


def _finite_pairs(pair_scores: pa.Table, names: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Each teacher's float32 pair scores, and which pairs every teacher scored finite."""
    per = {n: pair_scores[f"score__{n}"].to_numpy(zero_copy_only=False).astype(np.float32) for n in names}
    return per, np.logical_and.reduce([np.isfinite(v) for v in per.values()])


def teacher_stats(pair_scores: pa.Table, names: list[str]) -> dict[str, dict]:
    """Each teacher's :class:`~raykd.ensemble.ScoreStats` (as a dict) over a part's unique pairs that every
    teacher scored finite: the pairs :func:`pair_score_table` keeps."""
    per, ok = _finite_pairs(pair_scores, names)
    return {n: ScoreStats.of(per[n][ok]).to_dict() for n in names}


def run_stats(per_part: list[dict], names: list[str]) -> dict[str, ScoreStats]:
    """The run's statistics per teacher: the parts' ``score_stats`` merged in the order given."""
    out = {n: ScoreStats() for n in names}
    for s in per_part:
        for n in names:
            out[n] = out[n].merge(ScoreStats.from_dict(s["score_stats"][n]))
    return out


def pair_score_table(pair_scores: pa.Table, names: list[str], weights: list[float], normalization: str = "none",
                     stats: dict[str, ScoreStats] | None = None) -> pa.Table:
    """A part's unique (qid, pid) pairs with the ensemble's ``score`` and each teacher's ``score__<t>``
    (float32, raw), sorted by (qid, pid): :mod:`raykd.formats.pair_scores`, so groups of any size drawn from these
    pairs train without scoring again. A pair that a teacher scored NaN/inf is left out (its triples are
    refused or quarantined by :func:`join_part`)."""
    per, ok = _finite_pairs(pair_scores, names)
    qid = pair_scores["qid"].to_numpy()[ok]
    pid = pair_scores["pid"].to_numpy()[ok]
    order = np.lexsort((pid, qid))
    cols = {"qid": qid[order].astype(np.int64), "pid": pid[order].astype(np.int64),
            "score": fmt.normalized_ensemble({n: per[n][ok][order] for n in names}, weights, normalization, stats)}
    cols.update({f"score__{n}": per[n][ok][order] for n in names})
    return pa.table(cols)


def _joined(out: str, names: list[str], p: int, pair_scores: pa.Table):
    """Part ``p``'s triples with pos/neg scores per teacher: (table, {teacher: (pos, neg)}, non-finite mask)."""
    t = storage.read_parquet(triples_uri(out, p))
    for side in ("pos", "neg"):
        right = pair_scores.select(["qid", "pid"] + [f"score__{n}" for n in names]).rename_columns(
            ["qid", f"{side}_pid"] + [f"{side}__{n}" for n in names]
        )
        t = t.join(right, keys=["qid", f"{side}_pid"], join_type="left outer")
    t = t.sort_by([("qid", "ascending"), ("pos_pid", "ascending"), ("neg_pid", "ascending")])
    teacher_scores = {}
    nan = np.zeros(t.num_rows, dtype=bool)
    for n in names:
        ps = t[f"pos__{n}"].to_numpy(zero_copy_only=False).astype(np.float32)
        ns = t[f"neg__{n}"].to_numpy(zero_copy_only=False).astype(np.float32)
        teacher_scores[n] = (ps, ns)
        nan |= ~np.isfinite(ps) | ~np.isfinite(ns)
    return t, teacher_scores, nan


def _nan_teachers(teacher_scores: dict, i: int) -> list[str]:
    return [n for n, (ps, ns) in teacher_scores.items() if not (np.isfinite(ps[i]) and np.isfinite(ns[i]))]


def _refuse_nan(t: pa.Table, teacher_scores: dict, nan: np.ndarray, p: int) -> None:
    """Strict mode: a non-finite score fails the run, naming the teacher and the first affected triple."""
    if not nan.any():
        return
    i = int(np.flatnonzero(nan)[0])
    key = (t["qid"][i].as_py(), t["pos_pid"][i].as_py(), t["neg_pid"][i].as_py())
    raise UserError(
        f"teacher(s) {', '.join(_nan_teachers(teacher_scores, i))} gave a NaN/inf score for triple {key} (triples "
        f"row {t['row'][i].as_py()}); {int(nan.sum())} triple(s) in part {p} are affected. Pass --lenient to "
        f"quarantine them."
    )


def stage_part(out: str, names: list[str], lenient: bool, p: int, pair_scores: pa.Table) -> dict:
    """Task body, first pass of a normalised run (module docstring): refuse non-finite scores (strict), then
    keep part ``p``'s raw pair scores, their statistics per teacher in the footer; returns those statistics."""
    uri = raw_pairs_uri(out, p)
    if storage.exists(uri):  # a retried task whose first attempt wrote it
        return part_stats(uri)
    if not lenient:
        _refuse_nan(*_joined(out, names, p, pair_scores), p)
    stats = {"unique_pairs": pair_scores.num_rows, "score_stats": teacher_stats(pair_scores, names)}
    storage.write_parquet_atomic(pair_scores.replace_schema_metadata({STATS_KEY: json.dumps(stats).encode()}), uri)
    return stats


def join_part(out: str, names: list[str], weights: list[float], lenient: bool, p: int,
              pair_scores: pa.Table | None, write_pair_scores: bool = True, normalization: str = "none",
              stats: dict[str, dict] | None = None) -> dict:
    """Task body (module docstring): join part ``p``'s pair scores (None: its raw pair scores kept by
    :func:`stage_part`) to its triples, check them, write the part (atomically) and return its statistics
    (also stored in the part's footer). ``stats``: the run's statistics per teacher (ScoreStats dicts), which
    a ``normalization`` other than ``none`` puts each teacher's scores on the ensemble's scale with."""
    part_uri = storage.join(out, "parts", fmt.part_name(p))
    if storage.exists(part_uri):  # a retried task whose first attempt committed: a part is written once
        return part_stats(part_uri)
    mine = storage.read_parquet(raw_pairs_uri(out, p)) if pair_scores is None else pair_scores
    run = {n: ScoreStats.from_dict(s) for n, s in stats.items()} if stats else None
    t, teacher_scores, nan = _joined(out, names, p, mine)
    n_nan = int(nan.sum())
    if n_nan:
        if not lenient:
            _refuse_nan(t, teacher_scores, nan, p)
        who = _nan_teachers(teacher_scores, int(np.flatnonzero(nan)[0]))
        q = t.filter(pa.array(nan)).select(["qid", "pos_pid", "neg_pid", "row"])
        q = q.append_column("reason", pa.array([f"non-finite score ({', '.join(who)}…)"] * q.num_rows))
        storage.write_parquet_atomic(q.cast(fmt.QUARANTINE_SCHEMA),
                                     storage.join(out, "quarantine", f"nan-{fmt.part_name(p)}"))
        t = t.filter(pa.array(~nan))
        teacher_scores = {n: (s[0][~nan], s[1][~nan]) for n, s in teacher_scores.items()}
    table = fmt.make_table(t["qid"].to_numpy(), t["pos_pid"].to_numpy(), t["neg_pid"].to_numpy(),
                           teacher_scores, weights, normalization, run)
    stats = {
        "triples": table.num_rows,
        "quarantined_nan": n_nan,
        "unique_pairs": mine.num_rows,
        "forward_passes": {n: int(mine.num_rows) for n in names},
        "real_tokens": {n: int(pc.sum(mine[f"len__{n}"]).as_py() or 0) for n in names},
        "padded_tokens": {n: int(pc.sum(mine[f"padlen__{n}"]).as_py() or 0) for n in names},
        "score_stats": teacher_stats(mine, names),
    }
    if write_pair_scores:
        pairs = pair_score_table(mine, names, weights, normalization, run)
        storage.write_parquet_atomic(pairs, storage.join(out, PAIR_SCORES, fmt.part_name(p)))
        stats["pair_scores"] = pairs.num_rows
    table = table.replace_schema_metadata({STATS_KEY: json.dumps(stats).encode()})
    storage.write_parquet_atomic(table, part_uri)
    return stats


def part_stats(uri: str) -> dict:
    """The work statistics :func:`join_part` (or :func:`stage_part`) put in a part's footer."""
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as f:
        meta = pq.read_schema(f).metadata or {}
    if STATS_KEY not in meta:
        raise RuntimeError(f"{uri}: part without raykd statistics; was it written by another tool?")
    return json.loads(meta[STATS_KEY])
