"""Distillation losses: one per module, each a pure tensor function, plus the ``LOSSES`` registry by name.

    margin_mse        Margin-MSE (Hofstätter et al. 2020)                      margin_mse.py
    mse               pointwise MSE on raw teacher scores (the paper's comparison)  mse.py
    ranknet           teacher-margin weighted RankNet (the paper's comparison)  ranknet.py
    labels            no teacher: pairwise cross-entropy on the labels alone    labels.py

Adding a loss: put it in its own module here and give the module a ``LOSS_SPEC`` (a
:class:`~raykd.losses.registry.LossSpec`, or a list of them); it is found and registered when
``raykd.losses`` is imported, no edit of this file needed. See :mod:`raykd.losses.registry` for the
``batch_loss(model, batch, ctx)`` seam with the training loop.
"""

from __future__ import annotations

import importlib
import pkgutil

from raykd.losses.labels import labels_ce
from raykd.losses.margin_mse import margin_mse
from raykd.losses.mse import pointwise_mse
from raykd.losses.ranknet import weighted_ranknet
from raykd.losses.registry import LOSSES, BatchContext, LossSpec, get_loss, pairwise_batch_loss, register

__all__ = [
    "LOSSES",
    "BatchContext",
    "LossSpec",
    "get_loss",
    "labels_ce",
    "margin_mse",
    "pairwise_batch_loss",
    "pointwise_mse",
    "register",
    "weighted_ranknet",
]

register(LossSpec("margin_mse", margin_mse, description="MSE between student and teacher margins (pos - neg)"))
register(LossSpec("mse", pointwise_mse, description="pointwise MSE between student and raw teacher scores"))
register(LossSpec("ranknet", weighted_ranknet, description="RankNet weighted by the absolute teacher margin"))
register(LossSpec("labels", labels_ce, needs_scores=False, description="no teacher: pairwise CE on labels"))

_BUILTIN = {"labels", "margin_mse", "mse", "ranknet", "registry"}
for _m in pkgutil.iter_modules(__path__):
    if _m.name.startswith("_") or _m.name in _BUILTIN:
        continue
    _spec = getattr(importlib.import_module(f"{__name__}.{_m.name}"), "LOSS_SPEC", None)
    for _s in _spec if isinstance(_spec, (list, tuple)) else [_spec] if _spec is not None else []:
        register(_s)
