"""BM25 at scale: build (bm25s, corpus read batch by batch), save, load memory-mapped, retrieve; peak RSS of each.

    python bench/bm25_scale.py --data STORE --split dev --work DIR [--k 1000]

Each phase runs in its own process (what the Ray task of `raykd search --bm25` does), so its peak RSS is its own.
Prints one JSON line per phase and the ratio of the build's peak RSS to the corpus text (Parquet uncompressed
size of title + text), the factor `raykd.stages.search.BM25_BYTES_PER_TEXT_BYTE` asks Ray for.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

BUILD = """
import json, sys
from raykd.stages.search import build_bm25
print(json.dumps(build_bm25(sys.argv[1], sys.argv[2], {"k1": 0.9, "b": 0.4, "stemmer": "porter", "stopwords": "en"})))
"""

RETRIEVE = """
import json, resource, sys, time
from raykd.bm25 import BM25Index
from raykd.formats.store import TextStore
t0 = time.time()
index = BM25Index.load(sys.argv[2], mmap=True)
t1 = time.time()
texts = TextStore(sys.argv[1]).queries(sys.argv[3])["text"].to_pylist()
rows, scores = index.search_rows(texts, int(sys.argv[4]))
t2 = time.time()
print(json.dumps({"queries": len(texts), "load_seconds": round(t1 - t0, 3), "retrieve_seconds": round(t2 - t1, 3),
                  "ms_per_query": round(1000 * (t2 - t1) / max(len(texts), 1), 3),
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def _run(code: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    out = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="dev")
    p.add_argument("--work", required=True)
    p.add_argument("--k", type=int, default=1000)
    a = p.parse_args()
    from raykd.formats.store import TextStore
    from raykd.stages.search import BM25_BYTES_PER_TEXT_BYTE, bm25_build_memory

    store = TextStore(a.data)
    text = (bm25_build_memory(store) - (1 << 30)) / BM25_BYTES_PER_TEXT_BYTE
    idx = os.path.join(a.work, "bm25-index")
    t0 = time.time()
    build = _run(BUILD, a.data, idx)
    build["wall_seconds"] = round(time.time() - t0, 1)
    print(json.dumps({"phase": "build", "passages": store.manifest["counts"]["corpus"], "text_bytes": int(text),
                      **build, "peak_rss_per_text_byte": round(build["peak_rss_bytes"] / text, 2)}))
    print(json.dumps({"phase": "retrieve", **_run(RETRIEVE, a.data, idx, a.split, str(a.k))}))


if __name__ == "__main__":
    main()
