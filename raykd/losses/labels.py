"""The no-teacher baseline: train on the labels alone (the positive is relevant, the negative is not), the way
the Margin-MSE paper's students were trained before distillation (Hofstätter et al. 2020, Table 2, "–" teacher):
pairwise softmax cross-entropy over (positive, negative), i.e. RankNet with target 1:

    L = mean_i  -log( exp(s+_i) / (exp(s+_i) + exp(s-_i)) )  =  mean_i log(1 + exp(-(s+_i - s-_i)))

Shapes: both inputs (B,).

Example::

    >>> import torch, math
    >>> from raykd.losses import labels_ce
    >>> round(float(labels_ce(torch.tensor([0.0]), torch.tensor([0.0]))), 6) == round(math.log(2), 6)
    True
"""

from __future__ import annotations

import torch

from raykd.losses._shapes import check_pairwise


def labels_ce(student_pos: torch.Tensor, student_neg: torch.Tensor) -> torch.Tensor:
    """Pairwise cross-entropy of ranking the positive above the negative; a scalar."""
    check_pairwise(student_pos=student_pos, student_neg=student_neg)
    return torch.mean(torch.nn.functional.softplus(-(student_pos - student_neg)))
