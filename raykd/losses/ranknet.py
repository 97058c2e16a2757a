"""Weighted RankNet: the Margin-MSE paper's pairwise comparison loss (Hofstätter et al. 2020, Sec. 4), RankNet
(Burges et al. 2005) with each pair's target direction and weight taken from the teacher:

    Δs_i = s+_i - s-_i,   Δt_i = t+_i - t-_i
    L = mean_i  |Δt_i| · log(1 + exp(-sign(Δt_i) · Δs_i))

A pair the teacher separates by a large margin counts more; a pair the teacher ranks the other way round
(Δt_i < 0) pushes the student to rank it that way too; a pair the teacher ties (Δt_i = 0) contributes nothing.
(The paper states the loss in words; this is our reading of it: the teacher margin as RankNet's pair weight.)

Shapes: all four inputs (B,).

Example::

    >>> import torch, math
    >>> from raykd.losses import weighted_ranknet
    >>> loss = weighted_ranknet(torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([0.0]))
    >>> round(float(loss), 6) == round(2 * math.log(2), 6)
    True
"""

from __future__ import annotations

import torch

from raykd.losses._shapes import check_pairwise


def weighted_ranknet(student_pos: torch.Tensor, student_neg: torch.Tensor, teacher_pos: torch.Tensor,
                     teacher_neg: torch.Tensor) -> torch.Tensor:
    """RankNet's pairwise logistic loss weighted by the absolute teacher margin; a scalar."""
    check_pairwise(student_pos=student_pos, student_neg=student_neg, teacher_pos=teacher_pos, teacher_neg=teacher_neg)
    ds = student_pos - student_neg
    dt = (teacher_pos - teacher_neg).to(ds.dtype)
    return torch.mean(dt.abs() * torch.nn.functional.softplus(-torch.sign(dt) * ds))
