"""Losses by name: what the training loop needs to know about a loss, and its options.

A :class:`LossSpec` names a pure tensor function and says which training step runs it (``step``):

- ``pairwise``: one forward pass scores the B triples ``(s+, s-)``; the loss is ``fn(s+, s-, t+, t-)`` with the
  teacher's scores of the triple from ``raykd score`` (``needs_scores``), or ``fn(s+, s-)`` without them;
- ``inbatch``: every query is scored against every passage of the batch, by the student and, where the loss
  distils, by a frozen teacher run in the loop; the loss is ``fn`` of the two (B, 2B) score matrices (TCT);
- ``group``: every query with its group of 1+k passages (its positive, then k negatives; a triple is a group
  of 1+1); the loss is ``fn(S, T)`` of the (B, 1+k) student and teacher score matrices (``needs_scores``), or
  ``fn(S)`` without a teacher (listwise KL, ListNet, n-way Margin-MSE, InfoNCE).

The steps themselves run a model and, for ``inbatch``, a teacher: they live with the training code
(:mod:`raykd.stages.train_steps`), not here. Nothing here knows about models, Ray or storage.

Options: a loss declares its options with their defaults (``options``) and, where values need more than a type,
a ``check``. :meth:`LossSpec.resolve_options` is the one place where the user's options (the config's
``loss_options``, ``--loss-option KEY=VALUE`` on the command line) are checked: unknown names and bad values fail
with a :class:`~raykd.errors.UserError` that names the option and says what is allowed; string values (from
the command line) are converted to the default's type.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from raykd.errors import UserError

STEPS = ("pairwise", "inbatch", "group")
_TRUE, _FALSE = {"true", "yes", "on", "1"}, {"false", "no", "off", "0"}


@dataclass(frozen=True)
class LossSpec:
    """A loss as the training loop sees it.

    ``fn``: the pure tensor function; pairwise losses take ``(student_pos, student_neg, teacher_pos,
    teacher_neg)`` or, with ``needs_scores=False``, ``(student_pos, student_neg)``; in-batch losses take
    ``(student_scores, teacher_scores, positive_index, negative_index, **options)``; group losses take
    ``(student_scores, teacher_scores, **options)`` or, with ``needs_scores=False``, ``(student_scores,
    **options)``, the scores (B, 1+k) with each query's positive in column 0.
    ``step``: the training step that runs it (see the module docstring).
    ``options``: option name -> default. ``step_options``: the names among them that the training step reads
    and does not pass to ``fn`` (:meth:`fn_options`). ``check``: raises ValueError on a bad combination of
    resolved values."""

    name: str
    fn: Callable[..., torch.Tensor]
    needs_scores: bool = True
    description: str = ""
    step: str = "pairwise"
    options: dict[str, Any] = field(default_factory=dict)
    check: Callable[[dict], None] | None = None
    step_options: tuple[str, ...] = ()

    def __post_init__(self):
        if self.step not in STEPS:
            raise ValueError(f"loss {self.name}: unknown step {self.step!r}; expected one of {', '.join(STEPS)}")
        unknown = sorted(set(self.step_options) - set(self.options))
        if unknown:
            raise ValueError(f"loss {self.name}: step_options {', '.join(unknown)} are not among its options")

    def fn_options(self, resolved: dict) -> dict:
        """The resolved options that ``fn`` takes (all but ``step_options``)."""
        return {k: v for k, v in resolved.items() if k not in self.step_options}

    def resolve_options(self, given: dict | None) -> dict:
        """The defaults updated with ``given`` (None values ignored), each converted to its default's type."""
        given = {k: v for k, v in (given or {}).items() if v is not None}
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            known = ", ".join(self.options) if self.options else "none"
            raise UserError(f"loss {self.name} has no option {', '.join(unknown)}; its options: {known}")
        out = dict(self.options)
        for key, value in given.items():
            out[key] = _convert(self.name, key, value, self.options[key])
        if self.check is not None:
            try:
                self.check(out)
            except ValueError as e:
                raise UserError(f"loss {self.name}: {e}") from None
        return out


def _convert(loss: str, key: str, value: Any, default: Any) -> Any:
    kind = type(default)
    bad = UserError(f"loss {loss}: option {key}={value!r} is not a {kind.__name__} (default {default!r})")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).strip().lower() in _TRUE | _FALSE:
            return str(value).strip().lower() in _TRUE
        raise bad
    if kind in (int, float):
        if isinstance(value, bool):
            raise bad
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise bad from None
        if kind is int:
            if not number.is_integer():
                raise bad
            return int(number)
        return number
    return str(value)


LOSSES: dict[str, LossSpec] = {}


def register(spec: LossSpec) -> LossSpec:
    """Add (or replace) a loss under ``spec.name``."""
    LOSSES[spec.name] = spec
    return spec


def get_loss(name: str) -> LossSpec:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]
