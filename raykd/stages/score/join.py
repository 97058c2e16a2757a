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
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raykd import storage
from raykd.errors import UserError
from raykd.formats import scores as fmt
from raykd.stages.score.plan import partition_unique, triples_uri

STATS_KEY = b"raykd.score.stats"
PAIR_SCORES = "pair_scores"  # the folder of unique pair scores in a score output


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


def pair_score_table(pair_scores: pa.Table, names: list[str], weights: list[float]) -> pa.Table:
    """A part's unique (qid, pid) pairs with the ensemble's ``score`` and each teacher's ``score__<t>``
    (float32), sorted by (qid, pid): :mod:`raykd.formats.pair_scores`, so groups of any size drawn from these
    pairs train without scoring again. A pair that a teacher scored NaN/inf is left out (its triples are
    refused or quarantined by :func:`join_part`)."""
    per = {n: pair_scores[f"score__{n}"].to_numpy(zero_copy_only=False).astype(np.float32) for n in names}
    ok = np.logical_and.reduce([np.isfinite(v) for v in per.values()])
    qid = pair_scores["qid"].to_numpy()[ok]
    pid = pair_scores["pid"].to_numpy()[ok]
    order = np.lexsort((pid, qid))
    cols = {"qid": qid[order].astype(np.int64), "pid": pid[order].astype(np.int64),
            "score": fmt.ensemble([per[n][ok][order] for n in names], weights)}
    cols.update({f"score__{n}": per[n][ok][order] for n in names})
    return pa.table(cols)


def join_part(out: str, names: list[str], weights: list[float], lenient: bool, p: int,
              pair_scores: pa.Table, write_pair_scores: bool = True) -> dict:
    """Task body (module docstring): join part ``p``'s pair scores to its triples, check them, write the part
    (atomically) and return its statistics (also stored in the part's footer)."""
    part_uri = storage.join(out, "parts", fmt.part_name(p))
    if storage.exists(part_uri):  # a retried task whose first attempt committed: a part is written once
        return part_stats(part_uri)
    triples = storage.read_parquet(triples_uri(out, p))
    mine = pair_scores
    t = triples
    for side in ("pos", "neg"):
        right = mine.select(["qid", "pid"] + [f"score__{n}" for n in names]).rename_columns(
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
    n_nan = int(nan.sum())
    if n_nan:
        i = int(np.flatnonzero(nan)[0])
        who = [n for n in names if not (np.isfinite(teacher_scores[n][0][i]) and np.isfinite(teacher_scores[n][1][i]))]
        key = (t["qid"][i].as_py(), t["pos_pid"][i].as_py(), t["neg_pid"][i].as_py())
        if not lenient:
            raise UserError(
                f"teacher(s) {', '.join(who)} gave a NaN/inf score for triple {key} (triples row "
                f"{t['row'][i].as_py()}); {n_nan} triple(s) in part {p} are affected. Pass --lenient to quarantine them."
            )
        q = t.filter(pa.array(nan)).select(["qid", "pos_pid", "neg_pid", "row"])
        q = q.append_column("reason", pa.array([f"non-finite score ({', '.join(who)}…)"] * q.num_rows))
        storage.write_parquet_atomic(q.cast(fmt.QUARANTINE_SCHEMA),
                                     storage.join(out, "quarantine", f"nan-{fmt.part_name(p)}"))
        t = t.filter(pa.array(~nan))
        teacher_scores = {n: (s[0][~nan], s[1][~nan]) for n, s in teacher_scores.items()}
    table = fmt.make_table(t["qid"].to_numpy(), t["pos_pid"].to_numpy(), t["neg_pid"].to_numpy(),
                           teacher_scores, weights)
    stats = {
        "triples": table.num_rows,
        "quarantined_nan": n_nan,
        "unique_pairs": mine.num_rows,
        "forward_passes": {n: int(mine.num_rows) for n in names},
        "real_tokens": {n: int(pc.sum(mine[f"len__{n}"]).as_py() or 0) for n in names},
        "padded_tokens": {n: int(pc.sum(mine[f"padlen__{n}"]).as_py() or 0) for n in names},
    }
    if write_pair_scores:
        pairs = pair_score_table(mine, names, weights)
        storage.write_parquet_atomic(pairs, storage.join(out, PAIR_SCORES, fmt.part_name(p)))
        stats["pair_scores"] = pairs.num_rows
    table = table.replace_schema_metadata({STATS_KEY: json.dumps(stats).encode()})
    storage.write_parquet_atomic(table, part_uri)
    return stats


def part_stats(uri: str) -> dict:
    """The work statistics :func:`join_part` put in a committed part's footer."""
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as f:
        meta = pq.read_schema(f).metadata or {}
    if STATS_KEY not in meta:
        raise RuntimeError(f"{uri}: part without raykd statistics; was it written by another tool?")
    return json.loads(meta[STATS_KEY])
