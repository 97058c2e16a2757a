"""demo: the whole pipeline on the embedded sample, end to end, in a few minutes on a laptop.

    sample -> prepare -> teachers (two tiny BERT_CAT cross-encoders of different widths, fine-tuned on the
    sample's labels so that they carry real signal) -> score (the two-teacher ensemble, Ray Data actor pools)
    -> train (2 Ray Train workers each): BERT_DOT with Margin-MSE, the same with labels only (the
    no-distillation baseline), ColBERT with Margin-MSE, and TCT-ColBERT (in-batch KL from the frozen ColBERT)
    -> index (each dense student, several shards, merged) -> search the dev queries (BM25, dense, re-ranking
    BM25's candidates with the ColBERT student and with a teacher, hybrid BM25 + dense with alpha tuned on
    train queries) -> evaluate -> report (report.md, metrics.json, efficiency.png, demo.json).

Every step writes under ``out`` (local or s3://) and returns its output when it is already finished with the
same settings (:mod:`raykd.finished`), so a re-run resumes; ``overwrite`` rebuilds every step. The students
start from tiny randomly initialised transformers models (``raykd.tiny``): the
point is the pipeline and the comparison between students, not absolute numbers.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from raykd import storage
from raykd.config import field
from raykd.log import get_logger

log = get_logger("demo")
MEASURES = ("MRR@10", "nDCG@10", "R@100")
# what distillation achieves on real data with real weights: the demo's report points there
REPRODUCTION_DOC = "docs/reproduction.md"
TEACHERS = ("teacher_bert_wide", "teacher_bert_narrow")


@dataclass
class DemoConfig:
    SECTION = "demo"

    out: str = field("demo-out", help="Where every stage writes (local path or s3://).")
    seed: int = field(13, help="Seed of the sample and of every training run.")
    train_queries: int = field(1000, help="Sample: training queries.")
    dev_queries: int = field(100, help="Sample: dev queries (evaluated).")
    passages: int = field(4000, help="Sample: passages.")
    negatives: int = field(20, help="Sample: negatives per training query (each (query, positive) pair repeats).")
    passage_words: tuple = field((12, 24), help="Sample: words per passage (min, max); short keeps CPU steps cheap.")
    workers: int = field(2, help="Ray Train workers per training run.")
    teacher_steps: int = field(600, help="Optimizer steps fine-tuning each teacher on the labels.")
    student_steps: int = field(300, help="Optimizer steps per student.")
    teacher_lr: float = field(2e-3, help="Peak learning rate of the teachers (tiny models from scratch).")
    teacher_retries: int = field(1, help="Times a teacher whose validation MRR@10 ends under teacher_min_val is "
                                         "trained again from a fresh initialisation (0: never); the best run scores.")
    teacher_min_val: float | None = field(None, help="Validation MRR@10 a teacher must reach (unset: twice "
                                                     "chance, 0.196 with 29 random negatives).")
    student_lr: float = field(1e-3, help="Peak learning rate of the students.")
    batch_size: int = field(32, help="Triples per worker per step.")
    hidden: int = field(64, help="Hidden size of the tiny models.")
    shards: int = field(3, help="Index shards (merged into one index as well).")
    k: int = field(100, help="Results per query; BM25 candidates per query for re-ranking.")
    local_cache: str | None = field(None, help="Local folder for the tiny initial models (unset: out, or ~/.cache/raykd).")
    side_by_side: str = field("auto", help="Run the independent training chains side by side (auto: yes when the "
                                           "machine has a core for every worker of both).",
                              choices=["auto", "yes", "no"])
    overwrite: bool = field(False, help="Rebuild every step's output instead of returning finished ones (a step "
                                        "whose output was made with other settings is otherwise refused).",
                            fingerprint=False)


def _step(name: str, out: str, fn, *, done=None, overwrite: bool = False):
    """Run one pipeline step; log its time. A stage itself returns its output when it is finished with the same
    settings, and refuses one made with other settings (:mod:`raykd.finished`); ``done`` is for steps that are
    not stages."""
    t0 = time.time()
    if done is not None and not overwrite and done():
        log.info("[%s] already finished in %s, skipped", name, out)
        return None
    was_finished = done is None and not overwrite and storage.has_manifest(out)
    if not was_finished:
        log.info("[%s] running -> %s", name, out)
    result = fn()
    if was_finished:
        log.info("[%s] already finished in %s, skipped", name, out)
    else:
        log.info("[%s] done in %.1f s", name, time.time() - t0)
    return result


def _model_dir(train_out: str) -> str:
    """Local folder of a trained model (downloaded once when the output lives on S3)."""
    return storage.local_dir(storage.join(train_out, "model"))


def demo(cfg: DemoConfig) -> dict:
    from raykd.runtime import init_ray
    from raykd.sample import SampleSpec, write_sample
    from raykd.stages.evaluate import EvaluateConfig, evaluate
    from raykd.stages.index import IndexConfig, index
    from raykd.stages.prepare import PrepareConfig, prepare
    from raykd.stages.score import ScoreConfig, score
    from raykd.stages.search import SearchConfig, search
    from raykd.stages.train import TrainConfig, train

    t_start = time.time()
    init_ray(progress_bars=False)  # the demo logs one line per step; Ray Data's bars would drown them
    out = storage.absolute(cfg.out.rstrip("/"))  # Ray workers do not share this process's working directory
    j = lambda *p: storage.join(out, *p)  # noqa: E731
    timings: dict[str, float] = {}

    def timed(name, fn, outdir, **kw):
        t0 = time.time()
        _step(name, outdir, fn, overwrite=cfg.overwrite, **kw)
        timings[name] = round(time.time() - t0, 1)

    parallel = _side_by_side(cfg)
    log.info("independent training chains run %s", "side by side" if parallel else "one after the other")

    def together(label: str, chains: list[list[tuple[str, object, str]]]) -> None:
        """Independent chains of steps, each in order: side by side on the one Ray cluster when the machine
        has the cores for it, else one chain after the other (see ``_side_by_side``)."""
        assert len(chains) <= 2
        t0 = time.time()

        def run_chain(chain):
            for name, fn, outdir in chain:
                if outdir is None:  # a step that times and resumes its own parts
                    fn()
                else:
                    timed(name, fn, outdir)

        if not parallel:
            for c in chains:
                run_chain(c)
        else:
            with ThreadPoolExecutor(max_workers=len(chains)) as pool:
                for f in [pool.submit(run_chain, c) for c in chains]:
                    f.result()
        timings[label] = round(time.time() - t0, 1)

    # 1. sample and text store
    spec = SampleSpec(
        seed=cfg.seed,
        train_queries=cfg.train_queries,
        dev_queries=cfg.dev_queries,
        passages=cfg.passages,
        negatives=cfg.negatives,
        passage_words=tuple(cfg.passage_words),
    )
    timed("sample", lambda: write_sample(j("raw"), spec), j("raw"),
          done=lambda: storage.exists(j("raw", "qidpidtriples.train.small.tsv")))
    timed("prepare", lambda: prepare(PrepareConfig(msmarco=j("raw"), out=j("store"), overwrite=cfg.overwrite)), j("store"))
    store = j("store")

    # 2. tiny initial models (local: from_pretrained reads folders)
    cache = cfg.local_cache or (os.path.join(out, "init") if not storage.is_s3(out) else
                                os.path.expanduser("~/.cache/raykd/demo-init"))
    inits = {}
    # teachers: one wide attention layer without dropout learns the sample's term matching fastest from scratch
    shapes = {
        "teacher_bert_wide": ("bert", "cross_encoder", 2 * cfg.hidden, 1, 4, 0.0),
        # a second, narrower BERT_CAT: ALBERT-shaped teachers did not learn at this rate (docs/demo.md)
        "teacher_bert_narrow": ("bert", "cross_encoder", 3 * cfg.hidden // 2, 1, 4, 0.0),
        "student": ("bert", "encoder", cfg.hidden, 2, 2, 0.1),
    }
    for i, (name, shape) in enumerate(shapes.items()):
        inits[name] = _tiny(cache, name, shape, seed=cfg.seed + i)

    common = dict(data=store, workers=cfg.workers, batch_size=cfg.batch_size, seed=cfg.seed,
                  query_max_length=16, passage_max_length=64, val_queries=cfg.dev_queries, log_every=25,
                  checkpoint_every=max(cfg.student_steps, cfg.teacher_steps), overwrite=cfg.overwrite)

    # 3. teachers: BERT_CAT cross-encoders fine-tuned on the labels, two independent runs of `workers` workers;
    # a run from scratch can sit at chance, so one that ends under twice chance is trained again (docs/demo.md)
    min_val = _min_val(cfg)
    teacher_runs: dict[str, list[dict]] = {}

    def teacher_chain(name: str) -> list:
        def run_teacher() -> None:
            runs = teacher_runs.setdefault(name, [])
            for attempt in range(1 + max(0, cfg.teacher_retries)):
                # a retry's folder keeps the run's name last: the ensemble's score column is named after it
                tout = j("teachers", name) if attempt == 0 else j("teachers", f"retry{attempt}", name)
                init = inits[name] if attempt == 0 else _tiny(cache, name, shapes[name], seed=cfg.seed + 1000 * attempt)
                # the same seed (data order, validation candidates) on every attempt: only the initialisation
                # differs, so that the runs' validation figures compare
                tcfg = TrainConfig(student="bert_cat", init=init, loss="labels", out=tout, steps=cfg.teacher_steps,
                                   lr=cfg.teacher_lr, warmup_steps=50, **common)
                timed(f"train {name}" + (f" (retry {attempt})" if attempt else ""), lambda c=tcfg: train(c), tout)
                val = storage.read_manifest(tout, stage="train")["stats"].get("val_mrr@10_final")
                runs.append({"out": tout, "init": os.path.basename(init), "val_mrr10": val})
                if val is None or val >= min_val:
                    break
                if attempt < cfg.teacher_retries:
                    log.warning("teacher %s: validation MRR@10 %.3f is under %.3f; training it again from a fresh "
                                "initialisation", name, val, min_val)
            best = max(runs, key=lambda r: -1.0 if r["val_mrr10"] is None else r["val_mrr10"])
            for r in runs:
                r["scored"] = r is best

        # one step that times and resumes its own runs
        return [(f"teacher {name}", run_teacher, None)]

    together("teachers", [teacher_chain(name) for name in TEACHERS])
    # their model folders by URI (S3 ones are fetched into the local model cache where they load); the
    # ensemble's score columns are named after the runs: teacher_bert_wide, teacher_bert_narrow
    teachers = [storage.join(_scored(teacher_runs[name])["out"], "model") for name in TEACHERS]

    # 4. score the triples with the ensemble
    timed("score", lambda: score(ScoreConfig(data=store, teachers=teachers, out=j("scores"),
                                             query_max_length=16, passage_max_length=64,
                                             overwrite=cfg.overwrite)), j("scores"))

    # 5. students (2 Ray Train workers each) as two independent chains: ColBERT -> TCT-ColBERT (the ColBERT
    # student is its frozen teacher), and BERT_DOT Margin-MSE -> BERT_DOT labels; 6. an index of each dense
    # student (several shards, merged)
    students = {
        "bert_dot_margin_mse": dict(student="bert_dot", loss="margin_mse", student_options={"pooling": "mean"}),
        "bert_dot_labels": dict(student="bert_dot", loss="labels", student_options={"pooling": "mean"}),
        "colbert_margin_mse": dict(student="colbert", loss="margin_mse"),
    }
    student_steps = {}
    for name, opts in students.items():
        sout = j("students", name)
        scfg = TrainConfig(scores=j("scores"), init=inits["student"], out=sout, steps=cfg.student_steps,
                           lr=cfg.student_lr, warmup_steps=20, **opts, **common)
        student_steps[name] = (f"train {name}", lambda scfg=scfg: train(scfg), sout)
    colbert_out = j("students", "colbert_margin_mse")
    tct_out = j("students", "tct_colbert")

    def train_tct():
        colbert = _model_dir(colbert_out)
        return train(TrainConfig(scores=j("scores"), init=colbert, teacher=colbert, loss="tct", student="tct",
                                 out=tct_out, steps=cfg.student_steps, lr=cfg.student_lr, warmup_steps=20,
                                 loss_options={"mode": "inbatch"}, **common))

    dense = ["bert_dot_margin_mse", "bert_dot_labels", "tct_colbert"]

    def index_step(name):
        iout = j("index", name)
        return (f"index {name}", lambda: index(IndexConfig(
            data=store, encoder=_model_dir(j("students", name)), out=iout, shards=cfg.shards, merge=True,
            max_length=64, query_max_length=16, overwrite=cfg.overwrite)), iout)

    # each dense student is indexed as soon as it is trained, inside its chain (side by side, its index
    # actors overlap the other chain's training)
    together("students and their indexes (two chains)", [
        [student_steps["colbert_margin_mse"], ("train tct_colbert", train_tct, tct_out), index_step("tct_colbert")],
        [student_steps["bert_dot_margin_mse"], index_step("bert_dot_margin_mse"), student_steps["bert_dot_labels"],
         index_step("bert_dot_labels")],
    ])
    colbert = _model_dir(colbert_out)

    # 7. search the dev queries
    runs: dict[str, str] = {}

    def run(name: str, **kw):
        rout = j("runs", name)
        timed(f"search {name}", lambda: search(SearchConfig(data=store, split="dev", out=rout, k=cfg.k,
                                                            latency_queries=20, overwrite=cfg.overwrite,
                                                            **kw)), rout)
        runs[name] = rout

    run("bm25", bm25=True)
    for name in dense:
        run(f"dense {name}", index=j("index", name), use="merged")
    run("rerank bm25 > colbert_margin_mse", rerank=runs["bm25"], scorer=colbert)
    run("rerank bm25 > teacher_bert_wide", rerank=runs["bm25"], scorer=teachers[0])
    run("hybrid bm25 + bert_dot_margin_mse", hybrid=True, dense=runs["dense bert_dot_margin_mse"],
        sparse=runs["bm25"], index=j("index", "bert_dot_margin_mse"))

    # 8. evaluate and report
    names = list(runs)
    results = evaluate(EvaluateConfig(run=[runs[n] for n in names], names=names, data=store, split="dev",
                                      metrics=list(MEASURES), out=j("report"), overwrite=cfg.overwrite))
    summary = _summary(results, cfg, timings, time.time() - t_start, teacher_runs)
    storage.write_bytes_atomic(j("report", "demo.json"), json.dumps(summary, indent=2).encode())
    storage.write_bytes_atomic(j("report", "demo.md"), summary["markdown"].encode())
    return summary


def _tiny(cache: str, name: str, shape: tuple, seed: int) -> str:
    """The folder of a tiny initial model of ``shape`` (arch, head, hidden, layers, heads, dropout), built once."""
    from raykd.tiny import build_tiny_model

    arch, head, hidden, layers, heads, dropout = shape
    path = os.path.join(cache, f"{name}-h{hidden}-l{layers}-s{seed}")
    if not os.path.exists(os.path.join(path, "config.json")):
        build_tiny_model(path, arch=arch, head=head, hidden=hidden, layers=layers, heads=heads,
                         intermediate=hidden * 2, seed=seed, dropout=dropout)
    return path


def _random_mrr10(candidates: int) -> float:
    """Expected MRR@10 of a random ranking of ``candidates`` passages, one of them relevant."""
    return sum(1 / r for r in range(1, 11)) / candidates


def _val_candidates() -> int:
    """Candidates per query in training's validation: the positive among ``val_negatives`` random passages."""
    from raykd.stages.train import TrainConfig

    return TrainConfig().val_negatives + 1


def _min_val(cfg: DemoConfig) -> float:
    """The validation MRR@10 a teacher must reach: ``teacher_min_val``, by default twice chance."""
    return cfg.teacher_min_val if cfg.teacher_min_val is not None else 2 * _random_mrr10(_val_candidates())


def _side_by_side(cfg: DemoConfig) -> bool:
    """Whether two training runs should share the machine. Side by side their start-up costs overlap, but
    2-worker DDP on oversubscribed cores waits on descheduled peers at every all-reduce (measured in
    docs/demo.md, "Why the demo is built this way")."""
    choice = str(cfg.side_by_side).lower()
    if choice in ("yes", "true", "1"):
        return True
    if choice in ("no", "false", "0"):
        return False
    if choice != "auto":
        raise ValueError(f"demo: side_by_side must be yes, no or auto, got {cfg.side_by_side!r}")
    return (os.cpu_count() or 1) >= 2 * cfg.workers


def _scored(runs: list[dict]) -> dict:
    """The one of a teacher's training runs that scores the triples (the best validated)."""
    return next(r for r in runs if r["scored"])


def _mrr(results: dict, name: str) -> float:
    return float(results[name]["mean"]["MRR@10"])


def _summary(results: dict, cfg: DemoConfig, timings: dict, total_s: float,
             teacher_runs: dict[str, list[dict]] | None = None) -> dict:
    """The demo's conclusion: the table, and how distillation compares with no distillation (a paired
    randomisation test over the dev queries, so that noise is not called a gain) and with random.
    ``teacher_runs``: per teacher, its training runs in order ({out, init, val_mrr10, scored})."""
    from raykd import report
    from raykd.metrics import paired_randomization_test

    measures = list(MEASURES)
    table = report.markdown(results, measures)
    # one relevant passage per dev query, ranked uniformly at random among the corpus
    random_rr10 = _random_mrr10(cfg.passages)
    kd_name, base_name = "dense bert_dot_margin_mse", "dense bert_dot_labels"
    kd, base, tct = _mrr(results, kd_name), _mrr(results, base_name), _mrr(results, "dense tct_colbert")
    per_query = {n: {q: v["MRR@10"] for q, v in results[n]["per_query"].items()} for n in (kd_name, base_name)}
    test = paired_randomization_test(per_query[kd_name], per_query[base_name], seed=cfg.seed)
    if test["p_value"] >= 0.05:
        verdict = "no significant difference"
    else:
        verdict = "significantly better" if kd > base else "significantly worse"
    candidates = _val_candidates()
    val_chance, min_val = _random_mrr10(candidates), _min_val(cfg)
    teacher_runs = teacher_runs or {}
    teacher_val = {n: _scored(runs)["val_mrr10"] for n, runs in teacher_runs.items()}
    teacher_line = ""
    if teacher_runs:
        def shown(n, runs):
            v = teacher_val[n]
            text = f"{n} {v:.3f}" if v is not None else f"{n} (not validated)"
            if len(runs) > 1:
                vals = ", ".join(f"{r['val_mrr10']:.3f}" for r in runs)
                text += f" (the best of {len(runs)} runs, {vals}: a run under {min_val:.3f} is trained again)"
            return text

        weak = [n for n, v in teacher_val.items() if v is not None and v < min_val]
        teacher_line = (f"Teachers' validation MRR@10 (dev positive among {candidates} random passages, "
                        f"chance {val_chance:.3f}): "
                        f"{', '.join(shown(n, r) for n, r in teacher_runs.items())}."
                        + (f" Weak teacher(s), under {min_val:.3f}: {', '.join(weak)}; the ensemble "
                           f"carries less signal in this run." if weak else ""))
    lines = [
        table,
        "",
        f"Random ranking: expected MRR@10 {random_rr10:.4f}.",
        f"BERT_DOT distilled with Margin-MSE: MRR@10 {kd:.4f} vs {base:.4f} for the same student trained on "
        f"labels alone (no distillation): {kd - base:+.4f}, {verdict} (paired randomisation test over "
        f"{test['queries']} dev queries, p = {test['p_value']:.3f}).",
        f"TCT-ColBERT student (in-batch KL from the frozen ColBERT): MRR@10 {tct:.4f}.",
        *([teacher_line] if teacher_line else []),
        "This demo's teachers are tiny models trained from scratch on the embedded sample in minutes: it shows "
        "that every stage runs and what each one writes, not what distillation is worth. For that, with real "
        "data (BEIR SciFact) and real weights (all-MiniLM-L6-v2), see the reproduction's table in "
        f"{REPRODUCTION_DOC} (bench/kd_scifact.py).",
        f"Total time {total_s:.0f} s.",
    ]
    return {
        "markdown": "\n".join(lines) + "\n",
        "mrr10": {n: _mrr(results, n) for n in results},
        "random_mrr10": random_rr10,
        "distillation_gain_mrr10": kd - base,
        "distillation_p_value": test["p_value"],
        "distillation_verdict": verdict,
        "teachers_val_mrr10": teacher_val,
        "teacher_runs": teacher_runs,
        "timings_s": timings,
        "total_s": round(total_s, 1),
    }
