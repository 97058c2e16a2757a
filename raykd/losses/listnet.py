"""ListNet with top-one probabilities (Cao, Qin, Liu, Tsai and Li 2007, "Learning to Rank: From Pairwise
Approach to Listwise Approach", ICML, Sec. 4): the cross entropy between the teacher's and the student's
top-one distributions over a query's group of 1+k passages.

    P_t(j | q_i) = softmax(t_i)_j,   P_s(j | q_i) = softmax(s_i)_j
    L = mean_i − Σ_j P_t(j | q_i) · log P_s(j | q_i)

It differs from :func:`~raykd.losses.listwise_kl.listwise_kl` at T = 1 only by the teacher's entropy, a
constant: same gradient, but the loss does not reach 0 when the student matches the teacher (it reaches the
teacher's entropy). Cao et al. use the exponential as the score transform φ, i.e. the softmax above.

Shapes: ``student_scores`` and ``teacher_scores`` (B, 1+k), one row per query, positive first. No gradient
reaches the teacher.

Example::

    >>> import torch, math
    >>> from raykd.losses import listnet
    >>> loss = listnet(torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 1.0]]))
    >>> round(float(loss), 6) == round(math.log(2), 6)
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raykd.losses._shapes import check_group


def listnet(student_scores: torch.Tensor, teacher_scores: torch.Tensor) -> torch.Tensor:
    """Cross entropy of the student's top-one distribution against the teacher's, mean over queries; a scalar."""
    check_group(student_scores, teacher_scores)
    p_teacher = F.softmax(teacher_scores.detach().float(), dim=-1)
    return -(p_teacher * F.log_softmax(student_scores.float(), dim=-1)).sum(dim=-1).mean()
