"""The training steps of ``raykd train``: what one micro-batch costs, given a loss (:mod:`raykd.losses`).

A loss names the step that runs it (``LossSpec.step``); :func:`train_step` gives that step, and the Ray Train
loop (:func:`raykd.stages.train.train_loop_per_worker`) calls exactly these three methods, as do the tests::

    step = train_step(get_loss(cfg.loss))
    step.setup(ctx)                                        # once per worker: options, a frozen teacher
    features = step.features(model, queries, positives, negatives)     # in the collate thread (CPU)
    loss, stats = step.loss(model, batch, ctx)             # every micro-batch; ``model`` may be DDP-wrapped

- :class:`PairwiseStep`: the B triples in ONE forward pass (:func:`raykd.models.base.tokenize_triples`), then
  the loss function on ``(s+, s-[, t+, t-])``.
- :class:`InBatchStep` (TCT-ColBERT, Lin, Yang and Lin 2020): the student encodes the B queries and the 2B
  passages (positives, then negatives) once; every query is scored against every passage; a
  :class:`FrozenColbertTeacher`, loaded once per worker from ``--teacher``, scores the same (B, 2B) pairs
  inside the loop; the loss is :func:`raykd.losses.tct.tct_loss` of the two matrices. With the option
  ``cross_device`` the passages of every DDP worker are gathered (:mod:`raykd.losses.gather`).
- :class:`GroupStep` (the listwise losses): each query with its group of 1+k passages (its positive, then k
  negatives; a triple is a group of 1+1) in ONE forward pass, then the loss on the (B, 1+k) student and teacher
  score matrices. With InfoNCE's ``in_batch`` option a bi-encoder's query and passage vectors score every
  passage of the batch (gathered from every worker with ``cross_device``).

``batch`` is what the collate step built: ``features`` (tensors on the device), the ``queries`` /
``positives`` / ``negatives`` texts, ``size`` (B) and, from a scores output, ``teacher_pos`` / ``teacher_neg``.
Nothing here imports Ray: the steps run in a plain process as well as in a Ray Train worker.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from raykd.errors import UserError
from raykd.losses.registry import LossSpec
from raykd.models.base import tokenize_triples


@dataclass
class BatchContext:
    """What a step may use besides the model and the batch."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    step: int = 0
    options: dict = field(default_factory=dict)  # the loss options (TrainConfig.loss_options), resolved by setup
    config: dict = field(default_factory=dict)  # the whole TrainConfig as a dict (read-only)
    state: dict = field(default_factory=dict)  # per-worker state that lives across steps (e.g. a frozen teacher)


def train_step(spec: LossSpec) -> PairwiseStep | InBatchStep | GroupStep:
    """The training step that runs the loss ``spec``."""
    return {"pairwise": PairwiseStep, "inbatch": InBatchStep, "group": GroupStep}[spec.step](spec)


class _LossStep:
    """What every step shares: it runs ``spec`` with the loss options resolved once, before Ray starts."""

    def __init__(self, spec: LossSpec):
        self.spec = spec

    def check(self, config: dict) -> dict:
        """The resolved loss options; a configuration this step cannot run fails here (UserError)."""
        return self.spec.resolve_options(config.get("loss_options"))

    def setup(self, ctx: BatchContext) -> None:
        ctx.options = self.spec.resolve_options(ctx.options)


class PairwiseStep(_LossStep):
    """Score the B triples in one forward pass, then ``spec.fn`` on the (B,) positive and negative scores."""

    def features(self, model: torch.nn.Module, queries: list[str], positives: list[str], negatives: list[str]) -> dict:
        return tokenize_triples(model, queries, positives, negatives)

    def loss(self, model: torch.nn.Module, batch: dict, ctx: BatchContext) -> tuple[torch.Tensor, dict]:
        b = batch["size"]
        scores = model(**batch["features"]).float().view(b, 2)
        s_pos, s_neg = scores[:, 0], scores[:, 1]
        if self.spec.needs_scores:
            t_pos, t_neg = batch["teacher_pos"].to(s_pos.device), batch["teacher_neg"].to(s_pos.device)
            loss = self.spec.fn(s_pos, s_neg, t_pos, t_neg, **ctx.options)
        else:
            loss = self.spec.fn(s_pos, s_neg, **ctx.options)
        with torch.no_grad():
            stats = {"student_margin": float((s_pos - s_neg).mean()),
                     "pair_accuracy": float((s_pos > s_neg).float().mean())}
        return loss, stats


class InBatchStep:
    """TCT-ColBERT's step: (B, 2B) student and frozen-teacher score matrices, then ``spec.fn`` of the two.

    Per-worker state (``ctx.state``): ``teacher`` (a :class:`FrozenColbertTeacher`, None in mode ``none``) and
    ``teacher_checks`` (successful checksum checks, reported as a metric)."""

    def __init__(self, spec: LossSpec):
        self.spec = spec

    def check(self, config: dict) -> dict:
        options = self.spec.resolve_options(config.get("loss_options"))
        if options["mode"] != "none" and not config.get("teacher"):
            raise UserError(
                f"--loss {self.spec.name} (mode {options['mode']}) runs a ColBERT teacher in the loop: give "
                "--teacher, a checkpoint of `raykd train --student colbert` (its model/ folder); or the loss "
                "option mode=none for labels only"
            )
        return options

    def setup(self, ctx: BatchContext) -> None:
        """Once per worker: resolve the options, load and freeze the teacher (from storage, once per node)."""
        ctx.options = self.check({**ctx.config, "loss_options": ctx.options})
        ctx.state["teacher_checks"] = 0
        ctx.state["teacher"] = None
        if ctx.options["mode"] != "none":
            from raykd import storage

            ctx.state["teacher"] = FrozenColbertTeacher.from_pretrained(
                storage.local_dir(ctx.config["teacher"]), device=ctx.device, bf16=ctx.options["teacher_bf16"]
            )

    def features(self, model: torch.nn.Module, queries: list[str], positives: list[str], negatives: list[str]) -> dict:
        """The student's inputs: B queries, then 2B passages (the positives, then the negatives)."""
        return model.tokenize(list(queries), list(positives) + list(negatives))

    def loss(self, model: torch.nn.Module, batch: dict, ctx: BatchContext) -> tuple[torch.Tensor, dict]:
        from raykd.losses.gather import gather_rows, gather_token_vectors
        from raykd.models.bi_encoder import BertDot

        opts, teacher = ctx.options, ctx.state.get("teacher")
        if not isinstance(getattr(model, "module", model), BertDot):
            raise UserError(f"the {self.spec.name} loss trains a single-vector bi-encoder: --student tct or bert_dot")
        q, p = model(**batch["features"], return_embeddings=True)  # through forward: DDP's hooks run
        b = q.shape[0]
        if p.dim() != 2 or p.shape[0] != 2 * b:
            raise ValueError(f"an in-batch step has 2B pooled passage vectors for B queries; got {tuple(p.shape)} for {b}")
        rows = torch.arange(b, device=q.device)
        if opts["cross_device"]:
            pos, offset = gather_rows(p[:b])
            neg, _ = gather_rows(p[b:])
            passages, pos_idx, neg_idx = torch.cat([pos, neg]), offset + rows, pos.shape[0] + offset + rows
        else:
            passages, pos_idx, neg_idx = p, rows, b + rows
        student = q.float() @ passages.float().T
        teacher_scores = None
        if teacher is not None:
            tq, tqm, tp, tpm = teacher.token_vectors(
                teacher.tokenize(batch["queries"], list(batch["positives"]) + list(batch["negatives"])))
            if opts["cross_device"]:
                pos, pos_m = gather_token_vectors(tp[:b], tpm[:b])
                neg, neg_m = gather_token_vectors(tp[b:], tpm[b:])
                tp, tpm = torch.cat([pos, neg]), torch.cat([pos_m, neg_m])
            teacher_scores = teacher.maxsim(tq, tqm, tp, tpm).to(student.device)
        loss = self.spec.fn(student, teacher_scores, pos_idx, neg_idx, mode=opts["mode"], tau=opts["tau"],
                            gamma=opts["gamma"])
        every = opts["check_teacher_every"] or ctx.config.get("checkpoint_every") or 500
        if teacher is not None and ctx.step % every == 0 and ctx.state.get("teacher_checked_step") != ctx.step:
            teacher.assert_unchanged()
            ctx.state["teacher_checked_step"] = ctx.step
            ctx.state["teacher_checks"] += 1
        with torch.no_grad():
            stats = {"inbatch_accuracy": float((student.argmax(dim=1) == pos_idx).float().mean()),
                     "teacher_checks": float(ctx.state["teacher_checks"])}
            if teacher_scores is not None:
                stats["teacher_agreement"] = float((student.argmax(1) == teacher_scores.argmax(1)).float().mean())
        return loss, stats


class GroupStep(_LossStep):
    """Score each query's group of 1+k passages in one forward pass, then ``spec.fn`` on the (B, 1+k) scores.

    ``negatives`` are one text per query (a triple: k = 1) or a list of k texts per query (a mined group, the
    same k for every query of the batch). Teacher scores come as ``batch["teacher_scores"]`` (B, 1+k) or, from
    triples, ``teacher_pos`` / ``teacher_neg``."""

    def features(self, model: torch.nn.Module, queries: list[str], positives: list[str],
                 negatives: list[str] | list[list[str]]) -> dict:
        groups = [[p, *([n] if isinstance(n, str) else list(n))] for p, n in zip(positives, negatives)]
        sizes = {len(g) for g in groups}
        if len(sizes) != 1:
            raise ValueError(f"every query of a batch needs the same number of negatives, got group sizes {sorted(sizes)}")
        size = sizes.pop()
        passages = [text for g in groups for text in g]
        queries = list(queries)
        if not getattr(model, "grouped_passages", False):
            queries = [q for q in queries for _ in range(size)]
        return model.tokenize(queries, passages)

    def loss(self, model: torch.nn.Module, batch: dict, ctx: BatchContext) -> tuple[torch.Tensor, dict]:
        b = batch["size"]
        opts = ctx.options
        fn_opts = self.spec.fn_options(opts)
        if opts.get("in_batch"):
            from raykd.losses.infonce import in_batch_scores
            from raykd.models.bi_encoder import BertDot

            if not isinstance(getattr(model, "module", model), BertDot):
                raise UserError(f"--loss {self.spec.name} with in_batch=true scores every passage of the batch: "
                                "a single-vector bi-encoder (--student bert_dot or tct), or the option in_batch=false")
            q, p = model(**batch["features"], return_embeddings=True)
            scores, positive_index = in_batch_scores(q, p, cross_device=opts.get("cross_device", False))
            cols = positive_index[:, None] + torch.arange(p.shape[0] // b, device=scores.device)
            own = scores.gather(1, cols)  # each query's own group, for the stats
            loss = self.spec.fn(scores, positive_index, **fn_opts)
        else:
            own = model(**batch["features"]).float().view(b, -1)
            if self.spec.needs_scores:
                teacher = batch.get("teacher_scores")
                if teacher is None:
                    teacher = torch.stack([batch["teacher_pos"], batch["teacher_neg"]], dim=1)
                loss = self.spec.fn(own, teacher.to(own.device), **fn_opts)
            else:
                loss = self.spec.fn(own, **fn_opts)
        with torch.no_grad():
            own = own.detach().float()
            stats = {"student_margin": float((own[:, :1] - own[:, 1:]).mean()),
                     "pair_accuracy": float((own[:, :1] > own[:, 1:]).float().mean())}
        return loss, stats


# ---------------------------------------------------------------------------------------------- the frozen teacher
def parameter_checksum(module: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer (names, shapes, exact bytes): equal iff the weights are."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class FrozenColbertTeacher:
    """TCT's tightly-coupled teacher: a trained raykd :class:`~raykd.models.colbert.ColBERT`, frozen.

    Frozen means: ``eval()`` (no dropout), ``requires_grad=False`` on every parameter, scoring under
    ``torch.no_grad()``, and a SHA-256 checksum of the weights taken when wrapped that :meth:`assert_unchanged`
    re-checks (the in-batch step calls it every ``check_teacher_every`` steps). Not an ``nn.Module`` on purpose:
    DDP and the optimizer never see it. ``bf16=True`` casts the weights to bfloat16 when the device is a GPU
    (ignored on CPU).

    :meth:`scores` gives the (B, N) MaxSim matrix of every query against every passage of the batch::

        teacher = FrozenColbertTeacher.from_pretrained("out/colbert-teacher/model")
        t = teacher.scores(queries, positives + negatives)     # (B, 2B)
    """

    def __init__(self, colbert: torch.nn.Module, device: str | torch.device = "cpu", bf16: bool = False):
        if not (hasattr(colbert, "embed") and hasattr(colbert, "similarity") and hasattr(colbert, "tokenize")):
            raise UserError(
                f"the TCT teacher must be a raykd ColBERT model (embed/similarity/tokenize); got {type(colbert).__name__}"
            )
        device = torch.device(device)
        self.colbert = colbert.to(device)
        self.bf16 = bool(bf16) and device.type == "cuda"
        if self.bf16:
            self.colbert.to(torch.bfloat16)
        self.colbert.eval()
        for p in self.colbert.parameters():
            p.requires_grad_(False)
        self.checksum = parameter_checksum(self.colbert)

    @classmethod
    def from_pretrained(cls, path: str, device: str | torch.device = "cpu", bf16: bool = False) -> FrozenColbertTeacher:
        """Load a ColBERT checkpoint written by raykd's train stage (``raykd_model.json`` kind ``colbert``)."""
        from raykd.models.base import read_raykd_config
        from raykd.models.colbert import ColBERT

        path = os.path.expanduser(str(path))
        if not os.path.isdir(path):
            raise UserError(f"TCT teacher {path} is not a folder: expected a raykd ColBERT checkpoint")
        saved = read_raykd_config(path)
        if not saved or saved.get("kind") != "colbert":
            kind = saved.get("kind") if saved else "none (no raykd_model.json)"
            raise UserError(
                f"TCT teacher {path} is not a raykd ColBERT checkpoint (raykd_model.json kind: {kind}); "
                "train one first: raykd train --student colbert ..."
            )
        return cls(ColBERT.from_pretrained(path), device=device, bf16=bf16)

    @property
    def device(self) -> torch.device:
        return next(self.colbert.parameters()).device

    def tokenize(self, queries: Sequence[str], passages: Sequence[str]) -> dict[str, torch.Tensor]:
        """ColBERT's own tokenisation of the batch (``query_*`` / ``passage_*`` tensors)."""
        return self.colbert.tokenize(list(queries), list(passages))

    @torch.no_grad()
    def token_vectors(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(q, q_mask, p, p_mask)``: ColBERT's normalised token vectors of the batch's queries and passages."""
        dev = self.device
        qm, pm = batch["query_attention_mask"].to(dev), batch["passage_attention_mask"].to(dev)
        q = self.colbert.embed(batch["query_input_ids"].to(dev), qm)
        p = self.colbert.embed(batch["passage_input_ids"].to(dev), pm)
        return q, qm, p, pm

    @torch.no_grad()
    def maxsim(self, q: torch.Tensor, q_mask: torch.Tensor, p: torch.Tensor, p_mask: torch.Tensor) -> torch.Tensor:
        """(Q, P) float32 MaxSim scores of every query against every passage."""
        return self.colbert.similarity(q, q_mask, p, p_mask, all_pairs=True).float()

    @torch.no_grad()
    def scores(self, queries: Sequence[str], passages: Sequence[str]) -> torch.Tensor:
        """(len(queries), len(passages)) teacher scores; ``len(passages)`` a multiple of ``len(queries)``."""
        return self.maxsim(*self.token_vectors(self.tokenize(queries, passages)))

    def assert_unchanged(self) -> None:
        """Raise if the teacher's weights differ in any bit from when it was wrapped."""
        now = parameter_checksum(self.colbert)
        if now != self.checksum:
            raise RuntimeError(f"the frozen TCT teacher's weights changed during training ({self.checksum[:12]} -> {now[:12]})")
        if self.colbert.training or any(p.requires_grad for p in self.colbert.parameters()):
            raise RuntimeError("the frozen TCT teacher was put back in training mode or had gradients re-enabled")
