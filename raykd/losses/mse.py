"""Pointwise MSE on the raw teacher scores: the Margin-MSE paper's comparison (Hofstätter et al. 2020, Sec. 4,
"MSE"), which forces the student into the teacher's score range.

    L = mean over the 2B (query, passage) pairs of (s(q, p) - t(q, p))²
      = ( mean_i (s+_i - t+_i)²  +  mean_i (s-_i - t-_i)² ) / 2

Shapes: all four inputs (B,).

Example::

    >>> import torch
    >>> from raykd.losses import pointwise_mse
    >>> float(pointwise_mse(torch.tensor([3.0]), torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([0.0])))
    2.5
"""

from __future__ import annotations

import torch

from raykd.losses._shapes import check_pairwise


def pointwise_mse(student_pos: torch.Tensor, student_neg: torch.Tensor, teacher_pos: torch.Tensor,
                  teacher_neg: torch.Tensor) -> torch.Tensor:
    """Mean squared error between student and teacher scores over all 2B pairs; a scalar."""
    check_pairwise(student_pos=student_pos, student_neg=student_neg, teacher_pos=teacher_pos, teacher_neg=teacher_neg)
    s = torch.cat([student_pos, student_neg])
    t = torch.cat([teacher_pos, teacher_neg]).to(s.dtype)
    return torch.mean((s - t) ** 2)
