"""TCT-ColBERT's Table 3 on the embedded sample: the three distillation strategies side by side.

Stage 1 trains a ColBERT teacher with raykd's train stage (labels only, like the paper's step 1); stage 2 trains
the mean-pooled TCT student from the teacher's weights three times, once per ablation mode (``none``: labels
only, ``triplet``: KL over the query's own triple, ``inbatch``: KL over every passage of the batch). Every run
uses the same data, steps, seed and workers. Reported per mode:

- re-ranking MRR@10: the train stage's validation (dev queries, their relevant passages + random negatives);
- retrieval MRR@10 and R@100: the student indexes the whole sample corpus (Faiss Flat) and searches dev.

    python bench/tct_ablation.py --out /tmp/tct-ablation                  # ~10 min on 2 CPU cores

Everything it writes (sample, store, teacher, students, indexes, runs) stays under ``--out``; a re-run resumes.
"""

from __future__ import annotations

import argparse
import json
import os


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16, help="triples per worker per step")
    ap.add_argument("--teacher-steps", type=int, default=300)
    ap.add_argument("--steps", type=int, default=300, help="stage-2 steps per mode")
    ap.add_argument("--lr", type=float, default=3e-4, help="stage-2 learning rate (the teacher: 3e-4)")
    ap.add_argument("--cross-device", action="store_true", help="in-batch negatives from every worker")
    ap.add_argument("--tag", default="", help="suffix of the student folders (a new set of runs, same teacher)")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    import ray

    from raykd.sample import SampleSpec, write_sample
    from raykd.stages.evaluate import EvaluateConfig, evaluate
    from raykd.stages.index import IndexConfig, index
    from raykd.stages.prepare import PrepareConfig, prepare
    from raykd.stages.search import SearchConfig, search
    from raykd.stages.train import TrainConfig, train
    from raykd.tiny import build_tiny_model

    out = os.path.abspath(args.out)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    raw, store = f"{out}/raw", f"{out}/store"
    if not os.path.exists(f"{raw}/collection.tsv"):
        write_sample(raw, SampleSpec())
    prepare(PrepareConfig(msmarco=raw, out=store))
    init = f"{out}/init"
    if not os.path.exists(f"{init}/config.json"):
        build_tiny_model(init, hidden=args.hidden, layers=args.layers, heads=2, intermediate=4 * args.hidden)

    common = dict(data=store, workers=args.workers, batch_size=args.batch_size, warmup_steps=20,
                  checkpoint_every=100, keep_checkpoints=1, log_every=50, val_queries=100, val_negatives=29, seed=7)
    stage1 = train(TrainConfig(student="colbert", init=init, loss="labels", out=f"{out}/teacher", lr=3e-4,
                               steps=args.teacher_steps, student_options={"dim": 64}, **common))
    teacher = f"{out}/teacher/model"
    rows = [("ColBERT teacher (stage 1)", stage1.stats["val_mrr@10_final"], None, None)]
    for mode in ("none", "triplet", "inbatch"):
        run = f"{out}/student-{mode}{args.tag}"
        m = train(TrainConfig(student="tct", init=teacher, teacher=teacher, loss="tct", out=run, steps=args.steps, lr=args.lr,
                              loss_options={"mode": mode, "cross_device": args.cross_device}, **common))
        index(IndexConfig(data=store, encoder=f"{run}/model", out=f"{run}/index"))
        search(SearchConfig(data=store, split="dev", index=f"{run}/index", k=100, out=f"{run}/search"))
        ev = evaluate(EvaluateConfig(run=[f"{run}/search"], data=store, split="dev", metrics=["MRR@10", "R@100"]))
        scores = next(iter(ev.values()))
        means = scores.get("mean", scores)
        rows.append((f"TCT student, mode {mode}", m.stats["val_mrr@10_final"], means.get("MRR@10"),
                     means.get("R@100")))
    print(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print("| run | re-rank MRR@10 | retrieval MRR@10 | retrieval R@100 |")
    print("|---|---|---|---|")
    for name, rr, mrr, r100 in rows:
        print(f"| {name} | {_fmt(rr)} | {_fmt(mrr)} | {_fmt(r100)} |")


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


if __name__ == "__main__":
    main()
