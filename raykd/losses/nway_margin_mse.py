"""n-way Margin-MSE: Margin-MSE (Hofstätter et al. 2020, "Improving Efficient Neural Ranking Models with
Cross-Architecture Knowledge Distillation", arXiv:2010.02666, Eq. 1) over a query's k negatives at once, the
mean of the k pairwise margin errors (as sentence-transformers' ``MarginMSELoss`` does with several negatives).

    L = mean_i (1/k) Σ_{j=1..k} ( (s_i0 − s_ij) − (t_i0 − t_ij) )²

Column 0 is the positive. With k = 1 this is exactly :func:`~raykd.losses.margin_mse.margin_mse`.

Shapes: ``student_scores`` and ``teacher_scores`` (B, 1+k), one row per query, positive first. No gradient
reaches the teacher.

Example::

    >>> import torch
    >>> from raykd.losses import nway_margin_mse
    >>> float(nway_margin_mse(torch.tensor([[3.0, 1.0, 2.0]]), torch.tensor([[10.0, 9.0, 9.0]])))
    0.5
"""

from __future__ import annotations

import torch

from raykd.losses._shapes import check_group


def nway_margin_mse(student_scores: torch.Tensor, teacher_scores: torch.Tensor) -> torch.Tensor:
    """Mean squared difference between student and teacher margins (positive − each negative); a scalar."""
    check_group(student_scores, teacher_scores)
    s = student_scores.float()
    t = teacher_scores.detach().to(s.dtype)
    student_margins = s[:, :1] - s[:, 1:]
    teacher_margins = t[:, :1] - t[:, 1:]
    return torch.mean((student_margins - teacher_margins) ** 2)
