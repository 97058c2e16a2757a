"""The ``score`` stage's driver: its config and :func:`score`, which runs (or resumes) the steps in order.

1. **plan** (:mod:`.plan`, Ray tasks): triples -> output parts by a hash of the qid, checked and deduplicated,
   each part's triples and unique pairs in ``_work/``, then ``_work/plan.json``.
2. **pipeline** (:mod:`.pipeline`, one streaming Ray Dataset): the unique pairs of every pending part ->
   texts -> tokens -> one pool of long-lived actors that each hold every teacher -> pair scores.
3. **join** (:mod:`.join`, a Ray task per part): as soon as a part's pairs are all scored, its triples get
   their scores and the part is committed; the driver only gathers rows and submits tasks. A normalised
   ensemble (``normalization`` zscore / minmax) first keeps each part's raw pair scores and statistics, then,
   once every pair is scored, merges the statistics and commits each part with them.
4. **analysis** (:mod:`.analysis`, a Ray task that asks for the memory of all scores) and ``manifest.json``:
   statistics summed over the part footers, the score distributions, and the model loads of this run.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass

from raykd import config, finished, storage
from raykd.ensemble import NORMALIZATIONS
from raykd.errors import UserError
from raykd.formats import scores as fmt
from raykd.formats.store import TextStore
from raykd.log import get_logger
from raykd.runtime import init_ray
from raykd.stages.score.analysis import analysis_memory, teacher_score_analysis
from raykd.stages.score.join import (
    RAW_PAIRS,
    PartGather,
    join_part,
    part_stats,
    raw_pairs_uri,
    run_stats,
    stage_part,
)
from raykd.stages.score.pipeline import pair_scores, shared_texts
from raykd.stages.score.plan import make_plan, read_plan
from raykd.stages.scoring import model_loads


@dataclass
class ScoreConfig:
    """Options of ``raykd score``."""

    SECTION = "score"

    data: str = config.field("", help="Text store URI (the output of `raykd prepare`), with triples.")
    teachers: list[str] = config.field(
        [], help="Teachers as [KIND:]NAME_OR_PATH, KIND one of cat (cross-encoders; a bare path is one), dot, colbert, "
                 "prettr, tk, bm25 (no path: the store's corpus statistics), llm; any mix is one ensemble "
                 "(docs/teachers.md).", flag="--teacher")
    out: str = config.field("", help="Output URI of the scores (local path or s3://).", fingerprint=False)
    weights: list[float] = config.field([], help="Ensemble weight per teacher, in order (unset: equal weights, the mean).",
                                         flag="--weight")
    query_max_length: int | None = config.field(
        None, help="Query tokens kept per pair, for every teacher (unset: each teacher's saved length, else 30, "
                   "the paper's).")
    passage_max_length: int | None = config.field(
        None, help="Passage tokens kept per pair, for every teacher (unset: each teacher's saved length, else "
                   "200, the paper's).")
    normalization: str = config.field(
        "none", help="Per-teacher score normalisation before the weighted mean, with each teacher's statistics "
                     "over the run's unique pairs: none (raw scores, the paper's T2), zscore, minmax.",
        choices=["none", "zscore", "minmax"])
    teacher_options: dict = config.field(
        {}, help="Teacher load options: template, yes_token, no_token (llm), pooling, normalize (dot); KEY "
                 "applies to every teacher of a kind that takes it, NAME.KEY to teacher NAME only.")
    split: str = config.field("train", help="Query split of the store that the triples' qids belong to.")
    batch_size: int = config.field(64, help="Pairs per forward pass.", fingerprint=False)
    bucket_pairs: int = config.field(2048, help="Pairs per Ray Data block; each is sorted by length in the actor.", fingerprint=False)
    rows_per_part: int = config.field(100_000, help="Target triples per output part (parts are split by qid).")
    min_actors: int = config.field(1, help="Minimum scoring actors (each holds every teacher).", fingerprint=False)
    max_actors: int = config.field(2, help="Maximum scoring actors (each holds every teacher; the autoscaler may add GPU nodes).", fingerprint=False)
    gpus_per_actor: float = config.field(0.0, help="GPUs per scoring actor (1 on a GPU cluster).", fingerprint=False)
    cpus_per_actor: float = config.field(0.5, help="CPUs per scoring actor (fractional on small machines).", fingerprint=False)
    actor_resources: dict = config.field(
        {}, help="Custom Ray resources per scoring actor, e.g. teacher_gpu=1 to land only on GPU worker nodes.",
        fingerprint=False,
    )
    cpus_per_task: float = config.field(0.25, help="CPUs per text-lookup / tokenising task.", fingerprint=False)
    torch_threads: int = config.field(1, help="torch threads per scoring actor (CPU only).", fingerprint=False)
    lenient: bool = config.field(False, help="Quarantine bad rows (unknown ids, NaN scores) instead of failing.",
                                 flag="--lenient/--strict")
    pair_scores: bool = config.field(
        True, help="Also write the unique (qid, pid) pair scores, per teacher and ensemble, under pair_scores/ "
                   "(what `raykd train --groups --pair-scores` and `raykd mine --scores` read).")
    histogram_bins: int = config.field(60, help="Bins of the per-teacher score histogram.")
    overwrite: bool = config.field(
        False, help="Replace an existing output made with other settings instead of refusing.", fingerprint=False
    )


log = get_logger("score")
_log = log.info  # the stage's events, in raykd's one console format


def _resolve_weights(cfg: ScoreConfig) -> list[float]:
    if not cfg.weights:
        return [1.0] * len(cfg.teachers)
    w = [float(x) for x in cfg.weights]
    if len(w) != len(cfg.teachers):
        raise UserError(f"got {len(w)} weight(s) for {len(cfg.teachers)} teacher(s); give one --weight per --teacher")
    if any(x < 0 for x in w) or sum(w) <= 0:
        raise UserError(f"ensemble weights must be >= 0 with a positive sum, got {w}")
    return w


def _absolute_teacher(t: str) -> str:
    """A teacher spec whose local folder is made absolute (actors do not share the driver's working
    directory); its ``KIND:`` prefix is kept as given."""
    from raykd.models.teachers import parse_teacher

    spec = parse_teacher(t)
    if not spec.path:
        return t
    prefix = f"{spec.kind}:" if str(t).strip().startswith(f"{spec.kind}:") else ""
    return f"{prefix}{storage.absolute_model(spec.path)}"


@dataclass
class Teachers:
    """The ensemble as the stage runs it: each teacher's spec string, kind spec, column name and load options."""

    given: list[str]
    specs: list
    names: list[str]
    options: list[dict]

    @property
    def scorers(self) -> list[tuple[str, str]]:
        return list(zip(self.names, self.given))

    @property
    def load_options(self) -> dict[str, dict]:
        return dict(zip(self.names, self.options))


def _teachers(cfg: ScoreConfig) -> Teachers:
    """Parse the teachers; name them after their model (``cat:/m/x/model`` and ``/m/x/model`` are ``x``; a bm25
    teacher is ``bm25``); give each its options (a bm25 teacher the store)."""
    from raykd.models.teachers import parse_teacher, teacher_options

    specs = [parse_teacher(t) for t in cfg.teachers]
    names = fmt.teacher_names([s.path or s.kind for s in specs])
    return Teachers(list(cfg.teachers), specs, names, teacher_options(specs, names, cfg.teacher_options, cfg.data))


def _check_teachers(cfg: ScoreConfig, teachers: Teachers) -> None:
    """Fail before any Ray work if a teacher cannot be loaded (a path that does not exist, a folder of another
    kind) or is no teacher (its scoring weights were never trained: a random layer would score), whatever its
    kind (:func:`raykd.models.teachers.check_teacher`); the actors check hub names on load."""
    from raykd.models.teachers import check_teacher

    for spec, options in zip(teachers.specs, teachers.options):
        check_teacher(spec, cfg.query_max_length, cfg.passage_max_length, **options)


def _fingerprint(cfg: ScoreConfig, teachers: Teachers, weights: list[float]) -> dict:
    fp = finished.fingerprint(cfg, weights=weights, **{
        "data.created_at": finished.input_identity(cfg.data),
        "teachers.created_at": [finished.input_identity(s.path) for s in teachers.specs]})
    for key, default in (("normalization", "none"), ("teacher_options", {})):
        if fp.get(key) == default:  # at their defaults the result is as before they existed: outputs still match
            fp.pop(key)
    return fp


def score(cfg: ScoreConfig) -> storage.Manifest:
    """Run (or resume) the score stage; returns the manifest. See the module docstring and docs/score.md."""
    t_start = time.time()
    if not cfg.data or not cfg.out:
        raise UserError("score needs --data (a text store) and --out (where to write the scores)")
    # actors get these as strings and do not share the driver's working directory
    cfg = dataclasses.replace(cfg, data=storage.absolute(cfg.data), out=storage.absolute(cfg.out),
                              teachers=[_absolute_teacher(t) for t in cfg.teachers])
    if not cfg.teachers:
        raise UserError("score needs at least one --teacher ([KIND:]NAME_OR_PATH, e.g. a cross-encoder)")
    if cfg.batch_size < 1 or cfg.bucket_pairs < 1 or cfg.rows_per_part < 1 or cfg.min_actors < 1:
        raise UserError("batch_size, bucket_pairs, rows_per_part and min_actors must be >= 1")
    if cfg.normalization not in NORMALIZATIONS:
        raise UserError(f"--normalization must be one of {', '.join(NORMALIZATIONS)}, got {cfg.normalization!r}")
    store = TextStore(cfg.data)
    weights = _resolve_weights(cfg)
    teachers = _teachers(cfg)
    names = teachers.names
    _check_teachers(cfg, teachers)
    claim = finished.claim(cfg.out, "score", _fingerprint(cfg, teachers, weights), cfg.overwrite)
    if claim.finished:
        _log(f"{cfg.out} is already complete; nothing to do")
        return claim.manifest

    plan = read_plan(cfg.out)
    if plan is None:
        init_ray()
        plan = make_plan(cfg.out, store, cfg.split, cfg.rows_per_part, cfg.lenient, cfg.cpus_per_task)
    elif "part_pairs" not in plan:
        raise UserError(f"{cfg.out}: its unfinished run was planned by an older raykd (no unique pairs per part); "
                        "pass --overwrite to start it afresh")
    else:
        _log(f"resuming: plan with {len(plan['parts'])} part(s) found")

    committed = set(storage.listdir(storage.join(cfg.out, "parts")))
    pending = [p for p in plan["parts"] if fmt.part_name(p) not in committed]
    _log(f"{len(plan['parts']) - len(pending)} part(s) already committed, {len(pending)} to score "
         f"with teachers {', '.join(names)}")
    loads_uri = storage.join(cfg.out, "_work", "model_loads", f"run-{int(time.time())}-{uuid.uuid4().hex[:6]}")
    t_score = time.time()
    if pending:
        _score_parts(cfg, store, teachers, weights, plan, pending, loads_uri)
    scoring_s = time.time() - t_score
    return _finish(cfg, claim, names, weights, plan, loads_uri, scoring_s, t_start)


def _score_parts(cfg: ScoreConfig, store: TextStore, teachers: Teachers, weights: list[float], plan: dict,
                 pending: list[int], loads_uri: str) -> None:
    """Steps 2 and 3: stream the pending parts' pairs through the actor pool; join and commit each part in a
    Ray task as soon as its pairs are complete. A normalised run keeps each part's raw pair scores instead
    (``stage_part``; a part kept by an earlier run is not scored again), then, with every pair scored, merges
    the statistics of all parts and commits each pending part with them."""
    import ray

    init_ray()
    names = teachers.names
    normalized = cfg.normalization != "none"
    raw_kept = set(storage.listdir(storage.join(cfg.out, "_work", RAW_PAIRS))) if normalized else set()
    to_score = [p for p in pending if fmt.part_name(p) not in raw_kept]
    task = ray.remote(stage_part if normalized else join_part).options(num_cpus=cfg.cpus_per_task)
    running: dict = {}
    done = len(plan["parts"]) - len(pending)
    t0, pairs_done = time.time(), 0
    what = "scored" if normalized else "committed"

    def harvest(timeout: float | None) -> None:
        nonlocal done, pairs_done
        ready, _ = ray.wait(list(running), num_returns=len(running), timeout=timeout)
        for ref in ready:
            p = running.pop(ref)
            try:
                stats = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                if isinstance(e.cause, UserError):  # strict mode's NaN refusal, raised in the task
                    raise e.cause from None
                raise
            done += 1
            pairs_done += stats["unique_pairs"]
            dt = time.time() - t0
            _log(f"parts {done}/{len(plan['parts'])} {what} (part {p}); {pairs_done} pairs x {len(names)} "
                 f"teacher(s) in {dt:.1f}s ({pairs_done * len(names) / max(dt, 1e-9):.0f} forward pairs/s)")

    if to_score:
        passages, queries = shared_texts(store, cfg.split)
        ds = pair_scores(
            cfg.out, {p: plan["part_pairs"][str(p)] for p in to_score}, teachers.scorers, passages, queries,
            loads_uri, query_max_length=cfg.query_max_length, passage_max_length=cfg.passage_max_length,
            batch_size=cfg.batch_size, bucket_pairs=cfg.bucket_pairs, min_actors=cfg.min_actors,
            max_actors=cfg.max_actors, gpus_per_actor=cfg.gpus_per_actor, cpus_per_actor=cfg.cpus_per_actor,
            actor_resources=cfg.actor_resources, cpus_per_task=cfg.cpus_per_task, torch_threads=cfg.torch_threads,
            load_options=teachers.load_options,
        )
        gather = PartGather({p: plan["part_pairs"][str(p)] for p in to_score})
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for p, part_pair_scores in gather.add(batch):
                args = (cfg.out, names, cfg.lenient, p, part_pair_scores) if normalized else (
                    cfg.out, names, weights, cfg.lenient, p, part_pair_scores, cfg.pair_scores)
                running[task.remote(*args)] = p
            if running:
                harvest(0)
        missing = gather.missing()
        if missing:
            raise RuntimeError(f"the scoring pipeline lost pairs: {sum(missing.values())} of {len(missing)} "
                               f"part(s) missing (e.g. part {next(iter(missing))})")
        while running:
            harvest(None)
    if not normalized:
        return
    stats = _run_stats(cfg, names, plan)
    _log(f"{cfg.normalization} statistics over the run's pairs: " + ", ".join(
        f"{n} mean {s.mean:.4g} std {s.std:.4g} min {s.min:.4g} max {s.max:.4g}" for n, s in stats.items()))
    join_task = ray.remote(join_part).options(num_cpus=cfg.cpus_per_task)
    as_dicts = {n: s.to_dict() for n, s in stats.items()}
    done, what = len(plan["parts"]) - len(pending), "committed"
    t0, pairs_done = time.time(), 0
    for p in pending:
        running[join_task.remote(cfg.out, names, weights, cfg.lenient, p, None, cfg.pair_scores,
                                 cfg.normalization, as_dicts)] = p
    while running:
        harvest(None)


def _run_stats(cfg: ScoreConfig, names: list[str], plan: dict) -> dict:
    """Each teacher's statistics over the run's unique pairs: every part's raw-pair footer, merged in plan order."""
    return run_stats([part_stats(raw_pairs_uri(cfg.out, p)) for p in plan["parts"]], names)


def _analysis(cfg: ScoreConfig, names: list[str], part_uris: list[str], n_triples: int,
              stats: dict[str, dict] | None) -> dict:
    """Step 4's analysis in a Ray task that asks for the memory of every part's scores (MS MARCO: ~4 GiB),
    so Ray places it on a node that has it instead of the job's driver holding them on the head."""
    import ray

    init_ray()
    task = ray.remote(teacher_score_analysis).options(
        num_cpus=cfg.cpus_per_task, memory=analysis_memory(n_triples, len(names), cfg.normalization != "none"))
    return ray.get(task.remote(cfg.out, names, part_uris, cfg.histogram_bins, cfg.normalization, stats))


def _finish(cfg: ScoreConfig, claim: finished.Claim, names: list[str], weights: list[float], plan: dict,
            loads_uri: str, scoring_s: float, t_start: float) -> storage.Manifest:
    """Step 4: statistics over the part footers, the analysis, the manifest."""
    part_names = [fmt.part_name(p) for p in plan["parts"]]
    part_uris = [storage.join(cfg.out, "parts", n) for n in part_names]
    per_part = [part_stats(u) for u in part_uris]
    n_triples = sum(s["triples"] for s in per_part)
    fwd = {n: sum(s["forward_passes"][n] for s in per_part) for n in names}
    real = {n: sum(s["real_tokens"][n] for s in per_part) for n in names}
    padded = {n: sum(s["padded_tokens"][n] for s in per_part) for n in names}
    quarantined_nan = sum(s["quarantined_nan"] for s in per_part)
    # the run's statistics per teacher, over the unique pairs kept (in plan order: the floats a normalised
    # join used); parts committed by a raykd before these statistics existed have none
    run = run_stats(per_part, names) if all("score_stats" in s for s in per_part) else None
    normalization = {"method": cfg.normalization,
                     "teachers": {n: st.to_dict() for n, st in run.items()} if run else None}
    summary = _analysis(cfg, names, part_uris, n_triples, normalization["teachers"])
    loads = model_loads(loads_uri, names)
    all_runs = storage.join(cfg.out, "_work", "model_loads")
    loads_all = {n: sum(model_loads(storage.join(all_runs, r), [n])[n] for r in storage.listdir(all_runs))
                 for n in names}
    stats = {
        "teachers": names,
        "teacher_paths": [str(t) for t in cfg.teachers],
        "weights": weights,
        "normalization": normalization,
        "forward_passes": fwd,
        "forward_passes_total": sum(fwd.values()),
        "naive_forward_passes": 2 * (n_triples + quarantined_nan) * len(names),
        "unique_pairs": sum(s["unique_pairs"] for s in per_part),
        "real_tokens": real,
        "padded_tokens": padded,
        "padded_over_real": sum(padded.values()) / max(1, sum(real.values())),
        "model_loads": loads,
        "model_loads_all_runs": loads_all,
        "score_summary": summary,
    }
    counts = {
        "triples": n_triples,
        "triples_in": plan["triples_in"],
        "duplicate_triples": plan["duplicate_triples"],
        "quarantined": {"unknown_ids": plan["quarantined_unknown_ids"], "nan_scores": quarantined_nan},
        "quarantined_total": plan["quarantined_unknown_ids"] + quarantined_nan,
        "parts": len(part_names),
    }
    if cfg.pair_scores:
        counts["pair_scores"] = sum(s.get("pair_scores", 0) for s in per_part)
    m = storage.write_manifest(
        cfg.out,
        "score",
        format=fmt.FORMAT,
        format_version=fmt.VERSION,
        config=storage.redact(dataclasses.asdict(cfg)),
        inputs={"data": storage.redact(str(cfg.data)), "teachers": [str(t) for t in cfg.teachers]},
        counts=counts,
        stats=stats,
        parts=[f"parts/{n}" for n in part_names],
        timings={"plan_s": plan.get("plan_s"), "scoring_s": round(scoring_s, 3),
                 "total_s": round(time.time() - t_start, 3)},
        fingerprint=claim.fingerprint,
    )
    _log(f"done: {n_triples} triples, {stats['forward_passes_total']} forward passes "
         f"(naive {stats['naive_forward_passes']}), padded/real tokens {stats['padded_over_real']:.3f}, "
         f"model loads {loads}")
    return m
