"""Distillation losses: one per module, each a pure tensor function, plus the ``LOSSES`` registry by name.

    margin_mse        Margin-MSE (Hofstätter et al. 2020)                           margin_mse.py
    mse               pointwise MSE on raw teacher scores (the paper's comparison)  mse.py
    ranknet           teacher-margin weighted RankNet (the paper's comparison)      ranknet.py
    labels            no teacher: pairwise cross-entropy on the labels alone        labels.py
    tct               TCT-ColBERT: in-batch KL to a frozen teacher + CE (Lin et al. 2020)  tct.py

Adding a loss: put its function in its own module here and register a
:class:`~raykd.losses.registry.LossSpec` below (the function, whether it needs teacher scores, which training
step runs it, its options). The training steps live in :mod:`raykd.stages.train_steps`.
"""

from __future__ import annotations

from raykd.losses import tct
from raykd.losses.labels import labels_ce
from raykd.losses.margin_mse import margin_mse
from raykd.losses.mse import pointwise_mse
from raykd.losses.ranknet import weighted_ranknet
from raykd.losses.registry import LOSSES, LossSpec, get_loss, register
from raykd.losses.tct import tct_loss

__all__ = [
    "LOSSES",
    "LossSpec",
    "get_loss",
    "labels_ce",
    "margin_mse",
    "pointwise_mse",
    "register",
    "tct_loss",
    "weighted_ranknet",
]

register(LossSpec("margin_mse", margin_mse, description="MSE between student and teacher margins (pos - neg)"))
register(LossSpec("mse", pointwise_mse, description="pointwise MSE between student and raw teacher scores"))
register(LossSpec("ranknet", weighted_ranknet, description="RankNet weighted by the absolute teacher margin"))
register(LossSpec("labels", labels_ce, needs_scores=False, description="no teacher: pairwise CE on labels"))
register(LossSpec(
    "tct", tct_loss, needs_scores=False, step="inbatch", options=tct.OPTIONS, check=tct.check_options,
    description="TCT-ColBERT: in-batch KL from a frozen ColBERT teacher run in the loop + CE on labels",
))
