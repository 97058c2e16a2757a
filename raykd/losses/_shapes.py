"""Shape checks shared by the pairwise losses: clear ValueErrors that say how to fix the input."""

from __future__ import annotations

import torch


def check_pairwise(**tensors: torch.Tensor) -> None:
    """Every tensor must be 1-D and of the same length B (one value per triple)."""
    shapes = {}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of shape (B,), got {type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(
                f"{name} must have shape (B,) (one score per triple), got {tuple(t.shape)}; "
                f"squeeze a trailing dim with .squeeze(-1) or split a (B, 2) tensor with [:, 0] / [:, 1]"
            )
        shapes[name] = t.shape[0]
    if len(set(shapes.values())) > 1:
        raise ValueError(f"all inputs must have the same batch size B, got {shapes}")
    if next(iter(shapes.values()), 1) == 0:
        raise ValueError("empty batch: the loss of zero triples is undefined")
