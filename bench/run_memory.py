"""Driver memory and time of a search result's path to run.parquet + run.trec, and of evaluating that run: the former
dict of dicts against the Arrow table (raykd.runs), on a synthetic MS MARCO dev-sized result, side by side.

    python bench/run_memory.py [--queries 6980] [--k 1000] [--passages 1000000] [--work DIR]

A synthetic text store (queries, corpus ids; no texts) and a (queries, k) rows/scores result like a searcher
returns (BM25 scores > 0: every entry kept). Each path runs in its own process, so its peak RSS is its own:
``held`` is the RSS the result holds once converted (the dict, or the table), ``peak`` the process's peak over
the conversion and the writes, both above the RSS before the conversion (store ids and arrays loaded). Both
paths' files are compared byte for byte. Then evaluate (MRR@10, R@1000 against one synthetic judged passage per
query) of the written run.trec, each way in its own process: the whole run as a dict (trec.read_run +
metrics.evaluate, as evaluate did) against runs.checked_run + metrics.evaluate_blocks (what it does now).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa


def _rss(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def make_store(root: str, queries: int, passages: int) -> None:
    from raykd import storage
    from raykd.formats.store import FORMAT

    storage.write_parquet_atomic(pa.table({"qid": pa.array(np.arange(queries) * 7 + 3, pa.int64()),
                                           "query_id": pa.array([f"q{i * 7 + 3}" for i in range(queries)]),
                                           "text": pa.array(["a query"] * queries)}),
                                 storage.join(root, "queries", "dev.parquet"))
    storage.write_parquet_atomic(pa.table({"pid": pa.array(np.arange(passages), pa.int64()),
                                           "doc_id": pa.array([str(i) for i in range(passages)]),
                                           "title": pa.array([""] * passages), "text": pa.array(["p"] * passages)}),
                                 storage.join(root, "corpus", "part-00000.parquet"))
    storage.write_manifest(root, "prepare", format=FORMAT, counts={"queries": {"dev": queries}, "corpus": passages})


def result(queries: int, k: int, passages: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    rows = (rng.integers(0, passages, queries)[:, None] + np.arange(k) * 997) % passages  # distinct per query
    scores = np.sort(rng.gamma(2.0, 5.0, (queries, k)).astype(np.float32), axis=1)[:, ::-1] + 0.01
    return rows.astype(np.int64), np.ascontiguousarray(scores)


def old_path(store, query_ids: pa.Array, doc_ids: pa.Array, rows, scores, out: str, k: int) -> dict:
    """search's result path before raykd.runs: ``_run_of`` -> a dict of dicts -> ``_write_run``."""
    from raykd import storage
    from raykd.formats import trec
    from raykd.runs import corpus_ids, pids_of

    t0 = time.perf_counter()
    keep = scores > 0
    docs = doc_ids.take(pa.array(rows[keep])).to_pylist()
    vals = scores[keep].astype(float).tolist()
    run, pos = {}, 0
    for qid, n in zip(query_ids.to_pylist(), keep.sum(axis=1).tolist()):
        run[qid] = dict(zip(docs[pos : pos + n], vals[pos : pos + n]))
        pos += n
    del docs, vals
    t1 = time.perf_counter()
    held = _rss()
    queries = store.queries("dev")
    qid_of = dict(zip(queries["query_id"].to_pylist(), queries["qid"].to_pylist()))
    cols: dict = {"qid": [], "query_id": [], "doc_id": [], "rank": [], "score": []}
    for q, d in run.items():
        for rank, (doc, s) in enumerate(trec.trec_order(d)[:k], start=1):
            for name, v in zip(cols, (qid_of[q], q, doc, rank, s)):
                cols[name].append(v)
    ids = pa.array(cols["doc_id"], pa.string())
    storage.write_parquet_atomic(pa.table({
        "qid": pa.array(cols["qid"], pa.int64()), "query_id": pa.array(cols["query_id"], pa.string()),
        "pid": pa.array(pids_of(corpus_ids(store), ids), pa.int64()), "doc_id": ids,
        "rank": pa.array(cols["rank"], pa.int32()), "score": pa.array(cols["score"], pa.float32())}),
        storage.join(out, "run.parquet"))
    trec.write_run(run, storage.join(out, "run.trec"), tag="raykd-bm25", k=k)
    return {"convert_s": t1 - t0, "write_s": time.perf_counter() - t1, "held": held}


def new_path(store, query_ids: pa.Array, doc_ids: pa.Array, rows, scores, out: str, k: int) -> dict:
    from raykd.runs import run_columns, top_k_table, write_run

    t0 = time.perf_counter()
    table = top_k_table(query_ids, doc_ids, rows, scores, scores > 0)
    t1 = time.perf_counter()
    held = _rss()
    write_run(run_columns(table, store, "dev"), out, tag="raykd-bm25")
    return {"convert_s": t1 - t0, "write_s": time.perf_counter() - t1, "held": held}


def evaluate_path(args) -> None:
    from raykd import metrics
    from raykd.formats import trec
    from raykd.runs import checked_run, query_blocks

    qrels = trec.read_qrels(os.path.join(args.work, "qrels.trec"))
    run_uri = os.path.join(args.work, "new", "run.trec")
    base = _rss()
    t0 = time.perf_counter()
    if args.one == "eval-old":
        ev = metrics.evaluate(trec.read_run(run_uri), qrels, ["MRR@10", "R@1000"])
    else:
        ev = metrics.evaluate_blocks(query_blocks(checked_run(run_uri)), qrels, ["MRR@10", "R@1000"])
    print(json.dumps({"path": args.one, "seconds": round(time.perf_counter() - t0, 2), "mean": ev.mean,
                      "peak_gb": round((_rss("VmHWM") - base) / 2**30, 3)}))


def one(args) -> None:
    if args.one.startswith("eval"):
        return evaluate_path(args)
    from raykd.formats.store import TextStore
    from raykd.runs import corpus_ids

    store = TextStore(os.path.join(args.work, "store"))
    query_ids = store.queries("dev")["query_id"].combine_chunks()
    doc_ids = corpus_ids(store)["doc_id"].combine_chunks()
    rows, scores = result(args.queries, args.k, args.passages)
    base = _rss()
    r = (old_path if args.one == "old" else new_path)(store, query_ids, doc_ids, rows, scores,
                                                       os.path.join(args.work, args.one), args.k)
    print(json.dumps({"path": args.one, "convert_s": round(r["convert_s"], 2), "write_s": round(r["write_s"], 2),
                      "held_gb": round((r["held"] - base) / 2**30, 3),
                      "peak_gb": round((_rss("VmHWM") - base) / 2**30, 3)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--queries", type=int, default=6980)
    p.add_argument("--k", type=int, default=1000)
    p.add_argument("--passages", type=int, default=1_000_000)
    p.add_argument("--work", default=None)
    p.add_argument("--one", choices=["old", "new", "eval-old", "eval-new"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        return one(args)
    args.work = args.work or tempfile.mkdtemp(prefix="raykd-run-memory-")
    make_store(os.path.join(args.work, "store"), args.queries, args.passages)
    rows, _ = result(args.queries, args.k, args.passages)
    judged = rows[np.arange(args.queries), np.random.default_rng(1).integers(0, args.k, args.queries)]
    with open(os.path.join(args.work, "qrels.trec"), "w") as f:
        f.writelines(f"q{i * 7 + 3} 0 {d} 1\n" for i, d in enumerate(judged.tolist()))
    del rows
    out = {}
    for path in ("old", "new", "eval-old", "eval-new"):
        line = subprocess.run([sys.executable, __file__, "--one", path, "--work", args.work, "--queries",
                               str(args.queries), "--k", str(args.k), "--passages", str(args.passages)],
                              check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        print(line, flush=True)
        out[path] = json.loads(line)
    for name in ("run.trec", "run.parquet"):
        with open(os.path.join(args.work, "old", name), "rb") as a, open(os.path.join(args.work, "new", name), "rb") as b:
            assert a.read() == b.read(), f"{name} differs"
    assert out["eval-old"]["mean"] == out["eval-new"]["mean"]
    print(json.dumps({"rows": args.queries * args.k, "files_identical": True, "evaluations_equal": True,
                      "evaluate_peak_ratio_old_to_new": round(out["eval-old"]["peak_gb"]
                                                              / max(out["eval-new"]["peak_gb"], 1e-3), 1),
                      "held_ratio_old_to_new": round(out["old"]["held_gb"] / max(out["new"]["held_gb"], 1e-3), 1),
                      "peak_ratio_old_to_new": round(out["old"]["peak_gb"] / max(out["new"]["peak_gb"], 1e-3), 1),
                      "time_ratio_old_to_new": round((out["old"]["convert_s"] + out["old"]["write_s"])
                                                     / (out["new"]["convert_s"] + out["new"]["write_s"]), 2)}))


if __name__ == "__main__":
    main()
