"""TCT-ColBERT: tightly-coupled in-batch distillation (Lin, Yang and Lin 2020, "Distilling Dense
Representations for Ranking using Tightly-Coupled Teachers", arXiv:2010.11386, Eq. 5-6 and Table 3).

A batch holds B triples ``(q_i, d_i+, d_i-)``. Its 2B passages are laid out as **all positives, then all
negatives**: column ``j < B`` is ``d_j+``, column ``B + j`` is ``d_j-``. Score matrices are ``(B, 2B)``:
``S[i, j] = phi(q_i, d_j)`` for every query against every passage of the batch (its own positive and negative
and everyone else's). With ``k`` queries scored against more passages (cross-device gathering) the matrix is
``(k, N)`` and ``positive_index`` says where each query's positive sits.

    P(d | q_i)      = softmax_j( S_student[i, j] )                 (student: dot product, no temperature)
    P_hat(d | q_i)  = softmax_j( S_teacher[i, j] / tau )           (teacher: ColBERT MaxSim)

    L = mean_i [ gamma * CE_i + (1 - gamma) * KL_i ]
    CE_i = -log P(d_i+ | q_i)                                      (labels, in-batch negatives)
    KL_i = sum_j P_hat(d_j | q_i) * (log P_hat(d_j | q_i) - log P(d_j | q_i))

The paper sums over queries (Eq. 6); raykd takes the mean over queries so the loss does not scale with the
batch size (the learning rate absorbs the constant). Paper defaults: ``tau = 0.25``, ``gamma = 0.1``; the
original code's combined mode, 0.5 * CE + 0.5 * KL, is ``gamma = 0.5``.

Table 3 ablation modes (``mode``):

- ``none``    (condition 1, bi-encoder PoolAvg): labels only, ``L = mean_i CE_i``; no teacher needed.
- ``triplet`` (condition 2): the KL term only over the query's own triple ``{d_i+, d_i-}`` (both softmaxes
  restricted to those two columns); the CE term stays in-batch.
- ``inbatch`` (condition 3, TCT-ColBERT): the KL term over every passage of the batch.

Options (``loss_options``): ``mode``, ``tau``, ``gamma``, ``cross_device`` and the teacher's ``teacher_bf16``,
``check_teacher_every`` (:data:`OPTIONS`). The frozen teacher and the in-batch training step that produce the
score matrices live with the training code (:mod:`raykd.stages.train_steps`); this module is pure tensor math.

Example::

    >>> import torch
    >>> s = torch.tensor([[2.0, 0.0, 1.0, 0.0], [0.0, 2.0, 0.0, 1.0]])    # B=2 queries x 2B=4 passages
    >>> t = torch.tensor([[3.0, 0.5, 2.0, 0.0], [0.0, 3.0, 0.0, 2.5]])
    >>> round(float(tct_loss(s, t, mode="inbatch", tau=0.25, gamma=0.1)), 4)
    0.3503
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MODES = ("none", "triplet", "inbatch")


def batch_positive_index(batch_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Columns of the positives in the (B, 2B) layout: query ``i``'s positive is column ``i``."""
    return torch.arange(batch_size, device=device)


def _check(student_scores: torch.Tensor, teacher_scores: torch.Tensor | None, positive_index: torch.Tensor) -> None:
    if student_scores.dim() != 2:
        raise ValueError(
            f"student_scores must be a (queries, passages) matrix, got shape {tuple(student_scores.shape)}; "
            "score every query against every passage of the batch (positives first, then negatives)"
        )
    k, n = student_scores.shape
    if teacher_scores is not None and teacher_scores.shape != student_scores.shape:
        raise ValueError(
            f"teacher_scores has shape {tuple(teacher_scores.shape)} but student_scores has {(k, n)}; "
            "both must score the same queries against the same passages in the same order"
        )
    if positive_index.shape != (k,):
        raise ValueError(f"positive_index must have one column per query, shape ({k},), got {tuple(positive_index.shape)}")
    if n < 2:
        raise ValueError(f"need at least 2 passages per query (a positive and a negative), got {n}")


def in_batch_ce(student_scores: torch.Tensor, positive_index: torch.Tensor) -> torch.Tensor:
    """Per-query softmax cross entropy on the labels, ``-log softmax(S[i])[positive_index[i]]``; shape (k,)."""
    return F.cross_entropy(student_scores.float(), positive_index, reduction="none")


def kl_distillation(student_scores: torch.Tensor, teacher_scores: torch.Tensor, tau: float = 0.25) -> torch.Tensor:
    """Per-query ``KL(softmax(teacher / tau) || softmax(student))`` over the columns given; shape (k,).

    The teacher side carries no gradient."""
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    log_p_student = F.log_softmax(student_scores.float(), dim=-1)
    log_p_teacher = F.log_softmax(teacher_scores.detach().float() / tau, dim=-1)
    return (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=-1)


def triplet_columns(scores: torch.Tensor, positive_index: torch.Tensor, negative_index: torch.Tensor) -> torch.Tensor:
    """The (k, 2) sub-matrix ``[S[i, pos_i], S[i, neg_i]]``: each query against its own triple only."""
    rows = torch.arange(scores.shape[0], device=scores.device)
    return torch.stack([scores[rows, positive_index], scores[rows, negative_index]], dim=1)


def tct_loss(
    student_scores: torch.Tensor,
    teacher_scores: torch.Tensor | None = None,
    positive_index: torch.Tensor | None = None,
    negative_index: torch.Tensor | None = None,
    *,
    mode: str = "inbatch",
    tau: float = 0.25,
    gamma: float = 0.1,
) -> torch.Tensor:
    """The TCT-ColBERT loss (see the module docstring), a scalar averaged over queries.

    ``student_scores``, ``teacher_scores``: (k, N) scores of k queries against N passages (N = 2B for one
    worker's batch). ``positive_index`` / ``negative_index``: (k,) column of each query's own positive /
    negative; by default the (B, 2B) layout, ``i`` and ``B + i`` (requires N == 2k). ``teacher_scores`` may be
    None only for ``mode="none"``."""
    if mode not in MODES:
        raise ValueError(f"unknown TCT mode {mode!r}; expected one of {', '.join(MODES)}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    k, n = student_scores.shape if student_scores.dim() == 2 else (0, 0)
    if positive_index is None or negative_index is None:
        if n != 2 * k:
            raise ValueError(
                f"scores of shape {(k, n)} are not the (B, 2B) batch layout; pass positive_index and negative_index"
            )
        positive_index = batch_positive_index(k, student_scores.device) if positive_index is None else positive_index
        negative_index = positive_index + k if negative_index is None else negative_index
    if mode == "none":
        _check(student_scores, None, positive_index)
        return in_batch_ce(student_scores, positive_index).mean()
    if teacher_scores is None:
        raise ValueError(f"mode {mode!r} distils from the teacher: teacher_scores is required")
    _check(student_scores, teacher_scores, positive_index)
    ce = in_batch_ce(student_scores, positive_index)
    if mode == "triplet":
        kl = kl_distillation(
            triplet_columns(student_scores, positive_index, negative_index),
            triplet_columns(teacher_scores, positive_index, negative_index),
            tau,
        )
    else:
        kl = kl_distillation(student_scores, teacher_scores, tau)
    return (gamma * ce + (1.0 - gamma) * kl).mean()


# ---------------------------------------------------------------------------------------------- options
#: the loss's options and defaults (``TrainConfig.loss_options``, ``--loss-option KEY=VALUE``); the training step
#: that runs the teacher reads the last three
OPTIONS = {
    "mode": "inbatch",  # none | triplet | inbatch (Table 3)
    "tau": 0.25,
    "gamma": 0.1,
    "cross_device": False,  # in-batch negatives gathered from every DDP worker
    "teacher_bf16": True,  # teacher weights in bf16 when training on GPU (ignored on CPU)
    "check_teacher_every": 0,  # verify the teacher's checksum every N steps (0: at every checkpoint)
}


def check_options(options: dict) -> None:
    """ValueError naming the option when a resolved value is out of range."""
    if options["mode"] not in MODES:
        raise ValueError(f"option mode={options['mode']!r} is not one of {', '.join(MODES)}")
    if not 0.0 <= options["gamma"] <= 1.0:
        raise ValueError(f"option gamma={options['gamma']} must be in [0, 1]")
    if options["tau"] <= 0:
        raise ValueError(f"option tau={options['tau']} must be > 0")
    if options["check_teacher_every"] < 0:
        raise ValueError(f"option check_teacher_every={options['check_teacher_every']} must be >= 0")
