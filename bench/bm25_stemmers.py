"""BM25 (bm25s, Lucene idf, k1=0.9 b=0.4, Lucene's 33 stopwords) on full BEIR SciFact test with each stemmer,
through `raykd search --bm25`, against Anserini's published nDCG@10 0.6789 / R@100 0.9253 / R@1000 0.9767.

    .venv/bin/python bench/bm25_stemmers.py
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data", "scifact")


def main() -> None:
    from raykd.stages.evaluate import EvaluateConfig, evaluate
    from raykd.stages.prepare import PrepareConfig, prepare
    from raykd.stages.search import SearchConfig, search

    work = tempfile.mkdtemp(prefix="raykd-bm25-")
    store = os.path.join(work, "store")
    prepare(PrepareConfig(beir=os.path.abspath(DATA), out=store))
    runs = []
    for stemmer in ("porter", "english", "none"):
        out = os.path.join(work, stemmer)
        search(SearchConfig(data=store, bm25=True, stemmer=stemmer, split="test", k=1000, out=out))
        runs.append(out)
    res = evaluate(EvaluateConfig(run=runs, names=["porter", "english", "none"], data=store, split="test",
                                  metrics=["nDCG@10", "R@100", "R@1000"]))
    print("Anserini BM25 (Lucene, Porter): nDCG@10 0.6789  R@100 0.9253  R@1000 0.9767")
    for name, r in res.items():
        m = r["mean"]
        print(f"bm25s {name:8s}: nDCG@10 {m['nDCG@10']:.4f}  R@100 {m['R@100']:.4f}  R@1000 {m['R@1000']:.4f}"
              f"  (nDCG@10 diff {m['nDCG@10'] - 0.6789:+.4f})")


if __name__ == "__main__":
    main()
