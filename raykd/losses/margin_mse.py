"""Margin-MSE (Hofstätter et al. 2020, "Improving Efficient Neural Ranking Models with Cross-Architecture
Knowledge Distillation", arXiv:2010.02666, Eq. 1).

    L = mean_i ( (s(q_i, p+_i) - s(q_i, p-_i))  -  (t(q_i, p+_i) - t(q_i, p-_i)) )²

The student matches the teacher's MARGIN between the positive and the negative passage, not its raw scores, so
each architecture keeps its own natural score range.

Shapes: all four inputs (B,), one value per (query, positive, negative) triple.

Example::

    >>> import torch
    >>> from raykd.losses import margin_mse
    >>> float(margin_mse(torch.tensor([3.0]), torch.tensor([1.0]), torch.tensor([10.0]), torch.tensor([9.0])))
    1.0
"""

from __future__ import annotations

import torch

from raykd.losses._shapes import check_pairwise


def margin_mse(student_pos: torch.Tensor, student_neg: torch.Tensor, teacher_pos: torch.Tensor,
               teacher_neg: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between student and teacher margins; a scalar."""
    check_pairwise(student_pos=student_pos, student_neg=student_neg, teacher_pos=teacher_pos, teacher_neg=teacher_neg)
    student_margin = student_pos - student_neg
    teacher_margin = (teacher_pos - teacher_neg).to(student_margin.dtype)
    return torch.mean((student_margin - teacher_margin) ** 2)
