"""In-batch negatives across DDP workers: gather every worker's passage encodings so each query is scored
against the passages of the *global* batch (TCT-ColBERT's in-batch distillation, widened beyond one device).

:func:`gather_rows` concatenates a (n_r, ...) tensor from every worker in rank order. Gradients flow back to
the worker that produced each row, summed over every worker's loss (the backward is an all-reduce, which gloo
and NCCL both support). Why that is exact: worker ``r`` computes the loss ``L_r`` of its own queries against
the gathered passages; its passages receive ``sum_r' dL_r'/dE_r``; DDP then averages the parameter gradients,
which gives the gradient of ``mean_r L_r``: with equal local batch sizes, the loss of one worker holding the
whole batch. (With unequal sizes it is the mean of the per-worker means.)

Workers may hold different numbers of rows (the last batch of a shard): sizes are exchanged first and rows
padded for the collective, then stripped. Outside ``torch.distributed`` (one process) every function returns
its input unchanged, so the same training code runs on one worker or many.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` when no process group is initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_sizes(n: int, device: torch.device) -> list[int]:
    _, size = world()
    local = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(local) for _ in range(size)]
    dist.all_gather(sizes, local)
    return [int(s.item()) for s in sizes]


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
        ctx.sizes, ctx.rank = sizes, rank
        longest = max(sizes)
        padded = torch.zeros((longest, *x.shape[1:]), dtype=x.dtype, device=x.device)
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)  # every worker's loss reaches the rows' owner
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None


def gather_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(all_rows, offset)``: ``x`` of every worker concatenated along dim 0 in rank order, and where this
    worker's rows start. Differentiable (see the module docstring)."""
    rank, size = world()
    if size == 1:
        return x, 0
    sizes = _all_sizes(x.shape[0], x.device)
    return _GatherRows.apply(x, sizes, rank), sum(sizes[:rank])


@torch.no_grad()
def gather_token_vectors(vectors: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather (n, L, d) token vectors and their (n, L) mask from every worker (no gradient: the teacher's).
    Sequence lengths differ between workers: each is padded to the longest with mask 0."""
    _, size = world()
    if size == 1:
        return vectors, mask
    longest = torch.tensor([vectors.shape[1]], dtype=torch.long, device=vectors.device)
    dist.all_reduce(longest, op=dist.ReduceOp.MAX)
    extra = int(longest.item()) - vectors.shape[1]
    if extra:
        vectors = F.pad(vectors, (0, 0, 0, extra))
        mask = F.pad(mask, (0, extra))
    sizes = _all_sizes(vectors.shape[0], vectors.device)
    rank = world()[0]
    return _GatherRows.apply(vectors, sizes, rank), _GatherRows.apply(mask, sizes, rank)
