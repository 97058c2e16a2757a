"""Losses by name, and the seam between a loss and the training loop.

The training loop (``raykd.stages.train``) knows nothing about any particular loss. Per step it calls

    loss, stats = spec.batch_loss(model, batch, ctx)

where ``batch`` is what the collate step built for B training triples::

    batch = {
        "features":   dict of tensors: the student's inputs scoring the B triples in one forward pass,
                      ``model(**features).view(B, 2)`` = [[s(q_i, pos_i), s(q_i, neg_i)], ...]
                      (from ``spec.make_features(model, queries, positives, negatives)``,
                      default :func:`raykd.models.base.tokenize_triples`),
        "queries", "positives", "negatives":  the B texts each (lists of str), e.g. for a teacher run in the loop,
        "teacher_pos", "teacher_neg":  float32 (B,) ensemble teacher scores (only when ``spec.needs_scores``),
        "size":       B,
    }

and ``ctx`` is a :class:`BatchContext` (device, rank, world size, the loss options from the config, a
per-worker ``state`` dict and an ``all_gather`` that keeps gradients of the local part). ``model`` is the DDP
wrapped student: call it (its ``forward``) so DDP synchronises gradients; reach the bare module through
``model.module`` only for read-only things such as its tokenizer.

A loss that needs more than a pairwise score function (TCT-ColBERT: a frozen teacher run in the loop over
in-batch pairs, gathered across workers) registers a :class:`LossSpec` with its own ``batch_loss``, ``setup``
(called once per worker before the first step, e.g. to load the teacher into ``ctx.state``) and
``make_features``. ``needs_scores=False`` lets ``raykd train`` run on the text store's triples without a scores
output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class BatchContext:
    """What a ``batch_loss`` may use besides the model and the batch."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    step: int = 0
    options: dict = field(default_factory=dict)  # TrainConfig.loss_options (e.g. {"tau": 0.25, "gamma": 0.1})
    config: dict = field(default_factory=dict)  # the whole TrainConfig as a dict (read-only)
    state: dict = field(default_factory=dict)  # per-worker cache that lives across steps (e.g. a frozen teacher)

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate ``t`` from every worker along dim 0 (rank order); the local slice keeps its gradient.
        Every worker must call it with the same shape. Identity with one worker."""
        import torch.distributed as dist

        if self.world_size == 1 or not dist.is_available() or not dist.is_initialized():
            return t
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.detach().contiguous())
        parts[self.rank] = t
        return torch.cat(parts, 0)


BatchLoss = Callable[[torch.nn.Module, dict, BatchContext], "tuple[torch.Tensor, dict[str, float]]"]


@dataclass(frozen=True)
class LossSpec:
    """A loss as the training loop sees it.

    ``fn``: the pure tensor function; pairwise losses take ``(student_pos, student_neg, teacher_pos,
    teacher_neg)`` or, with ``needs_scores=False``, ``(student_pos, student_neg)``.
    ``batch_loss``: overrides the default pairwise step (see the module docstring)."""

    name: str
    fn: Callable[..., torch.Tensor]
    needs_scores: bool = True
    description: str = ""
    batch_loss: BatchLoss | None = None
    setup: Callable[[BatchContext], None] | None = None
    make_features: Callable[..., dict] | None = None

    def step_loss(self, model: torch.nn.Module, batch: dict, ctx: BatchContext) -> tuple[torch.Tensor, dict]:
        if self.batch_loss is not None:
            return self.batch_loss(model, batch, ctx)
        return pairwise_batch_loss(model, batch, ctx, self)

    def features(self, model: torch.nn.Module, queries: list[str], positives: list[str], negatives: list[str]) -> dict:
        from raykd.models.base import tokenize_triples

        return (self.make_features or tokenize_triples)(model, queries, positives, negatives)


def pairwise_batch_loss(model: torch.nn.Module, batch: dict, ctx: BatchContext, spec: LossSpec) -> tuple[torch.Tensor, dict]:
    """The default step: score the B triples in one forward pass, apply ``spec.fn``."""
    b = batch["size"]
    scores = model(**batch["features"]).float().view(b, 2)
    s_pos, s_neg = scores[:, 0], scores[:, 1]
    if spec.needs_scores:
        loss = spec.fn(s_pos, s_neg, batch["teacher_pos"].to(s_pos.device), batch["teacher_neg"].to(s_pos.device))
    else:
        loss = spec.fn(s_pos, s_neg)
    with torch.no_grad():
        stats = {"student_margin": float((s_pos - s_neg).mean()), "pair_accuracy": float((s_pos > s_neg).float().mean())}
    return loss, stats


LOSSES: dict[str, LossSpec] = {}


def register(spec: LossSpec) -> LossSpec:
    """Add (or replace) a loss under ``spec.name``."""
    LOSSES[spec.name] = spec
    return spec


def get_loss(name: str) -> LossSpec:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]

