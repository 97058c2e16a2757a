"""mine: hard negatives from a run and qrels -> id triples and n-way groups (format ``raykd.mined_triples`` v1).

For every query of ``split`` that the run ranks: its judged positives (qrels relevance >= 1, in the corpus),
and as negatives the run's candidates at ranks ``skip + 1 .. depth`` that the qrels do not judge at all, of
which ``negatives`` are sampled per positive (seeded). With teacher pair ``scores``, a candidate the teacher
scores within ``margin`` of the positive (``t_neg > t_pos - margin``) or, with ``relative_margin``, above
``t_pos * (1 - relative_margin)`` is dropped as a likely false negative first, as sentence-transformers'
``mine_hard_negatives`` does with ``absolute_margin`` / ``relative_margin``. Any run works: BM25, dense, a
student's (re-mining, TCT-ColBERT v2's HN+ and ANCE), a re-ranked run (whose own scores can be the teacher's:
``scores: run``).

Steps (ColBERT's indexer style: each step's files, in the order written)::

    plan   one Ray task: the run -> integer ids (Arrow joins with the store's queries and corpus ids), ranked
           in trec_eval's order, cut at ``depth``, sorted by qid and split into contiguous qid ranges of
           ``queries_per_task`` queries: _plan/run-NNNNN.parquet, then _plan/plan.json
    mine   one Ray task per qid range (numpy and Arrow joins, no per-passage Python):
           triples/part-NNNNN.parquet, groups/part-NNNNN.parquet, then _parts/part-NNNNN.json (its counts:
           the part's commit point)
    commit the plan's run parts are deleted, then manifest.json

Output (a named set ``<store>/mined/<name>`` when ``out`` is a bare name, else the folder ``out``)::

    triples/part-NNNNN.parquet   qid int64, pos_pid int64, neg_pid int64        (prepare's triples schema)
    groups/part-NNNNN.parquet    qid int64, pos_pid int64, neg_pids list<int64>  (1 positive + k negatives)
    manifest.json                stage "mine"; counts (queries without positives, queries with fewer than
                                 ``negatives`` negatives, dropped false negatives, ...); written last

Sampling is a seeded hash of (seed, qid, pid), so it is the same whatever the partitioning; a group lists its
negatives in run order (hardest first). A killed run re-run with the same ``out`` skips committed parts
(:mod:`raykd.finished`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raykd import finished, storage
from raykd.config import field
from raykd.errors import FormatError, UserError
from raykd.formats.pair_scores import read_pair_scores
from raykd.formats.store import (
    GROUPS_SCHEMA,
    MINED_FORMAT,
    MINED_VERSION,
    TRIPLES_SCHEMA,
    TextStore,
    is_set_name,
)
from raykd.log import Progress, get_logger
from raykd.runs import run_table

log = get_logger("mine")
RUN_SCORES = "run"  # ``scores: run``: the run's own scores are the teacher's


@dataclass
class MineConfig:
    SECTION = "mine"

    data: str | None = field(None, help="Text store URI (queries and qrels of --split, the corpus ids).")
    run: str | None = field(None, help="Run to mine: a TREC file or a search output URI (BM25, dense, a "
                                       "student's, a re-ranked run).")
    split: str = field("train", help="Query split of the store whose qrels give the positives.")
    out: str | None = field(None, help="A bare name (e.g. bm25-hn): a named triples set in the store, "
                                       "<data>/mined/NAME; or an output URI.", fingerprint=False)
    depth: int = field(200, help="Candidates: the run's top DEPTH per query.")
    skip: int = field(0, help="Leave out the run's first SKIP ranks (likely unjudged positives).")
    negatives: int = field(8, help="Negatives sampled per (query, positive) from the candidates left.")
    seed: int = field(42, help="Seed of the negative sampling.")
    scores: str | None = field(None, help="Teacher pair scores for the false-negative filter: a `raykd score` "
                                          "output (its pair_scores/), or Parquet (file or folder) of qid int64, "
                                          "pid int64, score float32; or `run` for the "
                                          "run's own scores. Unset: no filter.")
    margin: float = field(0.0, help="Filter: drop a negative whose teacher score > positive's - MARGIN.")
    relative_margin: float | None = field(None, help="Filter: also drop a negative whose teacher score > "
                                                     "positive's * (1 - RELATIVE_MARGIN).")
    unscored: str = field("drop", help="Filter: a candidate or positive the scores do not cover is dropped "
                                       "(counted) or kept unchecked.", choices=["drop", "keep"])
    group_size: int = field(0, help="Negatives per group (k of 1+k); the sampled negatives of a positive are "
                                    "cut into groups of k. 0: one group of all of them.")
    queries_per_task: int = field(10_000, help="Queries per Ray task (contiguous qid ranges).")
    cpus_per_task: float = field(0.5, help="Logical CPUs per Ray task.", fingerprint=False)
    plan_memory_gb: float = field(0.0, help="Memory (GiB) the plan task asks Ray for (0: no reservation); "
                                            "a 400K-query x 200 run needs a few GiB.", fingerprint=False)
    overwrite: bool = field(False, help="Replace an existing output made with other settings instead of refusing.",
                            fingerprint=False)


def output_uri(cfg: MineConfig) -> str:
    """Where ``cfg`` writes: ``<data>/mined/<out>`` for a bare name, else ``out`` itself."""
    if is_set_name(cfg.out) and "/" not in cfg.out:
        return storage.join(str(cfg.data).rstrip("/"), "mined", cfg.out)
    return str(cfg.out)


def _check(cfg: MineConfig) -> None:
    if not cfg.data or not cfg.run or not cfg.out:
        raise UserError("mine needs --data (a text store), --run (a TREC file or search output) and --out")
    if cfg.depth < 1 or cfg.skip < 0 or cfg.skip >= cfg.depth:
        raise UserError(f"need depth >= 1 and 0 <= skip < depth, got depth {cfg.depth}, skip {cfg.skip}")
    if cfg.negatives < 1 or cfg.group_size < 0 or cfg.queries_per_task < 1:
        raise UserError("negatives and queries_per_task must be >= 1, group_size >= 0")
    if cfg.margin < 0 or (cfg.relative_margin is not None and not 0 <= cfg.relative_margin < 1):
        raise UserError(f"need margin >= 0 and 0 <= relative_margin < 1, got {cfg.margin}, {cfg.relative_margin}")
    if cfg.scores and cfg.scores != RUN_SCORES and not storage.exists(cfg.scores):
        raise UserError(f"teacher scores {cfg.scores} do not exist (a Parquet of qid, pid, score, or `run`)")


# ------------------------------------------------------------------------------------------------ plan
def _run_ids(cfg: MineConfig) -> pa.Table:
    """The run as ``qid, pid, rank, score`` in trec_eval's order (score descending, ties by docno descending),
    top ``depth`` per query; unknown queries or documents and repeated documents are errors."""
    store = TextStore(cfg.data)
    t = run_table(cfg.run)
    queries = store.queries(cfg.split).select(["query_id", "qid"])
    t = t.join(queries, "query_id", join_type="left outer")
    if t["qid"].null_count:
        bad = t.filter(pc.is_null(t["qid"]))["query_id"][0].as_py()
        raise FormatError(cfg.run, None, f"query {bad} is not in split {cfg.split!r} of {store.uri}")
    t = t.join(store.corpus(columns=["doc_id", "pid"]), "doc_id", join_type="left outer")
    if t["pid"].null_count:
        bad = t.filter(pc.is_null(t["pid"]))["doc_id"][0].as_py()
        raise FormatError(cfg.run, None, f"document {bad} is not in the corpus of {store.uri}")
    t = t.sort_by([("qid", "ascending"), ("score", "descending"), ("doc_id", "descending")])
    qid, pid = t["qid"].to_numpy(), t["pid"].to_numpy()
    start = _group_starts(qid)
    rank = np.arange(len(qid)) - np.repeat(start, np.diff(np.append(start, len(qid)))) + 1
    order = np.lexsort((pid, qid))
    same = (qid[order][1:] == qid[order][:-1]) & (pid[order][1:] == pid[order][:-1])
    if same.any():
        i = order[1:][same][0]
        raise FormatError(cfg.run, None, f"document {t['doc_id'][int(i)]} appears twice for query "
                                         f"{t['query_id'][int(i)]}")
    keep = rank <= cfg.depth
    return pa.table({"qid": qid[keep], "pid": pid[keep], "rank": rank[keep].astype(np.int32),
                     "score": t["score"].to_numpy()[keep]})


def _group_starts(sorted_keys: np.ndarray) -> np.ndarray:
    """Row positions where a new key starts in an array sorted by key."""
    if len(sorted_keys) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.concatenate([[True], sorted_keys[1:] != sorted_keys[:-1]]))


def plan(cfg: MineConfig, out: str) -> dict:
    """The plan step (see the module docstring); returns plan.json's content. Skipped when plan.json exists
    and every part not yet committed still has its run part (the plan is a function of the fingerprinted
    settings, so planning again gives the same parts)."""
    plan_uri = storage.join(out, "_plan", "plan.json")
    if storage.exists(plan_uri):
        done = set(storage.listdir(storage.join(out, "_parts")))
        content = json.loads(storage.read_bytes(plan_uri))
        runs = set(storage.listdir(storage.join(out, "_plan")))
        if all(f"part-{p['part']:05d}.json" in done or f"run-{p['part']:05d}.parquet" in runs for p in content["parts"]):
            return content
    t = _run_ids(cfg)
    qid = t["qid"].to_numpy()
    start = _group_starts(qid)
    bounds = list(start[:: cfg.queries_per_task]) + [len(qid)]
    parts = []
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        storage.write_parquet_atomic(t.slice(a, b - a), storage.join(out, "_plan", f"run-{i:05d}.parquet"))
        parts.append({"part": i, "qid_min": int(qid[a]), "qid_max": int(qid[b - 1]), "rows": int(b - a)})
    judged = TextStore(cfg.data).qrels(cfg.split)["qid"].to_numpy()
    not_ranked = np.setdiff1d(np.unique(judged), qid[start])
    content = {"parts": parts, "run_queries": int(len(start)), "run_rows": int(len(qid)),
               "qrels_queries_not_in_run": int(len(not_ranked))}
    storage.write_bytes_atomic(plan_uri, json.dumps(content, indent=2).encode())
    return content


# ------------------------------------------------------------------------------------------------ mine
def _sample_keys(seed: int, qid: np.ndarray, pid: np.ndarray) -> np.ndarray:
    """A uniform pseudo-random uint64 per (seed, qid, pid) (splitmix64): the M smallest keys of a query's
    candidates are a uniform sample of M without replacement, the same however the queries are partitioned."""
    with np.errstate(over="ignore"):
        x = (np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)) ^ (qid.astype(np.uint64) * np.uint64(0xBF58476D1CE4E5B9))
        x = x ^ (pid.astype(np.uint64) * np.uint64(0x94D049BB133111EB))
        for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
            x = (x ^ (x >> np.uint64(shift))) * np.uint64(mult)
        return x ^ (x >> np.uint64(31))


def _lookup(keys_q: np.ndarray, keys_p: np.ndarray, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """``(score, found)`` of each (qid, pid) in ``table`` (qid, pid, score with unique pairs): an Arrow hash
    join, then back to the order asked."""
    wanted = pa.table({"qid": pa.array(keys_q, pa.int64()), "pid": pa.array(keys_p, pa.int64()),
                       "_row": np.arange(len(keys_q))})
    j = wanted.join(table.select(["qid", "pid", "score"]), ["qid", "pid"], join_type="left outer")
    score = np.full(len(keys_q), np.nan)
    score[j["_row"].to_numpy()] = j["score"].cast(pa.float64()).to_numpy(zero_copy_only=False)
    return score, ~np.isnan(score)


def mine_part(cfg: MineConfig, out: str, part: dict, qrels: pa.Table) -> dict:
    """Mine one qid range (a plan part): write its triples and groups, then its counts (the commit point).
    ``qrels``: the split's ``qid, pid, relevance`` with a pid (judged documents in the corpus)."""
    i = part["part"]
    run = storage.read_parquet(storage.join(out, "_plan", f"run-{i:05d}.parquet"))
    rq, rp, rr = run["qid"].to_numpy(), run["pid"].to_numpy(), run["rank"].to_numpy()
    queries = np.unique(rq)
    qq, qp, qr = qrels["qid"].to_numpy(), qrels["pid"].to_numpy(), qrels["relevance"].to_numpy()
    mine_q = np.isin(qq, queries)
    qq, qp, qr = qq[mine_q], qp[mine_q], qr[mine_q]
    judged = _pairs_in(rq, rp, qq, qp)
    cand = (rr > cfg.skip) & ~judged
    cq, cp, crank = rq[cand], rp[cand], rr[cand]
    is_pos = qr >= 1
    pq_, pp_ = qq[is_pos], qp[is_pos]
    counts = {"queries": int(len(queries)), "queries_without_positives": int(len(np.setdiff1d(queries, pq_))),
              "positives": int(len(pq_)), "candidates": int(len(cq)), "dropped_false_negatives": 0,
              "unscored_dropped": 0, "unscored_kept": 0}
    # every (query, positive) x the query's candidates, as index arrays into the positives and the candidates
    pos_order = np.argsort(pq_, kind="stable")
    pq_, pp_ = pq_[pos_order], pp_[pos_order]
    c_start = np.searchsorted(cq, pq_, side="left")
    c_end = np.searchsorted(cq, pq_, side="right")
    n_each = c_end - c_start
    pos_idx = np.repeat(np.arange(len(pq_)), n_each)
    cand_idx = np.repeat(c_start, n_each) + _within_group(pos_idx)
    keep = np.ones(len(pos_idx), dtype=bool)
    if cfg.scores:
        teacher = run.select(["qid", "pid", "score"]) if cfg.scores == RUN_SCORES else read_pair_scores(
            cfg.scores, part["qid_min"], part["qid_max"])
        t_pos, pos_found = _lookup(pq_, pp_, teacher)
        t_neg, neg_found = _lookup(cq, cp, teacher)
        tp, tn = t_pos[pos_idx], t_neg[cand_idx]
        checkable = pos_found[pos_idx] & neg_found[cand_idx]
        false_negative = checkable & (tn > tp - cfg.margin)
        if cfg.relative_margin is not None:
            false_negative |= checkable & (tn > tp * (1 - cfg.relative_margin))
        counts["dropped_false_negatives"] = int(false_negative.sum())
        keep &= ~false_negative
        if cfg.unscored == "drop":
            counts["unscored_dropped"] = int((~checkable).sum())
            keep &= checkable
        else:
            counts["unscored_kept"] = int((~checkable).sum())
    pos_idx, cand_idx = pos_idx[keep], cand_idx[keep]
    # sample: the `negatives` smallest keys per (query, positive), then back to run order
    key = _sample_keys(cfg.seed, cq[cand_idx], cp[cand_idx])
    order = np.lexsort((key, pos_idx))
    pos_idx, cand_idx = pos_idx[order], cand_idx[order]
    within = _within_group(pos_idx)
    take = within < cfg.negatives
    pos_idx, cand_idx = pos_idx[take], cand_idx[take]
    order = np.lexsort((crank[cand_idx], pos_idx))
    pos_idx, cand_idx = pos_idx[order], cand_idx[order]
    got = np.bincount(pos_idx, minlength=len(pq_))
    short = got < cfg.negatives
    counts["positives_without_negatives"] = int((got == 0).sum())
    counts["positives_with_fewer_negatives"] = int(short.sum())
    counts["queries_with_fewer_negatives"] = int(len(np.unique(pq_[short])))
    t_q, t_pos, t_neg = pq_[pos_idx], pp_[pos_idx], cp[cand_idx]
    triples = pa.table({"qid": t_q, "pos_pid": t_pos, "neg_pid": t_neg}, schema=TRIPLES_SCHEMA)
    # groups: consecutive runs of one (query, positive), cut every group_size negatives
    chunk = _within_group(pos_idx) // cfg.group_size if cfg.group_size else np.zeros(len(pos_idx), np.int64)
    boundary = np.concatenate([[True], (pos_idx[1:] != pos_idx[:-1]) | (chunk[1:] != chunk[:-1])]) \
        if len(pos_idx) else np.zeros(0, bool)
    starts = np.flatnonzero(boundary)
    offsets = pa.array(np.append(starts, len(pos_idx)).astype(np.int32))
    groups = pa.table({"qid": pa.array(t_q[starts], pa.int64()), "pos_pid": pa.array(t_pos[starts], pa.int64()),
                       "neg_pids": pa.ListArray.from_arrays(offsets, pa.array(t_neg, pa.int64()))},
                      schema=GROUPS_SCHEMA)
    counts.update(triples=triples.num_rows, groups=groups.num_rows,
                  negative_rank_sum=int(crank[cand_idx].sum()))
    storage.write_parquet_atomic(triples, storage.join(out, "triples", f"part-{i:05d}.parquet"))
    storage.write_parquet_atomic(groups, storage.join(out, "groups", f"part-{i:05d}.parquet"))
    storage.write_bytes_atomic(storage.join(out, "_parts", f"part-{i:05d}.json"), json.dumps(counts).encode())
    return counts


def _within_group(sorted_groups: np.ndarray) -> np.ndarray:
    """Position of each row within its run of equal values (0, 1, 2, ...) in an array sorted by group."""
    starts = _group_starts(sorted_groups)
    sizes = np.diff(np.append(starts, len(sorted_groups)))
    return np.arange(len(sorted_groups)) - np.repeat(starts, sizes)


def _pairs_in(q: np.ndarray, p: np.ndarray, set_q: np.ndarray, set_p: np.ndarray) -> np.ndarray:
    """Whether each (q, p) is among the pairs (set_q, set_p)."""
    if len(set_q) == 0:
        return np.zeros(len(q), dtype=bool)
    _, found = _lookup(q, p, pa.table({"qid": set_q, "pid": set_p, "score": np.zeros(len(set_q))}))
    return found


# ------------------------------------------------------------------------------------------------ the stage
def mine(cfg: MineConfig) -> storage.Manifest:
    """Mine hard negatives (see the module docstring) into ``output_uri(cfg)``; returns its manifest."""
    _check(cfg)
    store = TextStore(cfg.data)
    if not store.has_qrels(cfg.split):
        raise UserError(f"{store.uri}: split {cfg.split!r} has no qrels to take positives from; it has: "
                        f"{', '.join(s for s in store.splits if store.has_qrels(s)) or 'none'}")
    out = output_uri(cfg)
    scores_id = finished.input_identity(cfg.scores) if cfg.scores != RUN_SCORES else None
    claim = finished.claim(out, "mine", finished.fingerprint(
        cfg, **{"data.created_at": finished.input_identity(cfg.data),
                "run.created_at": finished.input_identity(cfg.run), "scores.created_at": scores_id}),
        cfg.overwrite)
    if claim.finished:
        log.info("%s already holds these mined triples; nothing to do", out)
        return claim.manifest
    import ray

    from raykd.runtime import init_ray

    t0 = time.perf_counter()
    init_ray()
    memory = {"memory": int(cfg.plan_memory_gb * 2**30)} if cfg.plan_memory_gb else {}
    the_plan = ray.get(ray.remote(plan).options(num_cpus=cfg.cpus_per_task, **memory).remote(cfg, out))
    t_plan = time.perf_counter() - t0
    qrels = store.qrels(cfg.split)
    judged = qrels.filter(pc.is_valid(qrels["pid"])).select(["qid", "pid", "relevance"])
    qrels_ref = ray.put(judged)
    done = set(storage.listdir(storage.join(out, "_parts")))
    todo = [p for p in the_plan["parts"] if f"part-{p['part']:05d}.json" not in done]
    log.info("mining %s queries of %s in %d parts (%d already committed)", f"{the_plan['run_queries']:,}",
             cfg.run, len(the_plan["parts"]), len(the_plan["parts"]) - len(todo))
    task = ray.remote(mine_part).options(num_cpus=cfg.cpus_per_task)
    pending = [task.remote(cfg, out, p, qrels_ref) for p in todo]
    progress = Progress(log, "parts mined", len(todo))
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        ray.get(ready)
        progress.update(1)
    progress.close()
    counts: dict = {}
    for p in the_plan["parts"]:
        for k, v in json.loads(storage.read_bytes(storage.join(out, "_parts", f"part-{p['part']:05d}.json"))).items():
            counts[k] = counts.get(k, 0) + v
    rank_sum = counts.pop("negative_rank_sum", 0)
    counts["qrels_queries_not_in_run"] = the_plan["qrels_queries_not_in_run"]
    counts["resumed_parts"] = len(the_plan["parts"]) - len(todo)
    for p in the_plan["parts"]:  # the run in id space was scaffolding: the parts are committed
        uri = storage.join(out, "_plan", f"run-{p['part']:05d}.parquet")
        if storage.exists(uri):
            fs, path = storage.filesystem(uri)
            fs.rm(path)
    names = [f"part-{p['part']:05d}.parquet" for p in the_plan["parts"]]
    m = storage.write_manifest(
        out, "mine", format=MINED_FORMAT, format_version=MINED_VERSION, config=dataclasses.asdict(cfg),
        inputs={"data": cfg.data, "run": cfg.run, "split": cfg.split, **({"scores": cfg.scores} if cfg.scores else {})},
        counts={**counts, "run_queries": the_plan["run_queries"], "run_rows_within_depth": the_plan["run_rows"]},
        stats={"mean_negative_rank": round(rank_sum / counts["triples"], 3) if counts.get("triples") else None,
               "negatives_per_positive": round(counts["triples"] / counts["positives"], 3)
               if counts.get("positives") else None},
        parts=[f"triples/{n}" for n in names] + [f"groups/{n}" for n in names],
        timings={"plan_seconds": round(t_plan, 3), "total_seconds": round(time.perf_counter() - t0, 3)},
        fingerprint=claim.fingerprint,
    )
    log.info("%s triples in %s groups written to %s (%s false negatives dropped)", f"{counts['triples']:,}",
             f"{counts['groups']:,}", out, f"{counts['dropped_false_negatives']:,}")
    return m

