"""Listwise KL distillation: the student's softmax over a query's group of 1+k passages learns the teacher's,
both softened by a temperature T (Hinton, Vinyals and Dean 2015, "Distilling the Knowledge in a Neural
Network", arXiv:1503.02531, Sec. 2), the n-way distillation loss of PyLate, Lightning IR and FlagEmbedding.

    p_i = softmax(t_i / T),   q_i = softmax(s_i / T)                  over the 1+k passages of query i
    L   = T² · mean_i KL(p_i || q_i) = T² · mean_i Σ_j p_ij (log p_ij − log q_ij)

The T² factor keeps the gradient's size independent of T (Hinton et al., Sec. 2); with T = 1 it is the plain
KL divergence, ``torch.nn.functional.kl_div(log_softmax(s), softmax(t), reduction="batchmean")``. Only score
differences within a row matter, so each architecture keeps its own score range; a higher T spreads the
teacher's mass over more negatives, a lower T concentrates it on the top passages.

Shapes: ``student_scores`` and ``teacher_scores`` (B, 1+k), one row per query (the positive first, then its k
negatives; the order does not change the loss as long as both follow it). No gradient reaches the teacher.

Example::

    >>> import torch
    >>> from raykd.losses import listwise_kl
    >>> float(listwise_kl(torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([[5.0, 4.0, 3.0]])))
    0.0
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raykd.losses._shapes import check_group, check_temperature

OPTIONS = {"temperature": 1.0}


def listwise_kl(student_scores: torch.Tensor, teacher_scores: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T² · mean_i KL(softmax(t_i / T) || softmax(s_i / T))`` over groups of 1+k passages; a scalar."""
    check_group(student_scores, teacher_scores)
    check_temperature(temperature)
    log_q = F.log_softmax(student_scores.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_scores.detach().float() / temperature, dim=-1)
    return temperature**2 * (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean()


def check_options(options: dict) -> None:
    """ValueError naming the option when a resolved value is out of range."""
    if not options["temperature"] > 0:
        raise ValueError(f"option temperature={options['temperature']} must be > 0")
