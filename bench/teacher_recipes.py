"""How reliably a demo teacher recipe learns: the demo's sample, a bare single-process loop, several runs.

    .venv/bin/python bench/teacher_recipes.py [--hidden 128] [--layers 1] [--heads 4] [--lr 2e-3] [--steps 600]
        [--runs 3] [--buffer 0] [--threads 2]

Each run trains a tiny BERT_CAT cross-encoder from scratch on the demo's sample (1,000 training queries x 20
negatives) with the labels loss (pairwise CE), AdamW, linear warm-up (50 steps) and decay, clipping 1.0, 64
triples per step (the demo's 2 workers x 32), and prints its validation MRR@10 every 200 steps on the demo's
validation set (100 dev queries, the positive among 30 random passages: chance 0.098). Run ``i`` uses data
order seed ``i``; ``--buffer N`` replaces the global shuffle by the train stage's local shuffle buffer of N rows
over the file order; ``--init-seeds`` varies the initialisation instead. Quality, not speed: the figures are
the spread one recipe gives across runs (docs/demo.md, "Teachers that stay at chance").
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def demo_rows(root: str):
    from raykd.formats.store import TextStore
    from raykd.sample import SampleSpec, write_sample
    from raykd.stages.demo import DemoConfig
    from raykd.stages.prepare import PrepareConfig, prepare

    d = DemoConfig()
    write_sample(f"{root}/raw", SampleSpec(seed=d.seed, train_queries=d.train_queries, dev_queries=d.dev_queries,
                                           passages=d.passages, negatives=d.negatives,
                                           passage_words=tuple(d.passage_words)))
    prepare(PrepareConfig(msmarco=f"{root}/raw", out=f"{root}/store"))
    store = TextStore(f"{root}/store")
    t, q = store.triples(), store.queries("train")
    qt = dict(zip(q["qid"].to_pylist(), q["text"].to_pylist()))
    rows = list(zip([qt[x] for x in t["qid"].to_pylist()], store.passages(t["pos_pid"]), store.passages(t["neg_pid"])))
    return f"{root}/store", rows, d.seed


def order(rows: list, seed: int, buffer: int, passes: int) -> list:
    """Global shuffle, or the file order through a local shuffle buffer of ``buffer`` rows (as Ray Data's)."""
    rng = random.Random(seed)
    if not buffer:
        out = []
        for _ in range(passes):
            r = list(rows)
            rng.shuffle(r)
            out += r
        return out
    out = []
    for _ in range(passes):
        buf: list = []
        for x in rows:
            buf.append(x)
            if len(buf) >= buffer:
                out.append(buf.pop(rng.randrange(len(buf))))
        rng.shuffle(buf)
        out += buf
    return out


def run(args, store_uri: str, rows: list, root: str, data_seed: int, init_seed: int) -> dict:
    import torch

    from raykd.losses import labels_ce
    from raykd.models.base import tokenize_triples
    from raykd.models.registry import load_student
    from raykd.stages.train import TrainConfig, linear_warmup_decay, mrr_at_10, validation_set
    from raykd.tiny import build_tiny_model

    val = validation_set(TrainConfig(data=store_uri, val_queries=100, seed=13))
    path = build_tiny_model(f"{root}/init-{init_seed}", arch="bert", head="cross_encoder", hidden=args.hidden,
                            layers=args.layers, heads=args.heads, intermediate=2 * args.hidden, seed=init_seed,
                            dropout=0.0)
    model = load_student("bert_cat", path)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_warmup_decay(50, args.steps))
    b = 64
    stream = order(rows, data_seed, args.buffer, passes=args.steps * b // len(rows) + 1)
    t0, curve = time.time(), {}
    for step in range(args.steps):
        batch = stream[step * b:(step + 1) * b]
        feats = tokenize_triples(model, [x[0] for x in batch], [x[1] for x in batch], [x[2] for x in batch])
        s = model(**feats).float().view(len(batch), 2)
        labels_ce(s[:, 0], s[:, 1]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 200 == 0 or step + 1 == args.steps:
            curve[step + 1] = round(mrr_at_10(model, val), 3)
    return {"data_seed": data_seed, "init_seed": init_seed, "val_mrr10": curve, "seconds": round(time.time() - t0)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--buffer", type=int, default=0, help="local shuffle buffer rows over the file order (0: global)")
    p.add_argument("--init-seeds", action="store_true", help="vary the initialisation (seed 13+i), not the order")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    root = tempfile.mkdtemp(prefix="raykd-bench-teacher-")
    store_uri, rows, seed = demo_rows(root)
    finals = []
    for i in range(args.runs):
        r = run(args, store_uri, rows, root, data_seed=0 if args.init_seeds else i,
                init_seed=seed + i if args.init_seeds else seed)
        finals.append(r["val_mrr10"][args.steps])
        print(json.dumps(r), flush=True)
    print(f"h{args.hidden} x {args.layers} layer(s), {args.heads} heads, lr {args.lr}, {args.steps} steps: final "
          f"validation MRR@10 {', '.join(f'{v:.3f}' for v in finals)} (chance 0.098)")


if __name__ == "__main__":
    main()
