"""InfoNCE on the labels (van den Oord, Li and Vinyals 2018, "Representation Learning with Contrastive
Predictive Coding", arXiv:1807.03748, Eq. 4), with hard negatives and in-batch negatives as in DPR (Karpukhin
et al. 2020, "Dense Passage Retrieval for Open-Domain Question Answering", Sec. 3.2): no teacher, the
labels-only baseline of the listwise losses.

    L = mean_i −log( exp(S_i,pos(i) / τ) / Σ_j exp(S_ij / τ) )

``S`` holds query i's scores against its candidates:

- hard negatives only: ``S`` is the (B, 1+k) group matrix, the positive in column 0 (``positive_index`` None);
- with in-batch negatives: ``S`` is (B, N), every query against every passage of the batch (N = B·(1+k), or
  the global batch's passages gathered from every worker), built by :func:`in_batch_scores` from the query and
  passage vectors of a bi-encoder; ``positive_index`` gives the column of each query's own positive.

τ (``temperature``) divides the scores; 1 suits dot products of unnormalised vectors, ~0.05 cosine
similarities (sentence-transformers' ``MultipleNegativesRankingLoss`` uses scale 20, i.e. τ = 0.05).

Options (``loss_options``): ``temperature``; the training step reads ``in_batch`` (score every passage of the
batch, default true) and ``cross_device`` (gather the passages of every DDP worker, :mod:`raykd.losses.gather`).

Example::

    >>> import torch, math
    >>> from raykd.losses import infonce
    >>> loss = infonce(torch.tensor([[1.0, 1.0, 1.0]]))          # three equal scores: -log(1/3)
    >>> round(float(loss), 6) == round(math.log(3), 6)
    True
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raykd.losses._shapes import check_group, check_temperature

OPTIONS = {"temperature": 1.0, "in_batch": True, "cross_device": False}
STEP_OPTIONS = ("in_batch", "cross_device")  # read by the training step, not passed to :func:`infonce`


def infonce(student_scores: torch.Tensor, positive_index: torch.Tensor | None = None, *,
            temperature: float = 1.0) -> torch.Tensor:
    """Softmax cross entropy of each query's positive against all its candidates, mean over queries; a scalar.

    ``student_scores``: (B, 1+k) with the positive in column 0, or (B, N) with ``positive_index`` (B,)."""
    check_group(student_scores)
    check_temperature(temperature)
    b = student_scores.shape[0]
    if positive_index is None:
        positive_index = torch.zeros(b, dtype=torch.long, device=student_scores.device)
    elif positive_index.shape != (b,):
        raise ValueError(
            f"positive_index must hold one column per query, shape ({b},), got {tuple(positive_index.shape)}; "
            f"in_batch_scores() returns it for the in-batch layout"
        )
    return F.cross_entropy(student_scores.float() / temperature, positive_index.long())


def in_batch_scores(query_vectors: torch.Tensor, passage_vectors: torch.Tensor,
                    cross_device: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, positive_index)``: every query of the batch against every passage, for :func:`infonce`.

    ``query_vectors`` (B, d); ``passage_vectors`` (B·(1+k), d) group by group: query i's positive at row
    i·(1+k), then its k negatives. With ``cross_device`` the passages of every DDP worker are gathered
    (:func:`raykd.losses.gather.gather_rows`; gradients flow back to their worker), so S is (B, N_global) and
    query i's positive sits at (offset + i)·(1+k). Outside ``torch.distributed`` the two layouts are equal."""
    from raykd.losses.gather import gather_rows

    if query_vectors.dim() != 2 or passage_vectors.dim() != 2:
        raise ValueError(
            f"expected (B, d) query vectors and (B·(1+k), d) passage vectors, got {tuple(query_vectors.shape)} and "
            f"{tuple(passage_vectors.shape)}; pool token vectors into one vector per text first"
        )
    b, n = query_vectors.shape[0], passage_vectors.shape[0]
    if b == 0 or n % b or n // b < 1:
        raise ValueError(
            f"{n} passage vectors for {b} queries: every query needs its group of 1+k passages (a multiple of B), "
            f"positive first"
        )
    group = n // b
    offset = 0
    if cross_device:
        passage_vectors, offset = gather_rows(passage_vectors)
        offset //= group
    scores = query_vectors.float() @ passage_vectors.float().T
    positive_index = (offset + torch.arange(b, device=scores.device)) * group
    return scores, positive_index


def check_options(options: dict) -> None:
    """ValueError naming the option when a resolved value is out of range."""
    if not options["temperature"] > 0:
        raise ValueError(f"option temperature={options['temperature']} must be > 0")
