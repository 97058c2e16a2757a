"""Throughput of raykd's Ray Train loop against a bare single-process torch loop, side by side in one run.

    .venv/bin/python bench/train_throughput.py [--student colbert] [--steps 100] [--size small|tiny] [--batch-size 32] [--threads 1]

Both loops train the same student (a tiny real BERT-shaped model, or --init PATH) with Margin-MSE on the same
triples of the embedded sample (teacher: a lexical overlap scorer), with the same batch size, AdamW, clipping
and torch thread count. The Ray side is `raykd.stages.train.train` with 1 worker (Ray Data shard, collate
tokenising in the prefetch thread, metrics reports, a final checkpoint); its rate is the mean of the logged
triples/s windows after the first (start-up excluded, as it is for the bare loop's first steps). The bare loop
runs before and after the Ray loop; the ratio uses the mean of its two rates. Last line:
``raytrain/bare=X``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def lexical_teacher(query: str, passage: str) -> float:
    q = set(query.split())
    return 3.0 * len(q & set(passage.split())) / max(1, len(q))


def setup(root: str, init: str | None) -> tuple[str, str, str]:
    from raykd import storage
    from raykd.formats import scores as fmt
    from raykd.formats.store import TextStore
    from raykd.sample import SampleSpec, write_sample
    from raykd.stages.prepare import PrepareConfig, prepare

    write_sample(f"{root}/raw", SampleSpec(train_queries=100, dev_queries=10, passages=1000, negatives=40))
    prepare(PrepareConfig(msmarco=f"{root}/raw", out=f"{root}/store"))
    store = TextStore(f"{root}/store")
    t = store.triples()
    q = store.queries("train")
    qt = dict(zip(q["qid"].to_pylist(), q["text"].to_pylist()))
    qid, pos, neg = (t[c].to_numpy() for c in ("qid", "pos_pid", "neg_pid"))
    sp = np.array([lexical_teacher(qt[a], b) for a, b in zip(qid, store.passages(pos))], np.float32)
    sn = np.array([lexical_teacher(qt[a], b) for a, b in zip(qid, store.passages(neg))], np.float32)
    table = fmt.make_table(qid, pos, neg, {"lexical": (sp, sn)}, [1.0])
    storage.write_parquet_atomic(table, f"{root}/scores/parts/{fmt.part_name(0)}")
    storage.write_manifest(f"{root}/scores", "score", format=fmt.FORMAT, format_version=fmt.VERSION,
                           counts={"triples": table.num_rows}, stats={"teachers": ["lexical"], "weights": [1.0]},
                           parts=[f"parts/{fmt.part_name(0)}"])
    return f"{root}/store", f"{root}/scores", init


SIZES = {
    # an 11M-parameter BERT: a step does real work, as a real student's does (the default)
    "small": dict(hidden=256, layers=4, heads=4, intermediate=1024),
    # the tests' tiny model: a step is mostly Python dispatch, so fixed per-step costs show most
    "tiny": dict(hidden=128, layers=2),
}


def bare_loop(args, store_uri: str, scores_uri: str, init: str) -> float:
    import torch

    from raykd.formats.scores import TripleScores
    from raykd.formats.store import TextStore
    from raykd.losses import get_loss
    from raykd.models.base import tokenize_triples
    from raykd.models.registry import load_student

    torch.set_num_threads(args.threads)
    torch.manual_seed(42)
    store, t = TextStore(store_uri), TripleScores(scores_uri).table()
    q = store.queries("train")
    qt = dict(zip(q["qid"].to_pylist(), q["text"].to_pylist()))
    rows = list(zip([qt[x] for x in t["qid"].to_pylist()], store.passages(t["pos_pid"]), store.passages(t["neg_pid"]),
                    t["pos_score"].to_pylist(), t["neg_score"].to_pylist()))
    random.Random(0).shuffle(rows)
    spec = get_loss("margin_mse")
    model = load_student(args.student, init)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    b, warm = args.batch_size, max(3, args.steps // 10)
    start = None
    for step in range(args.steps):
        if step == warm:
            start = time.perf_counter()
        batch = rows[(step * b) % (len(rows) - b):][:b]
        feats = tokenize_triples(model, [r[0] for r in batch], [r[1] for r in batch], [r[2] for r in batch])
        s = model(**feats).float().view(b, 2)
        loss = spec.fn(s[:, 0], s[:, 1], torch.tensor([r[3] for r in batch]), torch.tensor([r[4] for r in batch]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (args.steps - warm) * b / (time.perf_counter() - start)


def ray_loop(args, store_uri: str, scores_uri: str, init: str, out: str) -> float:
    import ray

    from raykd import storage
    from raykd.stages.train import TrainConfig, train

    ray.init(num_cpus=2 * args.threads + 2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    log_every = max(5, args.steps // 8)
    train(TrainConfig(data=store_uri, scores=scores_uri, student=args.student, init=init, out=out, workers=1,
                      cpus_per_worker=float(args.threads), torch_threads=args.threads, batch_size=args.batch_size,
                      steps=args.steps, lr=args.lr, checkpoint_every=10**9, log_every=log_every, val_queries=0,
                      max_failures=0, shuffle_buffer=0))
    history = [json.loads(x) for x in storage.read_bytes(f"{out}/metrics.jsonl").decode().splitlines()]
    rates = [h["triples_per_s"] for h in history if "triples_per_s" in h][1:-1]  # the last window holds the checkpoint
    ray.shutdown()
    return float(np.mean(rates))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--student", default="colbert")
    p.add_argument("--init", default=None, help="model to start from (default: a fresh BERT of --size)")
    p.add_argument("--size", choices=sorted(SIZES), default="small",
                   help="small: h256 x 4 layers (11M parameters); tiny: h128 x 2 layers")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lr", type=float, default=3e-4)
    args = p.parse_args()
    root = tempfile.mkdtemp(prefix="raykd-bench-train-")
    store, scores, init = setup(root, args.init)
    if init is None:
        from raykd.tiny import build_tiny_model

        init = build_tiny_model(f"{root}/init", arch="bert", **SIZES[args.size])
    # the bare loop runs before and after the Ray loop and counts as the mean of the two, so that a drift in the
    # machine's speed during the run falls on both sides
    before = bare_loop(args, store, scores, init)
    print(f"bare torch loop:      {before:8.1f} triples/s ({args.student}, batch {args.batch_size}, {args.threads} thread(s))")
    ray_rate = ray_loop(args, store, scores, init, f"{root}/out")
    print(f"raykd Ray Train loop: {ray_rate:8.1f} triples/s (1 worker)")
    after = bare_loop(args, store, scores, init)
    bare = (before + after) / 2
    print(f"bare torch loop again: {after:7.1f} triples/s (mean of the two: {bare:.1f})")
    print(f"raytrain/bare={ray_rate / bare:.3f}")


if __name__ == "__main__":
    main()
