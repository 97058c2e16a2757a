"""The ``score`` stage: teacher-ensemble scores for every training triple, on Ray Data actor pools, exactly once.

Input: a text store (``raykd prepare``) with triples. Output: a ``raykd.triple_scores`` v1 folder (see
:mod:`raykd.formats.scores`). How it works (docs/score.md has the long version):

1. **Plan** (driver, once). The triples are split into ``n_parts`` output parts by a hash of the qid, so a
   query's triples, and therefore all of its (qid, pid) pairs, live in one part. Triples whose qid or pid is
   unknown are quarantined (lenient) or fail the run (strict); duplicate triples are dropped and counted. Each
   part's triples go to ``_work/triples/part-NNNNN.parquet`` (sorted by qid, pos_pid, neg_pid), then
   ``_work/plan.json`` commits the plan. A re-run reuses a plan made with the same result-affecting config
   and refuses a different one.
2. **Rounds** over the parts not yet committed (``parts_per_round`` at a time): the unique (qid, pid) pairs of
   the round's triples become a Ray Dataset of ``bucket_pairs``-row blocks ->
   CPU tasks attach the query and passage texts from the shared object store (the corpus is put there once as
   pid-sorted Arrow blocks, read zero-copy; no actor holds a private copy) ->
   per teacher: CPU tasks tokenise with that teacher's tokenizer -> an actor pool (``min_actors``..
   ``max_actors``, ``gpus_per_actor`` GPUs each) that only runs the model, sorting each block by length and
   cutting it into ``batch_size`` forward passes so padding stays small.
3. **Join back** (driver, per part): pair scores -> pos/neg score per teacher per triple -> weighted-mean
   ensemble and margin -> NaN rows quarantined (lenient) or fail (strict) -> the part is written atomically,
   with its work statistics in the Parquet footer. A committed part is never recomputed.
4. **Finish**: statistics are summed over the parts' footers (so a resumed run reports the same numbers as an
   uninterrupted one), the per-teacher score distribution summary and histogram go to ``analysis/``, and
   ``manifest.json`` commits the output.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raykd import config, finished, storage
from raykd.errors import UserError
from raykd.formats import scores as fmt
from raykd.formats.store import TextStore, passage_text
from raykd.log import get_logger
from raykd.runtime import init_ray

STATS_KEY = b"raykd.score.stats"
KILL_HOOK_ENV = "RAYKD_TEST_KILL_SCORER"  # "N:MARKER": the first teacher's actor SIGKILLs itself after N blocks
_HASH = np.uint64(0x9E3779B97F4A7C15)


@dataclass
class ScoreConfig:
    """Options of ``raykd score``."""

    SECTION = "score"

    data: str = config.field("", help="Text store URI (the output of `raykd prepare`), with triples.")
    teachers: list[str] = config.field([], help="Teacher cross-encoders (BERT_CAT) by hub name or path.",
                                       flag="--teacher")
    out: str = config.field("", help="Output URI of the scores (local path or s3://).", fingerprint=False)
    weights: list[float] = config.field([], help="Ensemble weight per teacher, in order (unset: equal weights, the mean).",
                                         flag="--weight")
    query_max_length: int = config.field(30, help="Query tokens kept per pair (the paper: 30).")
    passage_max_length: int = config.field(200, help="Passage tokens kept per pair (the paper: 200).")
    split: str = config.field("train", help="Query split of the store that the triples' qids belong to.")
    batch_size: int = config.field(64, help="Pairs per forward pass.", fingerprint=False)
    bucket_pairs: int = config.field(2048, help="Pairs per Ray Data block; each is sorted by length in the actor.", fingerprint=False)
    rows_per_part: int = config.field(100_000, help="Target triples per output part (parts are split by qid).")
    parts_per_round: int = config.field(16, help="Output parts scored per Ray Data round (memory bound).", fingerprint=False)
    min_actors: int = config.field(1, help="Minimum actors per teacher pool.", fingerprint=False)
    max_actors: int = config.field(2, help="Maximum actors per teacher pool (the autoscaler may add GPU nodes).", fingerprint=False)
    gpus_per_actor: float = config.field(0.0, help="GPUs per scoring actor (1 on a GPU cluster).", fingerprint=False)
    cpus_per_actor: float = config.field(0.5, help="CPUs per scoring actor (fractional on small machines).", fingerprint=False)
    actor_resources: dict = config.field(
        {}, help="Custom Ray resources per scoring actor, e.g. teacher_gpu=1 to land only on GPU worker nodes.",
        fingerprint=False,
    )
    cpus_per_task: float = config.field(0.25, help="CPUs per text-lookup / tokenising task.", fingerprint=False)
    torch_threads: int = config.field(1, help="torch threads per scoring actor (CPU only).", fingerprint=False)
    lenient: bool = config.field(False, help="Quarantine bad rows (unknown ids, NaN scores) instead of failing.",
                                 flag="--lenient/--strict")
    histogram_bins: int = config.field(60, help="Bins of the per-teacher score histogram.")
    overwrite: bool = config.field(
        False, help="Replace an existing output made with other settings instead of refusing.", fingerprint=False
    )


log = get_logger("score")
_log = log.info  # the stage's events, in raykd's one console format


# ---------------------------------------------------------------------------------------------------------
# planning


def part_of(qid: np.ndarray, n_parts: int) -> np.ndarray:
    """Deterministic output part of each qid (a multiplicative hash, the same on every run and machine)."""
    h = (np.asarray(qid, dtype=np.int64).view(np.uint64) * _HASH) >> np.uint64(17)
    return (h % np.uint64(n_parts)).astype(np.int64)


def _quarantine(out: str, name: str, table: pa.Table) -> None:
    storage.write_parquet_atomic(table.cast(fmt.QUARANTINE_SCHEMA), storage.join(out, "quarantine", name))


def _plan(cfg: ScoreConfig, store: TextStore) -> dict:
    """Split the triples into parts by qid, check their ids, write the work parts, then ``plan.json``."""
    t0 = time.time()
    if not store.has_triples() or not storage.parquet_parts(store.triples_uri):
        raise UserError(
            f"{store.triples_uri}: the store has no training triples (0 rows); `raykd score` needs them "
            "(prepare the store from a folder with qidpidtriples/triples files, or pass --triples)"
        )
    triples = storage.read_parquet(store.triples_uri, columns=list(fmt.KEY_COLUMNS))
    n_in = triples.num_rows
    if n_in == 0:
        raise UserError(f"{store.triples_uri}: the triples file is empty (0 rows); nothing to score")
    qid = triples["qid"].to_numpy()
    pos = triples["pos_pid"].to_numpy()
    neg = triples["neg_pid"].to_numpy()
    row = np.arange(n_in, dtype=np.int64)

    known_q = np.sort(store.queries(cfg.split)["qid"].to_numpy())
    known_p = np.sort(storage.read_parquet(store.corpus_uri, columns=["pid"])["pid"].to_numpy())
    bad_q = ~np.isin(qid, known_q)
    bad_pos = ~np.isin(pos, known_p)
    bad_neg = ~np.isin(neg, known_p)
    bad = bad_q | bad_pos | bad_neg
    n_bad = int(bad.sum())
    if n_bad:
        i = int(np.flatnonzero(bad)[0])
        what = (
            f"qid {qid[i]} is not in the store's `{cfg.split}` queries" if bad_q[i]
            else f"pos_pid {pos[i]} is not in the corpus" if bad_pos[i]
            else f"neg_pid {neg[i]} is not in the corpus"
        )
        if not cfg.lenient:
            raise UserError(
                f"{store.triples_uri}, row {i} (triple {qid[i]}, {pos[i]}, {neg[i]}): {what}; "
                f"{n_bad} triple(s) have unknown ids. Fix the input or pass --lenient to quarantine them."
            )
        reasons = np.where(bad_q, "unknown qid", np.where(bad_pos, "unknown pos_pid", "unknown neg_pid"))
        _quarantine(
            cfg.out,
            "unknown-ids.parquet",
            pa.table({"qid": qid[bad], "pos_pid": pos[bad], "neg_pid": neg[bad], "row": row[bad],
                      "reason": reasons[bad]}),
        )
        _log(f"quarantined {n_bad} triple(s) with unknown ids (first: row {i}, {what})")
        keep = ~bad
        qid, pos, neg, row = qid[keep], pos[keep], neg[keep], row[keep]

    # deterministic order: by (part, qid, pos_pid, neg_pid, input row); duplicates keep their first row
    n_parts = max(1, -(-len(qid) // max(1, cfg.rows_per_part)))
    part = part_of(qid, n_parts)
    order = np.lexsort((row, neg, pos, qid, part))
    part, qid, pos, neg, row = part[order], qid[order], pos[order], neg[order], row[order]
    first = np.ones(len(qid), dtype=bool)
    first[1:] = (qid[1:] != qid[:-1]) | (pos[1:] != pos[:-1]) | (neg[1:] != neg[:-1])
    n_dup = int((~first).sum())
    part, qid, pos, neg, row = part[first], qid[first], pos[first], neg[first], row[first]
    if len(qid) == 0:
        raise UserError(f"{store.triples_uri}: no triple left to score after quarantining {n_bad} bad one(s)")

    bounds = np.searchsorted(part, np.arange(n_parts + 1))
    parts = []
    for p in range(n_parts):
        a, b = int(bounds[p]), int(bounds[p + 1])
        if a == b:
            continue
        t = pa.table({"qid": qid[a:b], "pos_pid": pos[a:b], "neg_pid": neg[a:b], "row": row[a:b]})
        storage.write_parquet_atomic(t, storage.join(cfg.out, "_work", "triples", fmt.part_name(p)))
        parts.append(p)
    plan = {
        "n_parts": n_parts,
        "parts": parts,
        "triples_in": n_in,
        "triples": int(len(qid)),
        "duplicate_triples": n_dup,
        "quarantined_unknown_ids": n_bad,
        "plan_s": round(time.time() - t0, 3),
    }
    storage.write_bytes_atomic(storage.join(cfg.out, "_work", "plan.json"), json.dumps(plan, indent=2).encode())
    _log(f"plan: {n_in} triples in, {len(qid)} to score ({n_dup} duplicates, {n_bad} unknown ids) "
         f"in {len(parts)} part(s)")
    return plan


# ---------------------------------------------------------------------------------------------------------
# Ray Data pieces (module level so that Ray can pickle them by reference)


def attach_texts(batch: pa.Table, corpus_refs: list, queries_ref: Any) -> pa.Table:
    """Add ``query`` and ``passage`` texts to (qid, pid) rows from the shared, pid-sorted object-store blocks."""
    import ray

    pids = batch["pid"].to_numpy()
    passages = np.empty(len(pids), dtype=object)
    found = np.zeros(len(pids), dtype=bool)
    for block in ray.get(list(corpus_refs)):
        keys = block["pid"].to_numpy()
        if len(keys) == 0:
            continue
        pos = np.searchsorted(keys, pids)
        pos_c = np.minimum(pos, len(keys) - 1)
        hit = (keys[pos_c] == pids) & ~found
        if hit.any():
            passages[hit] = block["passage"].take(pa.array(pos_c[hit])).to_numpy(zero_copy_only=False)
            found |= hit
    if not found.all():
        raise KeyError(f"pid {int(pids[~found][0])} is not in the corpus")  # the plan checked: an internal bug
    queries = ray.get(queries_ref)
    qkeys = queries["qid"].to_numpy()
    qpos = np.searchsorted(qkeys, batch["qid"].to_numpy())
    qtext = queries["text"].take(pa.array(qpos))
    return batch.append_column("query", qtext).append_column("passage", pa.array(list(passages), pa.string()))


def sorted_corpus_block(batch: pa.Table) -> pa.Table:
    """One corpus block as (pid, passage) sorted by pid; passage = ``title + " " + text`` as in BEIR."""
    t = pa.table({"pid": batch["pid"], "passage": passage_text(batch["title"], batch["text"])})
    return t.sort_by("pid")


class TokenizePairs:
    """CPU task body: one teacher's tokenizer over (query, passage) -> ``ids__<t>`` and ``types__<t>``."""

    def __init__(self, teacher: str, path: str, query_max_length: int, passage_max_length: int):
        from raykd.models.cross_encoder import CrossEncoderTokenizer

        self.teacher = teacher
        self.tok = CrossEncoderTokenizer.from_pretrained(path, query_max_length, passage_max_length)

    def __call__(self, batch: pa.Table) -> pa.Table:
        enc = self.tok.tokenize_unpadded(
            batch["query"].to_pylist(), batch["passage"].to_pylist()
        )
        ids = pa.array(enc["input_ids"], pa.list_(pa.int32()))
        types = enc.get("token_type_ids") or [[] for _ in enc["input_ids"]]
        return batch.append_column(f"ids__{self.teacher}", ids).append_column(
            f"types__{self.teacher}", pa.array(types, pa.list_(pa.int8()))
        )


def tokenize_pairs(batch: pa.Table, teacher: str, path: str, query_max_length: int, passage_max_length: int) -> pa.Table:
    return _tokenizer(teacher, path, query_max_length, passage_max_length)(batch)


_TOKENIZERS: dict = {}


def _tokenizer(teacher: str, path: str, qlen: int, plen: int) -> TokenizePairs:
    key = (teacher, path, qlen, plen)
    if key not in _TOKENIZERS:  # a task worker process is reused: load each tokenizer once per process
        _TOKENIZERS[key] = TokenizePairs(teacher, path, qlen, plen)
    return _TOKENIZERS[key]


class TeacherScorer:
    """Actor body: loads one teacher and only runs it through :func:`raykd.batching.score_block` (each block
    sorted by length and cut into forward passes of ``batch_size`` pairs); outputs ``score__<t>``,
    ``len__<t>`` (real tokens) and ``padlen__<t>`` (the padded length of the pair's forward pass)."""

    def __init__(self, teacher: str, path: str, query_max_length: int, passage_max_length: int,
                 batch_size: int, torch_threads: int = 1, kill_hook: str | None = None):
        import torch

        from raykd.models.cross_encoder import CrossEncoder

        if not torch.cuda.is_available():
            torch.set_num_threads(max(1, torch_threads))
        self.teacher, self.batch_size = teacher, batch_size
        self.model = CrossEncoder.from_pretrained(path, query_max_length, passage_max_length)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.to(self.device).eval()
        self.kill_hook, self.blocks = kill_hook, 0

    def __call__(self, batch: pa.Table) -> pa.Table:
        from raykd.batching import score_block

        t = self.teacher
        out = score_block(self.model, batch[f"ids__{t}"], batch[f"types__{t}"], batch_size=self.batch_size,
                          pad_id=self.model.tokenizer.pad_token_id or 0, device=self.device)
        self.blocks += 1
        self._maybe_die()
        keep = [c for c in batch.column_names if c not in (f"ids__{t}", f"types__{t}")]
        return (batch.select(keep).append_column(f"score__{t}", pa.array(out.scores))
                .append_column(f"len__{t}", pa.array(out.lengths))
                .append_column(f"padlen__{t}", pa.array(out.padded_lengths)))

    def _maybe_die(self) -> None:
        """Test hook: a real SIGKILL of this actor process, once (a marker file remembers it happened)."""
        if not self.kill_hook:
            return
        after, marker = self.kill_hook.split(":", 1)
        if self.blocks >= int(after) and not os.path.exists(marker):
            with open(marker, "w") as f:
                f.write(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)


# ---------------------------------------------------------------------------------------------------------
# the stage


def _resolve_weights(cfg: ScoreConfig) -> list[float]:
    if not cfg.weights:
        return [1.0] * len(cfg.teachers)
    w = [float(x) for x in cfg.weights]
    if len(w) != len(cfg.teachers):
        raise UserError(f"got {len(w)} weight(s) for {len(cfg.teachers)} teacher(s); give one --weight per --teacher")
    if any(x < 0 for x in w) or sum(w) <= 0:
        raise UserError(f"ensemble weights must be >= 0 with a positive sum, got {w}")
    return w


def _check_teachers(cfg: ScoreConfig) -> None:
    """Fail before any Ray work if a teacher cannot be loaded (e.g. a path that does not exist)."""
    from raykd.models.cross_encoder import CrossEncoderTokenizer

    for t in cfg.teachers:
        CrossEncoderTokenizer.from_pretrained(t, cfg.query_max_length, cfg.passage_max_length)


def _init_ray() -> None:

    init_ray()


def _shared_texts(store: TextStore, split: str) -> tuple[list, Any]:
    """Put the corpus (pid-sorted Arrow blocks, via Ray Data) and the split's queries in the object store."""
    import ray
    import ray.data

    pfs, _ = storage.arrow_filesystem(store.corpus_uri)
    paths = [storage.arrow_filesystem(u)[1] for u in store.corpus_parts()]
    corpus = ray.data.read_parquet(paths, filesystem=pfs, columns=["pid", "title", "text"])
    corpus_refs = corpus.map_batches(sorted_corpus_block, batch_format="pyarrow", batch_size=None).to_arrow_refs()
    q = store.queries(split).select(["qid", "text"]).sort_by("qid")
    return corpus_refs, ray.put(q)


def _score_round(cfg, names, paths, pairs: pa.Table, corpus_refs, queries_ref, kill_hook) -> pa.Table:
    """Scores of every teacher for ``pairs`` (qid, pid) through the Ray Data pipeline."""
    import ray.data

    n_blocks = max(1, -(-pairs.num_rows // cfg.bucket_pairs))
    blocks = [pairs.slice(i * cfg.bucket_pairs, cfg.bucket_pairs) for i in range(n_blocks)]
    ds = ray.data.from_arrow(blocks)
    ds = ds.map_batches(
        attach_texts,
        batch_format="pyarrow",
        batch_size=None,
        fn_kwargs={"corpus_refs": corpus_refs, "queries_ref": queries_ref},
        num_cpus=cfg.cpus_per_task,
    )
    for i, (name, path) in enumerate(zip(names, paths)):
        ds = ds.map_batches(
            tokenize_pairs,
            batch_format="pyarrow",
            batch_size=None,
            fn_kwargs={"teacher": name, "path": path, "query_max_length": cfg.query_max_length,
                       "passage_max_length": cfg.passage_max_length},
            num_cpus=cfg.cpus_per_task,
        )
        remote: dict[str, Any] = {"num_gpus": cfg.gpus_per_actor} if cfg.gpus_per_actor else {}
        if cfg.actor_resources:
            remote["resources"] = dict(cfg.actor_resources)
        ds = ds.map_batches(
            TeacherScorer,
            batch_format="pyarrow",
            # blocks hold bucket_pairs pairs; Ray Data needs an explicit batch size for GPU actors
            batch_size=cfg.bucket_pairs,
            fn_constructor_kwargs={
                "teacher": name, "path": path, "query_max_length": cfg.query_max_length,
                "passage_max_length": cfg.passage_max_length, "batch_size": cfg.batch_size,
                "torch_threads": cfg.torch_threads, "kill_hook": kill_hook if i == 0 else None,
            },
            compute=ray.data.ActorPoolStrategy(min_size=cfg.min_actors, max_size=max(cfg.min_actors, cfg.max_actors)),
            num_cpus=cfg.cpus_per_actor,
            **remote,
        )
    keep = ["qid", "pid"] + [f"{k}__{n}" for n in names for k in ("score", "len", "padlen")]
    ds = ds.select_columns(keep)
    out = [b for b in ds.iter_batches(batch_format="pyarrow", batch_size=None)]
    table = pa.concat_tables(out) if out else None
    if table is None or table.num_rows == 0:
        raise RuntimeError("the scoring pipeline returned no rows")
    # a retried block must not count twice: keep one row per pair
    uniq = table.group_by(["qid", "pid"]).aggregate([])
    if uniq.num_rows != table.num_rows:
        _log(f"dropping {table.num_rows - uniq.num_rows} repeated pair row(s) from retried blocks")
        table = table.sort_by([("qid", "ascending"), ("pid", "ascending")])
        q, p = table["qid"].to_numpy(), table["pid"].to_numpy()
        first = np.ones(len(q), dtype=bool)
        first[1:] = (q[1:] != q[:-1]) | (p[1:] != p[:-1])
        table = table.filter(pa.array(first))
    if table.num_rows != pairs.num_rows:
        raise RuntimeError(f"scored {table.num_rows} pairs, expected {pairs.num_rows}: rows were lost")
    return table


def _unique_pairs(triples: pa.Table) -> pa.Table:
    a = pa.table({"qid": triples["qid"], "pid": triples["pos_pid"]})
    b = pa.table({"qid": triples["qid"], "pid": triples["neg_pid"]})
    return pa.concat_tables([a, b]).group_by(["qid", "pid"]).aggregate([])


def _write_part(cfg, names, weights, p: int, triples: pa.Table, pair_scores: pa.Table) -> dict:
    """Join pair scores back to one part's triples, check NaNs, write the part (atomically) and return its
    statistics (also stored in the part's footer)."""
    pairs = _unique_pairs(triples)
    mine = pair_scores.join(pairs, keys=["qid", "pid"], join_type="inner")
    cols = {n: mine.select(["qid", "pid", f"score__{n}"]) for n in names}
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
        if not cfg.lenient:
            raise UserError(
                f"teacher(s) {', '.join(who)} gave a NaN/inf score for triple {key} (triples row "
                f"{t['row'][i].as_py()}); {n_nan} triple(s) in part {p} are affected. Pass --lenient to quarantine them."
            )
        q = t.filter(pa.array(nan)).select(["qid", "pos_pid", "neg_pid", "row"])
        q = q.append_column("reason", pa.array([f"non-finite score ({', '.join(who)}…)"] * q.num_rows))
        _quarantine(cfg.out, f"nan-{fmt.part_name(p)}", q)
        keep = pa.array(~nan)
        t = t.filter(keep)
        teacher_scores = {n: (s[0][~nan], s[1][~nan]) for n, s in teacher_scores.items()}
    table = fmt.make_table(t["qid"].to_numpy(), t["pos_pid"].to_numpy(), t["neg_pid"].to_numpy(),
                           teacher_scores, weights)
    stats = {
        "triples": table.num_rows,
        "quarantined_nan": n_nan,
        "unique_pairs": pairs.num_rows,
        "forward_passes": {n: int(cols[n].num_rows) for n in names},
        "real_tokens": {n: int(pc.sum(mine[f"len__{n}"]).as_py() or 0) for n in names},
        "padded_tokens": {n: int(pc.sum(mine[f"padlen__{n}"]).as_py() or 0) for n in names},
    }
    table = table.replace_schema_metadata({STATS_KEY: json.dumps(stats).encode()})
    storage.write_parquet_atomic(table, storage.join(cfg.out, "parts", fmt.part_name(p)))
    return stats


def _part_stats(uri: str) -> dict:
    fs, path = storage.filesystem(uri)
    with fs.open(path, "rb") as f:
        meta = pq.read_schema(f).metadata or {}
    if STATS_KEY not in meta:
        raise RuntimeError(f"{uri}: part without raykd statistics; was it written by another tool?")
    return json.loads(meta[STATS_KEY])


def summarize(values: np.ndarray) -> dict:
    """Distribution summary of scores (the paper's analysis of teacher output ranges)."""
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return {"count": 0}
    q = np.percentile(v, [1, 5, 25, 50, 75, 95, 99])
    return {
        "count": int(len(v)), "mean": float(v.mean()), "std": float(v.std()), "min": float(v.min()),
        "max": float(v.max()), **{f"p{k}": float(x) for k, x in zip((1, 5, 25, 50, 75, 95, 99), q)},
    }


def _analysis(cfg: ScoreConfig, names: list[str], part_uris: list[str]) -> dict:
    """Per-teacher (and ensemble) score summaries, and a histogram PNG, into ``analysis/``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = ["pos_score", "neg_score", "margin"] + [fmt.teacher_column(s, n) for n in names for s in ("pos", "neg")]
    t = pa.concat_tables([storage.read_parquet(u, columns=cols) for u in part_uris])
    summary: dict = {}
    series = [(n, fmt.teacher_column("pos", n), fmt.teacher_column("neg", n)) for n in names]
    series.append(("ensemble", "pos_score", "neg_score"))
    fig, axes = plt.subplots(1, len(series), figsize=(4.2 * len(series), 3.2), squeeze=False)
    for ax, (n, pc_, nc_) in zip(axes[0], series):
        ps = t[pc_].to_numpy(zero_copy_only=False)
        ns = t[nc_].to_numpy(zero_copy_only=False)
        summary[n] = {"pos": summarize(ps), "neg": summarize(ns), "all": summarize(np.concatenate([ps, ns])),
                      "margin": summarize(ps - ns)}
        lo, hi = float(min(ps.min(), ns.min())), float(max(ps.max(), ns.max()))
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, cfg.histogram_bins + 1)
        ax.hist(ps, bins=bins, alpha=0.6, label="positive")
        ax.hist(ns, bins=bins, alpha=0.6, label="negative")
        ax.set_title(n)
        ax.set_xlabel("score")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("pairs in triples")
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    storage.write_bytes_atomic(storage.join(cfg.out, "analysis", "teacher_scores.png"), buf.getvalue())
    storage.write_bytes_atomic(
        storage.join(cfg.out, "analysis", "teacher_scores.json"), json.dumps(summary, indent=2).encode()
    )
    return summary


def score(cfg: ScoreConfig) -> storage.Manifest:
    """Run (or resume) the score stage; returns the manifest. See the module docstring."""
    t_start = time.time()
    if not cfg.data or not cfg.out:
        raise UserError("score needs --data (a text store) and --out (where to write the scores)")
    # actors get these as strings and do not share the driver's working directory
    cfg = dataclasses.replace(cfg, data=storage.absolute(cfg.data), out=storage.absolute(cfg.out),
                              teachers=[storage.absolute_model(t) for t in cfg.teachers])
    if not cfg.teachers:
        raise UserError("score needs at least one --teacher (a cross-encoder hub name or path)")
    if cfg.batch_size < 1 or cfg.bucket_pairs < 1 or cfg.rows_per_part < 1 or cfg.parts_per_round < 1:
        raise UserError("batch_size, bucket_pairs, rows_per_part and parts_per_round must be >= 1")
    store = TextStore(cfg.data)
    weights = _resolve_weights(cfg)
    names = fmt.teacher_names(cfg.teachers)
    _check_teachers(cfg)
    claim = finished.claim(cfg.out, "score", finished.fingerprint(
        cfg, weights=weights, **{"data.created_at": finished.input_identity(cfg.data),
                                 "teachers.created_at": [finished.input_identity(t) for t in cfg.teachers]}),
        cfg.overwrite)
    if claim.finished:
        _log(f"{cfg.out} is already complete; nothing to do")
        return claim.manifest

    plan_uri = storage.join(cfg.out, "_work", "plan.json")
    plan = json.loads(storage.read_bytes(plan_uri)) if storage.exists(plan_uri) else None
    if plan is None:
        plan = _plan(cfg, store)
    else:
        _log(f"resuming: plan with {len(plan['parts'])} part(s) found")

    committed = set(storage.listdir(storage.join(cfg.out, "parts")))
    pending = [p for p in plan["parts"] if fmt.part_name(p) not in committed]
    _log(f"{len(plan['parts']) - len(pending)} part(s) already committed, {len(pending)} to score "
         f"with teachers {', '.join(names)}")
    t_score = time.time()
    if pending:
        _init_ray()
        corpus_refs, queries_ref = _shared_texts(store, cfg.split)
        kill_hook = os.environ.get(KILL_HOOK_ENV) or None
        paths = [str(t) for t in cfg.teachers]
        done = len(plan["parts"]) - len(pending)
        for r in range(0, len(pending), cfg.parts_per_round):
            round_parts = pending[r : r + cfg.parts_per_round]
            t0 = time.time()
            triples = {p: storage.read_parquet(storage.join(cfg.out, "_work", "triples", fmt.part_name(p)))
                       for p in round_parts}
            pairs = pa.concat_tables([_unique_pairs(t) for t in triples.values()])
            pair_scores = _score_round(cfg, names, paths, pairs, corpus_refs, queries_ref, kill_hook)
            for p in round_parts:
                _write_part(cfg, names, weights, p, triples[p], pair_scores)
            done += len(round_parts)
            dt = time.time() - t0
            _log(f"parts {done}/{len(plan['parts'])} committed; round: {pairs.num_rows} pairs x {len(names)} "
                 f"teacher(s) in {dt:.1f}s ({pairs.num_rows * len(names) / max(dt, 1e-9):.0f} forward pairs/s)")
    scoring_s = time.time() - t_score

    part_names = [fmt.part_name(p) for p in plan["parts"]]
    part_uris = [storage.join(cfg.out, "parts", n) for n in part_names]
    per_part = [_part_stats(u) for u in part_uris]
    n_triples = sum(s["triples"] for s in per_part)
    fwd = {n: sum(s["forward_passes"][n] for s in per_part) for n in names}
    real = {n: sum(s["real_tokens"][n] for s in per_part) for n in names}
    padded = {n: sum(s["padded_tokens"][n] for s in per_part) for n in names}
    quarantined_nan = sum(s["quarantined_nan"] for s in per_part)
    summary = _analysis(cfg, names, part_uris)
    stats = {
        "teachers": names,
        "teacher_paths": [str(t) for t in cfg.teachers],
        "weights": weights,
        "forward_passes": fwd,
        "forward_passes_total": sum(fwd.values()),
        "naive_forward_passes": 2 * (n_triples + quarantined_nan) * len(names),
        "unique_pairs": sum(s["unique_pairs"] for s in per_part),
        "real_tokens": real,
        "padded_tokens": padded,
        "padded_over_real": sum(padded.values()) / max(1, sum(real.values())),
        "score_summary": summary,
    }
    counts = {
        "triples": n_triples,
        "triples_in": plan["triples_in"],
        "duplicate_triples": plan["duplicate_triples"],
        "quarantined": {"unknown_ids": plan["quarantined_unknown_ids"], "nan_scores": quarantined_nan},
        "quarantined_total": plan["quarantined_unknown_ids"] + quarantined_nan,
        "parts": len(part_names),
    }
    m = storage.write_manifest(
        cfg.out,
        "score",
        format=fmt.FORMAT,
        format_version=fmt.VERSION,
        config=storage.redact(dataclasses.asdict(cfg)),
        inputs={"data": storage.redact(str(cfg.data)), "teachers": [str(t) for t in cfg.teachers]},
        counts=counts,
        stats=stats,
        parts=[f"parts/{n}" for n in part_names],
        timings={"plan_s": plan.get("plan_s"), "scoring_s": round(scoring_s, 3),
                 "total_s": round(time.time() - t_start, 3)},
        fingerprint=claim.fingerprint,
    )
    _log(f"done: {n_triples} triples, {stats['forward_passes_total']} forward passes "
         f"(naive {stats['naive_forward_passes']}), padded/real tokens {stats['padded_over_real']:.3f}")
    return m


# ---------------------------------------------------------------------------------------------------------
# NRKD compatibility (Hofstätter et al.'s published teacher-score files)


@dataclass
class ImportNrkdConfig:
    """Options of ``raykd import-nrkd``."""

    SECTION = "import_nrkd"

    nrkd: str = config.field("", help="NRKD tsv (pos_score, neg_score, qid, pos_pid, neg_pid), .gz ok.")
    out: str = config.field("", help="Output URI of the scores (raykd.triple_scores).", fingerprint=False)
    teacher_name: str = config.field("t2", help="Name of the (ensemble) teacher the file's scores came from.")
    rows_per_part: int = config.field(100_000, help="Target triples per output part (parts are split by qid).")
    overwrite: bool = config.field(
        False, help="Replace an existing output made with other settings instead of refusing.", fingerprint=False
    )


@dataclass
class ExportNrkdConfig:
    """Options of ``raykd export-nrkd`` (see ``export_nrkd``)."""

    SECTION = "export_nrkd"

    scores: str = config.field("", help="A scores output (of `raykd score` or `raykd import-nrkd`).")
    out: str = config.field("", help="NRKD tsv to write (.gz compresses).")
    teacher: str | None = config.field(None, help="Write this teacher's scores instead of the ensemble's.")


def import_nrkd(cfg: ImportNrkdConfig) -> storage.Manifest:
    """Turn an NRKD file into a scores output that training reads like a ``score`` output. Duplicate triples
    keep their first line's scores and are counted. Holds the file's numbers in memory (~33 bytes/triple)."""
    from raykd.formats import nrkd

    t0 = time.time()
    if not cfg.nrkd or not cfg.out:
        raise UserError("import-nrkd needs --nrkd FILE and --out URI")
    name = fmt.teacher_names([cfg.teacher_name])[0]
    claim = finished.claim(cfg.out, "import-nrkd", finished.fingerprint(cfg), cfg.overwrite)
    if claim.finished:
        _log(f"{cfg.out} is already complete; nothing to do")
        return claim.manifest
    batches = []
    for i, b in enumerate(nrkd.iter_batches(cfg.nrkd)):
        batches.append(b)
        if i % 50 == 49:
            _log(f"read {sum(x.num_rows for x in batches)} lines of {cfg.nrkd}")
    if not batches:
        raise UserError(f"{cfg.nrkd}: the NRKD file is empty (0 triples)")
    t = pa.Table.from_batches(batches)
    n_in = t.num_rows
    qid, pos, neg = (t[c].to_numpy() for c in fmt.KEY_COLUMNS)
    ps, ns = t["pos_score"].to_numpy(), t["neg_score"].to_numpy()
    n_parts = max(1, -(-n_in // max(1, cfg.rows_per_part)))
    part = part_of(qid, n_parts)
    order = np.lexsort((np.arange(n_in), neg, pos, qid, part))
    part, qid, pos, neg, ps, ns = part[order], qid[order], pos[order], neg[order], ps[order], ns[order]
    first = np.ones(n_in, dtype=bool)
    first[1:] = (qid[1:] != qid[:-1]) | (pos[1:] != pos[:-1]) | (neg[1:] != neg[:-1])
    part, qid, pos, neg, ps, ns = part[first], qid[first], pos[first], neg[first], ps[first], ns[first]
    bounds = np.searchsorted(part, np.arange(n_parts + 1))
    names = []
    for p in range(n_parts):
        a, b = int(bounds[p]), int(bounds[p + 1])
        if a == b:
            continue
        table = fmt.make_table(qid[a:b], pos[a:b], neg[a:b], {name: (ps[a:b], ns[a:b])}, [1.0])
        storage.write_parquet_atomic(table, storage.join(cfg.out, "parts", fmt.part_name(p)))
        names.append(fmt.part_name(p))
    summary = {name: {"pos": summarize(ps), "neg": summarize(ns), "margin": summarize(ps - ns)}}
    m = storage.write_manifest(
        cfg.out,
        "import-nrkd",
        format=fmt.FORMAT,
        format_version=fmt.VERSION,
        config=storage.redact(dataclasses.asdict(cfg)),
        inputs={"nrkd": storage.redact(str(cfg.nrkd))},
        counts={"triples": int(len(qid)), "triples_in": n_in, "duplicate_triples": int(n_in - len(qid)),
                "parts": len(names)},
        stats={"teachers": [name], "weights": [1.0], "score_summary": summary},
        parts=[f"parts/{n}" for n in names],
        timings={"total_s": round(time.time() - t0, 3)},
        fingerprint=claim.fingerprint,
    )
    _log(f"imported {len(qid)} triples ({n_in - len(qid)} duplicates dropped) into {len(names)} part(s)")
    return m


def export_nrkd(scores_uri: str, out_file: str, teacher: str | None = None) -> int:
    """Write a scores output as an NRKD tsv (the ensemble's scores, or one ``teacher``'s); returns the lines."""
    from raykd.formats import nrkd

    s = fmt.TripleScores(scores_uri)
    if teacher is not None and teacher not in s.teachers:
        raise UserError(f"{scores_uri}: no teacher {teacher!r}; it has {', '.join(s.teachers)}")
    pos_col = fmt.teacher_column("pos", teacher) if teacher else "pos_score"
    neg_col = fmt.teacher_column("neg", teacher) if teacher else "neg_score"

    def batches():
        for b in s.iter_batches(["qid", "pos_pid", "neg_pid", pos_col, neg_col]):
            t = pa.Table.from_batches([b])
            yield t.rename_columns(["qid", "pos_pid", "neg_pid", "pos_score", "neg_score"])

    n = nrkd.write(out_file, batches())
    _log(f"wrote {n} lines to {storage.redact(out_file)}")
    return n
