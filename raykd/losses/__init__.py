"""Distillation losses: one per module, each a pure tensor function, plus the ``LOSSES`` registry by name.

    margin_mse        Margin-MSE (Hofstätter et al. 2020)                           margin_mse.py
    mse               pointwise MSE on raw teacher scores (the paper's comparison)  mse.py
    ranknet           teacher-margin weighted RankNet (the paper's comparison)      ranknet.py
    labels            no teacher: pairwise cross-entropy on the labels alone        labels.py
    tct               TCT-ColBERT: in-batch KL to a frozen teacher + CE (Lin et al. 2020)  tct.py

Listwise (step ``group``: each query with its positive and k negatives, scores (B, 1+k)):

    listwise_kl       KL of the softmaxes over the group, temperature T (Hinton et al. 2015)  listwise_kl.py
    listnet           ListNet top-one cross entropy (Cao et al. 2007)                 listnet.py
    nway_margin_mse   mean of the k pairwise Margin-MSE terms (Hofstätter et al. 2020)  nway_margin_mse.py
    infonce           no teacher: InfoNCE with hard + in-batch negatives (van den Oord et al. 2018; DPR)  infonce.py

Adding a loss: put its function in its own module here and register a
:class:`~raykd.losses.registry.LossSpec` below (the function, whether it needs teacher scores, which training
step runs it, its options). The training steps live in :mod:`raykd.stages.train_steps`.
"""

from __future__ import annotations

from raykd.losses import infonce as _infonce
from raykd.losses import listwise_kl as _listwise_kl
from raykd.losses import tct
from raykd.losses.infonce import in_batch_scores, infonce
from raykd.losses.labels import labels_ce
from raykd.losses.listnet import listnet
from raykd.losses.listwise_kl import listwise_kl
from raykd.losses.margin_mse import margin_mse
from raykd.losses.mse import pointwise_mse
from raykd.losses.nway_margin_mse import nway_margin_mse
from raykd.losses.ranknet import weighted_ranknet
from raykd.losses.registry import LOSSES, LossSpec, get_loss, register
from raykd.losses.tct import tct_loss

__all__ = [
    "LOSSES",
    "LossSpec",
    "get_loss",
    "in_batch_scores",
    "infonce",
    "labels_ce",
    "listnet",
    "listwise_kl",
    "margin_mse",
    "nway_margin_mse",
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
register(LossSpec(
    "listwise_kl", listwise_kl, step="group", options=_listwise_kl.OPTIONS, check=_listwise_kl.check_options,
    description="T² · KL(softmax(teacher/T) || softmax(student/T)) over each query's group of 1+k passages",
))
register(LossSpec("listnet", listnet, step="group",
                  description="ListNet: cross entropy of the top-one distributions over the group"))
register(LossSpec("nway_margin_mse", nway_margin_mse, step="group",
                  description="mean of the k Margin-MSE terms (positive vs each negative of the group)"))
register(LossSpec(
    "infonce", infonce, needs_scores=False, step="group", options=_infonce.OPTIONS, check=_infonce.check_options,
    step_options=_infonce.STEP_OPTIONS,
    description="no teacher: InfoNCE on the labels with the group's hard negatives and in-batch negatives",
))
