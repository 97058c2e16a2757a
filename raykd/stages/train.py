"""train: distil a student from teacher scores on Ray Train (TorchTrainer, DDP; format ``raykd.student`` v1).

Inputs: a text store (``--data``, :mod:`raykd.formats.store`) and a scores output (``--scores``,
:mod:`raykd.formats.scores`; not needed by losses that need no teacher scores, e.g. ``labels``).

Data path: the scores parts are read by Ray Data (``qid, pos_pid, neg_pid, pos_score, neg_score``), a small actor
pool attaches the query and passage texts from the shared lookup (:mod:`raykd.texts`: pid-sorted blocks in the
object store), and each training worker iterates its own shard (``get_dataset_shard``) of ONE stream holding as
many epochs as the steps need, each epoch every triple once in an order fixed by (seed, epoch) (``epoch_order``);
the collate step (a background thread of the worker) tokenises with the student's tokenizer, so every optimizer
step scores pos and neg in ONE forward pass.

The loop: AdamW, linear warm-up then linear decay to 0, gradient accumulation (DDP ``no_sync`` between
micro-batches), bf16 autocast on GPU, gradient clipping, seeds. The step itself is the loss's training step
(:mod:`raykd.stages.train_steps`: pairwise, or in-batch with a frozen teacher run in the loop for TCT-ColBERT).

Output layout under ``--out``::

    ray_train/checkpoint_*/         Ray Train checkpoints, the last ``keep_checkpoints`` kept; each holds
        model/                      the student in HF format (loadable with raykd.models.registry.load_scorer)
        training_state.pt           optimizer, scheduler, step, RNG
        metrics.jsonl               the metrics history up to that step
    model/                          the final student (HF format + raykd_model.json)
    metrics.jsonl                   one JSON object per logged step / validation / resume event
    manifest.json                   stage "train", format "raykd.student" v1; written last

Resume: a worker that dies is replaced and training restarts from the latest checkpoint (``max_failures``).
Re-running with the same ``--out`` after the driver died resumes from the latest checkpoint in ``ray_train/``;
re-running a finished output returns its manifest. The data position is restored too: the stream is built
at every start of the worker group (``TrainStream``) from the latest registered checkpoint's step.

Validation (rank 0, at every ``validate_every`` steps and at the end): re-ranking MRR@10 over ``val_queries``
queries of ``val_split`` that have qrels; each query's candidates are its relevant passages plus
``val_negatives`` passages drawn uniformly from the corpus with a fixed seed (no BM25 needed; the same
candidates in every run, so numbers are comparable across students). Ties rank negatives first.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raykd import finished, storage
from raykd.config import field
from raykd.errors import UserError
from raykd.log import configure as configure_console
from raykd.log import get_logger, ray_train_logging
from raykd.runtime import init_ray

log = get_logger("train")

FORMAT = "raykd.student"
VERSION = 1
RUN_NAME = "ray_train"


@dataclass
class TrainConfig:
    SECTION = "train"

    data: str | None = field(None, help="Text store URI (written by `raykd prepare`).")
    scores: str | None = field(None, help="Scores output URI (`raykd score` / `raykd import-nrkd`).")
    student: str = field("bert_dot", help="Student architecture: bert_dot, bert_cat, colbert, prettr or tk.")
    init: str | None = field(None, help="Hub name or path the student starts from (TK: its word embeddings).")
    loss: str = field("margin_mse", help="Loss: margin_mse, mse, ranknet, labels (no teacher), tct, ...")
    out: str | None = field(None, help="Output URI: checkpoints, final model, metrics, manifest.", fingerprint=False)
    workers: int = field(2, help="Ray Train workers (DDP processes; one per GPU on a cluster).")
    use_gpu: bool = field(False, help="One GPU per worker; bf16 autocast.", flag="--use-gpu/--no-gpu", fingerprint=False)
    cpus_per_worker: float = field(0.5, help="CPUs per worker (fractional is fine; whole CPUs can starve reads).", fingerprint=False)
    batch_size: int = field(32, help="Triples per worker per micro-batch.")
    grad_accum: int = field(1, help="Micro-batches per optimizer step.")
    steps: int | None = field(None, help="Optimizer steps in total (unset: from epochs).")
    epochs: float = field(1.0, help="Passes over the triples when steps is not given.")
    lr: float = field(7e-6, help="AdamW peak learning rate (the paper's 7e-6 for BERT students).")
    weight_decay: float = field(0.01, help="AdamW weight decay.")
    warmup_steps: int = field(0, help="Linear warm-up steps, then linear decay to 0.")
    clip_norm: float = field(1.0, help="Gradient clipping max norm (0: off).")
    seed: int = field(42, help="Seed of model heads, data order and validation candidates.")
    checkpoint_every: int = field(500, help="Checkpoint every N optimizer steps (and at the end).", fingerprint=False)
    keep_checkpoints: int = field(2, help="Keep the last N checkpoints.", fingerprint=False)
    validate_every: int | None = field(None, help="Validate every N steps (unset: at checkpoints).")
    val_split: str = field("dev", help="Query split of the store used for validation.")
    val_queries: int = field(100, help="Validation queries (0: no validation).")
    val_negatives: int = field(29, help="Random corpus negatives per validation query.")
    log_every: int = field(10, help="Report metrics every N steps.", fingerprint=False)
    max_failures: int = field(3, help="Worker failures to recover from (restarting from the last checkpoint).", fingerprint=False)
    bf16: bool = field(True, help="bf16 autocast on GPU.")
    shuffle_buffer: int = field(0, help="Local shuffle buffer (rows) per worker on top of the seeded order; 0: off.")
    data_workers: int = field(1, help="Actors attaching texts to the triples.", fingerprint=False)
    torch_threads: int | None = field(None, help="torch threads per worker (unset: max(1, cpus_per_worker)).", fingerprint=False)
    query_max_length: int | None = field(None, help="Student query max tokens (unset: the student's).")
    passage_max_length: int | None = field(None, help="Student passage max tokens (unset: the student's).")
    student_options: dict = field({}, help="Architecture options, e.g. pooling=mean, split_layer=3, dim=128.")
    loss_options: dict = field({}, help="Options of the loss, e.g. TCT's tau=0.25, gamma=0.1, mode=inbatch.")
    teacher: str | None = field(None, help="A teacher run inside the loop (losses that need one, e.g. tct).")
    groups: str | None = field(None, help="Train on n-way groups instead of triples: a triples set mined into the "
                                          "store (`raykd mine --out NAME`) or a mine output URI. Listwise losses "
                                          "(step kind group: listwise_kl, listnet, nway_margin_mse, infonce).")
    group_size: int = field(8, help="With --groups: negatives per query (k of 1+k). A group with more is sampled "
                                    "down to k (seeded, another draw each epoch); one with fewer is left out "
                                    "(counted in the manifest).")
    pair_scores: str | None = field(None, help="With --groups: teacher pair scores: a `raykd score` output "
                                               "(its pair_scores/), or Parquet (file or folder) of "
                                               "qid int64, pid int64, score float32; every pair of the groups "
                                               "must be scored. Needed by losses that learn from a teacher.")
    overwrite: bool = field(False, help="Replace an existing output made with other settings instead of refusing.",
                            fingerprint=False)


# ------------------------------------------------------------------------------------------------ checks


def _check_config(cfg: TrainConfig):
    from raykd.losses import get_loss
    from raykd.models.registry import STUDENTS
    from raykd.stages.train_steps import train_step

    for name in ("data", "init", "out"):
        if not getattr(cfg, name):
            raise UserError(f"train: --{name} is required")
    if cfg.student not in STUDENTS:
        raise UserError(f"unknown student {cfg.student!r}; known students: {', '.join(sorted(STUDENTS))}")
    try:
        spec = get_loss(cfg.loss)
    except ValueError as e:
        raise UserError(str(e)) from None
    train_step(spec).check(dataclasses.asdict(cfg))  # bad loss options fail here, before Ray starts
    if cfg.groups:
        if spec.step != "group":
            raise UserError(f"--groups trains listwise losses (step kind group); --loss {cfg.loss} is {spec.step}: "
                            "use nway_margin_mse for Margin-MSE (k=1 is margin_mse), infonce for labels only")
        if cfg.scores:
            raise UserError("--groups takes teacher scores as --pair-scores (qid, pid, score), not --scores")
        if cfg.group_size < 1:
            raise UserError(f"train: group_size must be >= 1, got {cfg.group_size}")
        if spec.needs_scores and not cfg.pair_scores:
            raise UserError(f"loss {cfg.loss} learns from teacher scores: give --pair-scores (qid, pid, score "
                            "Parquet) for the groups")
    elif cfg.pair_scores:
        raise UserError("--pair-scores goes with --groups (triples take a `raykd score` output as --scores)")
    elif spec.needs_scores and not cfg.scores:
        raise UserError(f"loss {cfg.loss} learns from teacher scores: give --scores (a `raykd score` output)")
    for name in ("workers", "batch_size", "grad_accum", "checkpoint_every", "log_every"):
        if getattr(cfg, name) < 1:
            raise UserError(f"train: {name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.cpus_per_worker <= 0:
        raise UserError(f"train: cpus_per_worker must be > 0, got {cfg.cpus_per_worker}")
    return spec


def check_scores(scores) -> int:
    """Scan the ensemble score columns; a NaN or infinite score fails with the part and row that hold it."""
    n = 0
    for uri in scores.part_uris:
        row = 0
        for batch in storage.iter_parquet_batches(uri, columns=["qid", "pos_pid", "neg_pid", "pos_score", "neg_score"]):
            for col in ("pos_score", "neg_score"):
                v = batch.column(col).to_numpy(zero_copy_only=False)
                bad = ~np.isfinite(v)
                if bad.any():
                    i = int(np.flatnonzero(bad)[0])
                    key = tuple(int(batch.column(k)[i].as_py()) for k in ("qid", "pos_pid", "neg_pid"))
                    raise UserError(
                        f"{uri}, row {row + i}: {col} is {v[i]} for triple (qid, pos_pid, neg_pid) = {key}; teacher "
                        f"scores must be finite numbers: re-score these triples or drop them"
                    )
            row += batch.num_rows
            n += batch.num_rows
    return n


# ------------------------------------------------------------------------------------------------ data


class AttachTexts:
    """Ray Data actor: adds ``query``, ``positive``, ``negative`` texts to a batch of triples from the shared
    lookups (:mod:`raykd.texts`: pid-sorted blocks in the object store, mapped zero-copy, no private copy)."""

    def __init__(self, passages, queries):
        self.passages, self.queries = passages.lookup(), queries.lookup()

    def __call__(self, batch: dict) -> dict:
        try:
            batch["query"] = self.queries.take(batch["qid"]).to_numpy(zero_copy_only=False)
        except KeyError as e:
            raise UserError(f"training {e.args[0]}") from None
        batch["positive"] = self.passages.take(batch["pos_pid"]).to_numpy(zero_copy_only=False)
        if "neg_pids" in batch:  # groups: (B, k) negatives -> B lists of k texts
            negs = np.stack([np.asarray(x, dtype=np.int64) for x in batch["neg_pids"]]) if len(batch["neg_pids"]) \
                else np.zeros((0, 0), dtype=np.int64)
            texts = self.passages.take(negs.ravel()).to_numpy(zero_copy_only=False)
            batch["negatives"] = texts.reshape(negs.shape)
            batch["neg_pids"] = negs
            if "teacher_scores" in batch:
                batch["teacher_scores"] = np.stack([np.asarray(x, dtype=np.float32) for x in batch["teacher_scores"]])
            return batch
        batch["negative"] = self.passages.take(batch["neg_pid"]).to_numpy(zero_copy_only=False)
        return batch


def epoch_order(parts: list[tuple[str, int]], seed: int, start_row: int, end_row: int) -> list[dict]:
    """What the stream reads, as a pure function of (seed, epoch): every epoch visits every part once in an
    order drawn with ``(seed, epoch)`` and each part's rows in an order drawn with ``(seed, epoch, part)``;
    rows ``[start_row, end_row)`` of the concatenated epochs (a resumed run starts where its checkpoint was).
    Items: ``{"uri", "part", "epoch", "skip", "rows"}``: read the part, permute, drop ``skip`` rows, keep ``rows``."""
    n = sum(r for _, r in parts)
    if n == 0:
        return []
    items, pos, epoch = [], (start_row // n) * n, start_row // n
    while pos < end_row:
        for i in np.random.default_rng([seed, epoch]).permutation(len(parts)):
            uri, rows = parts[i]
            lo, hi = max(pos, start_row), min(pos + rows, end_row)
            if hi > lo:
                items.append({"uri": uri, "part": int(i), "epoch": epoch, "skip": lo - pos, "rows": hi - lo,
                              "seed": seed})
            pos += rows
            if pos >= end_row:
                break
        epoch += 1
    return items


def _read_part(batch: dict, columns: list[str], group_size: int = 0, pair_scores: str | None = None) -> pa.Table:
    """Ray Data task: the Parquet parts named in the batch, each in its seeded row order (``epoch_order``).
    Groups (``group_size`` > 0): only the usable groups, k negatives sampled per row and the teacher's pair
    scores joined (:mod:`raykd.stages.train_groups`)."""
    from raykd.stages import train_groups

    tables = []
    for uri, part, epoch, skip, rows, seed in zip(batch["uri"], batch["part"], batch["epoch"], batch["skip"],
                                                 batch["rows"], batch["seed"]):
        fs, path = storage.filesystem(str(uri))
        with fs.open(path, "rb") as f:
            t = pq.read_table(f, columns=columns)
        if group_size:
            t = train_groups.usable_groups(t, group_size)
        order = np.random.default_rng([int(seed), int(epoch), int(part)]).permutation(t.num_rows)
        t = t.take(pa.array(order[int(skip): int(skip) + int(rows)]))
        if group_size:
            rng = np.random.default_rng([int(seed), int(epoch), int(part), 1])
            t = train_groups.group_rows(t, group_size, rng, pair_scores)
        tables.append(t)
    return pa.concat_tables(tables)


def _triple_parts(cfg: TrainConfig, scores) -> tuple[list[tuple[str, int]], list[str]]:
    """The triples' Parquet parts with their row counts (from the footers), and the columns to read."""
    if scores is not None:
        uris = list(scores.part_uris)
        cols = ["qid", "pos_pid", "neg_pid", "pos_score", "neg_score"]
    else:
        from raykd.formats.store import TextStore

        store = TextStore(cfg.data)
        if not store.has_triples():
            raise UserError(f"{cfg.data}: the text store has no training triples")
        uris = list(storage.parquet_parts(store.triples_uri))
        cols = ["qid", "pos_pid", "neg_pid"]
    parts = []
    for u in uris:
        fs, path = storage.filesystem(u)
        with fs.open(path, "rb") as f:
            parts.append((u, pq.ParquetFile(f).metadata.num_rows))
    return parts, cols


def _training_parts(cfg: TrainConfig, scores) -> tuple[list[tuple[str, int]], list[str]]:
    """The parts the stream reads, with their (usable) row counts, and the columns to read: the mined groups
    with ``--groups``, else the triples."""
    if cfg.groups:
        from raykd.stages import train_groups

        parts, _ = train_groups.group_parts(train_groups.groups_uri(cfg.data, cfg.groups), cfg.group_size)
        return parts, list(train_groups.COLUMNS)
    return _triple_parts(cfg, scores)


def shared_texts(cfg: TrainConfig):
    """The corpus and the training queries in the object store, once per run (:mod:`raykd.texts`)."""
    from raykd.formats.store import TextStore
    from raykd.stages import shared_texts as sharing

    store = TextStore(cfg.data)
    return (sharing.share_passages(store.corpus_parts(), where=f"the corpus of {store.uri}"),
            sharing.share(store.query_lookup("train")))


def _dataset(cfg: TrainConfig, spec, scores, passes: int = 1, start_row: int = 0, texts=None, parts=None):
    """The training stream: rows ``[start_row, passes x triples)`` in the order ``epoch_order`` fixes, as ONE
    Ray Data pipeline that starts once per run (docs/train.md, "Data order")."""
    import ray.data

    if parts is None:
        parts = _training_parts(cfg, scores)
    parts, cols = parts
    n = sum(r for _, r in parts)
    items = epoch_order(parts, cfg.seed, start_row, max(1, passes) * n)
    passages, queries = texts or shared_texts(cfg)
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds.context.execution_options.preserve_order = True  # the order is a function of (seed, epoch): keep it
    read = {"columns": cols}
    if cfg.groups:
        read.update(group_size=cfg.group_size, pair_scores=cfg.pair_scores)
    ds = ds.map_batches(_read_part, fn_kwargs=read, batch_size=1, batch_format="numpy", num_cpus=0.25)
    ds = ds.map_batches(
        AttachTexts,
        fn_constructor_args=(passages, queries),
        batch_format="numpy",
        batch_size=1024,
        num_cpus=0.25,
        compute=ray.data.ActorPoolStrategy(size=max(1, cfg.data_workers)),
    )
    return ds


class TrainStream:
    """The dataset Ray Train builds at every worker-group start (first start, and after a worker failure or a
    driver re-run): it resumes the stream at the latest registered checkpoint's step, so a resumed run continues
    the same order instead of starting a fresh pass."""

    def __init__(self, cfg: TrainConfig, spec, scores, passes: int, per_step: int, texts, parts):
        self.args = (cfg, spec, scores, passes)
        self.per_step, self.texts, self.parts = per_step, texts, parts

    def resumed_step(self) -> int:
        import ray.train

        cfg = self.args[0]
        fs, path = storage.arrow_filesystem(storage.join(cfg.out, RUN_NAME))
        try:
            result = ray.train.Result.from_path(path, storage_filesystem=fs)
        except Exception:  # no snapshot yet: a fresh run
            return 0
        return int((result.metrics or {}).get("step", 0)) if result.checkpoint is not None else 0

    def __call__(self):
        step = self.resumed_step()
        if step:
            log.info("data stream resumes at step %d (row %s of the epoch order)", step, f"{step * self.per_step:,}")
        return _dataset(*self.args, start_row=step * self.per_step, texts=self.texts, parts=self.parts)


class TripleCollate:
    """The collate step, run in each worker's prefetch thread: texts -> the student's tokenised inputs
    (``step.features``, the loss's training step)."""

    def __init__(self, model, step):
        self.model, self.step = model, step

    def __call__(self, batch: dict) -> dict:
        import torch

        queries = [str(x) for x in batch["query"]]
        positives = [str(x) for x in batch["positive"]]
        if "negatives" in batch:  # groups: k texts per query
            negatives = [[str(x) for x in row] for row in batch["negatives"]]
        else:
            negatives = [str(x) for x in batch["negative"]]
        out = {
            "features": self.step.features(self.model, queries, positives, negatives),
            "queries": queries,
            "positives": positives,
            "negatives": negatives,
            "size": len(queries),
        }
        if "pos_score" in batch:
            out["teacher_pos"] = torch.tensor(np.array(batch["pos_score"], dtype=np.float32))
            out["teacher_neg"] = torch.tensor(np.array(batch["neg_score"], dtype=np.float32))
        if "teacher_scores" in batch:
            out["teacher_scores"] = torch.tensor(np.stack([np.asarray(x, dtype=np.float32)
                                                           for x in batch["teacher_scores"]]))
        return out


def _collate_class():
    from ray.data.collate_fn import NumpyBatchCollateFn

    class _Collate(TripleCollate, NumpyBatchCollateFn):  # TripleCollate first: its __init__ and __call__ win
        pass

    return _Collate


# ------------------------------------------------------------------------------------------------ validation


def validation_set(cfg: TrainConfig) -> list[dict]:
    """``[{qid, query, passages, relevant}]``: each chosen query's relevant passages plus random negatives."""
    from raykd.formats.store import TextStore

    if cfg.val_queries <= 0:
        return []
    store = TextStore(cfg.data)
    if cfg.val_split not in store.splits or not store.has_qrels(cfg.val_split):
        log.warning("no validation: the store has no queries+qrels for split %r (has %s)", cfg.val_split, store.splits)
        return []
    q = store.queries(cfg.val_split)
    texts = dict(zip(q["qid"].to_pylist(), q["text"].to_pylist()))
    qrels = store.qrels(cfg.val_split)
    rel: dict[int, set] = {}
    for qid, pid, r in zip(qrels["qid"].to_pylist(), qrels["pid"].to_pylist(), qrels["relevance"].to_pylist()):
        if r > 0 and qid in texts:
            rel.setdefault(qid, set()).add(pid)
    rng = random.Random(cfg.seed)
    qids = sorted(rel)
    rng.shuffle(qids)
    qids = sorted(qids[: cfg.val_queries])
    all_pids = store.corpus(columns=["pid"])["pid"].to_numpy()
    candidates = []
    for qid in qids:
        negs: list[int] = []
        while len(negs) < min(cfg.val_negatives, len(all_pids) - len(rel[qid])):
            pid = int(all_pids[rng.randrange(len(all_pids))])
            if pid not in rel[qid] and pid not in negs:
                negs.append(pid)
        candidates.append((qid, negs + sorted(rel[qid])))  # negatives first: a tie never helps the student
    # only the candidates' passages are kept while the corpus parts stream by
    passages = store.passage_lookup(pids=[p for _, pids in candidates for p in pids])
    return [{"qid": qid, "query": texts[qid], "passages": passages.texts(pids),
             "relevant": [p in rel[qid] for p in pids]} for qid, pids in candidates]


def mrr_at_10(model, val: list[dict], batch_size: int = 64) -> float:
    """Mean reciprocal rank of the first relevant candidate within the top 10 (0 when none is)."""
    import torch

    if not val:
        return float("nan")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    with torch.no_grad():
        for item in val:
            scores = []
            for i in range(0, len(item["passages"]), batch_size):
                ps = item["passages"][i : i + batch_size]
                feats = model.tokenize([item["query"]] * len(ps), ps) if not model.grouped_passages else model.tokenize(
                    [item["query"]], ps)
                scores.append(model(**{k: v.to(device) for k, v in feats.items()}).float().cpu())
            s = torch.cat(scores).numpy()
            order = np.argsort(-s, kind="stable")
            for rank, j in enumerate(order[:10], 1):
                if item["relevant"][j]:
                    total += 1.0 / rank
                    break
    model.train(was_training)
    return total / len(val)


# ------------------------------------------------------------------------------------------------ the loop


def linear_warmup_decay(warmup: int, total: int):
    """The learning-rate factor at each step: linear warm-up over ``warmup`` steps, then linear decay to 0."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return f


def _save_checkpoint(model, optimizer, scheduler, step: int, history: list[dict], d: str) -> None:
    import torch

    model.save_pretrained(os.path.join(d, "model"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                "rng": torch.get_rng_state()}, os.path.join(d, "training_state.pt"))
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(h) + "\n" for h in history)


def train_loop_per_worker(loop_cfg: dict) -> None:
    """What every Ray Train worker runs (see the module docstring)."""
    import ray.train
    import ray.train.torch
    import torch

    from raykd.losses import get_loss
    from raykd.models.registry import load_scorer, load_student
    from raykd.stages.train_steps import BatchContext, train_step

    cfg = TrainConfig(**loop_cfg["config"])
    total_steps, val, n_triples = loop_cfg["total_steps"], loop_cfg["val"], loop_cfg["triples"]
    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    torch.set_num_threads(cfg.torch_threads or max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed)  # same random heads on every rank (DDP also broadcasts rank 0's)
    configure_console()  # this worker is a process of its own: raykd's console settings, once
    batch_step = train_step(get_loss(cfg.loss))
    opts = {**cfg.student_options, "query_max_length": cfg.query_max_length,
            "passage_max_length": cfg.passage_max_length}
    bare = load_student(cfg.student, cfg.init, **opts)
    bare.train()
    device = ray.train.torch.get_device()

    history: list[dict] = []
    step = 0
    ckpt = ray.train.get_checkpoint()
    state = None
    if ckpt is not None:
        with ckpt.as_directory() as d:
            bare.load_state_dict(load_scorer(os.path.join(d, "model")).state_dict())
            state = torch.load(os.path.join(d, "training_state.pt"), map_location="cpu", weights_only=False)
            with open(os.path.join(d, "metrics.jsonl")) as f:
                history = [json.loads(line) for line in f if line.strip()]
        step = int(state["step"])
        history.append({"event": "resumed", "step": step, "time": time.time()})
        log.info("rank %d resumed from checkpoint at step %d", rank, step)

    model = ray.train.torch.prepare_model(bare)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_warmup_decay(cfg.warmup_steps, total_steps))
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])

    ctx = BatchContext(device=device, rank=rank, world_size=world, step=step, options=dict(cfg.loss_options),
                       config=dataclasses.asdict(cfg))
    batch_step.setup(ctx)
    autocast = device.type == "cuda" and cfg.bf16
    validate_every = cfg.validate_every or cfg.checkpoint_every
    shard = ray.train.get_dataset_shard("train")
    collate = _collate_class()(bare, batch_step)
    no_sync = getattr(model, "no_sync", None)

    def report(metrics: dict, with_checkpoint: bool) -> None:
        if with_checkpoint and rank == 0:
            with tempfile.TemporaryDirectory() as d:
                _save_checkpoint(bare, optimizer, scheduler, step, history, d)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report(metrics)

    if step == 0 and val and rank == 0:
        history.append({"event": "validation", "step": 0, "mrr@10": mrr_at_10(bare, val), "time": time.time()})
        log.info("step 0 validation MRR@10 %.4f", history[-1]["mrr@10"])

    restarts = 0  # the stream holds enough passes for total_steps; it restarts only if it runs out (resumes)
    triples_seen = 0
    micro = 0
    t_last, triples_since, loss_sum, loss_n, stats_last = time.time(), 0, 0.0, 0, {}
    while step < total_steps:
        for batch in shard.iter_torch_batches(
            batch_size=cfg.batch_size, collate_fn=collate, drop_last=True, prefetch_batches=2,
            local_shuffle_buffer_size=cfg.shuffle_buffer or None, local_shuffle_seed=cfg.seed + 1000 * restarts + rank,
        ):
            batch["features"] = {k: v.to(device) for k, v in batch["features"].items()}
            ctx.step = step
            sync_now = (micro + 1) % cfg.grad_accum == 0
            cm = no_sync() if (no_sync is not None and not sync_now) else _null()
            with cm:
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=autocast):
                    loss, stats = batch_step.loss(model, batch, ctx)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {float(loss)} at step {step}: check the scores and the lr")
                (loss / cfg.grad_accum).backward()
            micro += 1
            loss_sum, loss_n, stats_last = loss_sum + float(loss.detach()), loss_n + 1, stats
            triples_since += batch["size"] * world
            triples_seen += batch["size"] * world
            if not sync_now:
                continue
            if cfg.clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            do_log = step % cfg.log_every == 0 or step == total_steps
            do_val = bool(val) and (step % validate_every == 0 or step == total_steps)
            do_ckpt = step % cfg.checkpoint_every == 0 or step == total_steps
            if do_log or do_ckpt or do_val:
                loss_t = torch.tensor([loss_sum / max(1, loss_n)], device=device)
                if world > 1:
                    torch.distributed.all_reduce(loss_t)
                    loss_t /= world
                now = time.time()
                metrics = {"step": step, "epoch": round(triples_seen / n_triples, 4), "loss": float(loss_t),
                           "lr": scheduler.get_last_lr()[0],
                           "triples_per_s": triples_since / max(now - t_last, 1e-9), **stats_last}
                t_last, triples_since, loss_sum, loss_n = now, 0, 0.0, 0
                if do_val and rank == 0:
                    metrics["val_mrr@10"] = mrr_at_10(bare, val)
                if rank == 0:
                    history.append({**metrics, "time": now})
                    # rank 0 only, through raykd's logger: once on the driver's console (a print in a Ray
                    # Train worker reaches it twice, on stdout and through Ray Train's root logger)
                    log.info("step %d/%d loss %.4f %.0f triples/s%s", step, total_steps, metrics["loss"],
                             metrics["triples_per_s"],
                             f" val MRR@10 {metrics['val_mrr@10']:.4f}" if "val_mrr@10" in metrics else "")
                report(metrics, do_ckpt)
            if step >= total_steps:
                break
        restarts += 1


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# ------------------------------------------------------------------------------------------------ the stage


def _is_set_name(groups: str | None) -> bool:
    """A bare name of a triples set of the store (mine's rule), as opposed to a URI; None counts as a name."""
    from raykd.formats.store import is_set_name

    return not groups or (is_set_name(groups) and "/" not in groups)


def train(cfg: TrainConfig) -> storage.Manifest:
    """Run (or resume, or return the finished) training described by ``cfg``."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from raykd.formats.scores import TripleScores
    from raykd.formats.store import TextStore

    # the workers get these as strings and do not share the driver's working directory
    cfg = dataclasses.replace(cfg, data=storage.absolute(cfg.data), scores=storage.absolute(cfg.scores),
                              out=storage.absolute(cfg.out), init=storage.absolute_model(cfg.init),
                              teacher=storage.absolute_model(cfg.teacher), pair_scores=storage.absolute(cfg.pair_scores),
                              groups=cfg.groups if _is_set_name(cfg.groups) else storage.absolute(cfg.groups))

    spec = _check_config(cfg)
    groups_uri = None
    if cfg.groups:
        from raykd.stages import train_groups

        groups_uri = train_groups.groups_uri(cfg.data, cfg.groups)
    identity = {k: getattr(cfg, k) for k in ("data", "scores", "init", "teacher")}
    if groups_uri:
        identity["groups"] = groups_uri.rsplit("/", 1)[0]  # the mined set's manifest
    # the same fingerprint resumes from the latest checkpoint in ray_train/ (Ray Train restores it by run name)
    claim = finished.claim(cfg.out, "train", finished.fingerprint(cfg, **{
        f"{k}.created_at": finished.input_identity(v) for k, v in identity.items()}), cfg.overwrite)
    if claim.finished:
        log.info("%s is already a finished training output; nothing to do", cfg.out)
        return claim.manifest
    t0 = time.time()
    TextStore(cfg.data)  # fails early on an unfinished store
    scores = TripleScores(cfg.scores) if (spec.needs_scores or cfg.scores) and not cfg.groups else None
    group_counts: dict = {}
    if cfg.groups:
        group_parts, group_counts = train_groups.group_parts(groups_uri, cfg.group_size)
        n_triples = group_counts["usable_groups"]
        log.info("%s groups with >= %d negatives of %s in %s (%s left out)", f"{n_triples:,}", cfg.group_size,
                 f"{group_counts['groups']:,}", groups_uri, f"{group_counts['short_groups']:,}")
        if cfg.pair_scores:
            log.info("checking that %s scores every pair of the groups", cfg.pair_scores)
            group_counts["scored_pairs"] = train_groups.check_pair_scores(group_parts, cfg.group_size,
                                                                          cfg.pair_scores)
    elif scores is not None:
        log.info("checking teacher scores in %s", cfg.scores)
        n_triples = check_scores(scores)
    else:
        n_triples = int(TextStore(cfg.data).manifest["counts"].get("triples", 0))
    if n_triples == 0:
        raise UserError(f"train: no training {'groups with enough negatives' if cfg.groups else 'triples'}")
    per_step = cfg.batch_size * cfg.workers * cfg.grad_accum
    if n_triples < cfg.batch_size * cfg.workers:
        raise UserError(f"train: {n_triples} triples cannot fill one batch of {cfg.batch_size} on {cfg.workers} workers")
    total_steps = cfg.steps or max(1, math.floor(cfg.epochs * n_triples / per_step))
    # one stream long enough for every step (plus a batch per worker: the equal split may drop a few rows)
    passes = math.ceil((total_steps * per_step + cfg.workers * cfg.batch_size) / n_triples)
    val = validation_set(cfg)
    unit = f"groups of 1+{cfg.group_size}" if cfg.groups else "triples"
    log.info("training %s on %s %s with %s: %d steps of %d, %d workers, %d validation queries",
             cfg.student, f"{n_triples:,}", unit, cfg.loss, total_steps, per_step, cfg.workers, len(val))

    init_ray()
    parts = (group_parts, list(train_groups.COLUMNS)) if cfg.groups else _triple_parts(cfg, scores)
    t_texts = time.time()
    texts = shared_texts(cfg)
    log.info("texts in the object store: %d passage block(s) in %.1f s", len(texts[0].refs), time.time() - t_texts)
    # Ray Train's controller polls its workers every 2 s by default: up to 2 s lost at each end of every run,
    # which shows in short runs (propagated from the driver's environment; a value set by the user wins)
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    fs, path = storage.arrow_filesystem(cfg.out)
    if not storage.is_s3(cfg.out):
        os.makedirs(path, exist_ok=True)
    from ray.data import DataContext

    data_ctx = DataContext.get_current()  # Ray Train copies it when the trainer is made: keep the stream's order
    kept_order, data_ctx.execution_options.preserve_order = data_ctx.execution_options.preserve_order, True
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": dataclasses.asdict(cfg), "total_steps": total_steps, "val": val,
                           "triples": n_triples},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker={"CPU": cfg.cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name=RUN_NAME,
            storage_path=path,
            storage_filesystem=fs,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            worker_runtime_env={"env_vars": storage.worker_env()},
            logging_config=ray_train_logging(),
        ),
        datasets={"train": TrainStream(cfg, spec, scores, passes, per_step, texts, parts)},
    )
    data_ctx.execution_options.preserve_order = kept_order
    try:
        result = trainer.fit()
    except Exception as e:  # Ray wraps the worker's error; keep its message, say how to resume
        raise RuntimeError(
            f"training failed: {e}\n(re-run with the same --out to resume from the latest checkpoint)"
        ) from e
    if result.checkpoint is None:
        raise RuntimeError("training finished without a checkpoint; nothing to save")
    with result.checkpoint.as_directory() as d:
        files = storage.upload_dir(os.path.join(d, "model"), storage.join(cfg.out, "model"))
        with open(os.path.join(d, "metrics.jsonl"), "rb") as f:
            history_bytes = f.read()
    storage.write_bytes_atomic(storage.join(cfg.out, "metrics.jsonl"), history_bytes)
    history = [json.loads(line) for line in io.StringIO(history_bytes.decode()) if line.strip()]
    vals = [h for h in history if "val_mrr@10" in h or h.get("event") == "validation"]
    steps_logged = [h for h in history if "loss" in h]
    final = steps_logged[-1] if steps_logged else {}
    return storage.write_manifest(
        cfg.out,
        "train",
        format=FORMAT,
        format_version=VERSION,
        config=dataclasses.asdict(cfg),
        inputs={"data": cfg.data, "scores": cfg.scores, "init": cfg.init, "teacher": cfg.teacher,
                "groups": groups_uri, "pair_scores": cfg.pair_scores},
        counts={**group_counts, "triples": n_triples, "steps": int(final.get("step", total_steps)),
                "triples_seen": int(final.get("step", total_steps)) * per_step, "validation_queries": len(val)},
        stats={
            "student": cfg.student,
            "loss_name": cfg.loss,
            "final_loss": final.get("loss"),
            "val_mrr@10_initial": next((h["mrr@10"] for h in vals if h.get("event") == "validation"), None),
            "val_mrr@10_final": next((h["val_mrr@10"] for h in reversed(vals) if "val_mrr@10" in h), None),
            "resumes": sum(1 for h in history if h.get("event") == "resumed"),
            "checkpoint": result.checkpoint.path,
        },
        parts=["model/" + f for f in files] + ["metrics.jsonl"],
        timings={"total_s": time.time() - t0},
        fingerprint=claim.fingerprint,
    )
