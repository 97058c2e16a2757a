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


def check_group(student_scores: torch.Tensor, teacher_scores: torch.Tensor | None = None, *,
                min_size: int = 2) -> None:
    """Group (listwise) losses: ``student_scores`` is (B, 1+k), one row per query, its positive in column 0 and
    its k negatives after it; ``teacher_scores``, when given, has the same shape."""
    if not isinstance(student_scores, torch.Tensor):
        raise ValueError(f"student_scores must be a torch.Tensor of shape (B, 1+k), got {type(student_scores).__name__}")
    if student_scores.dim() != 2:
        raise ValueError(
            f"student_scores must have shape (B, 1+k) (one row per query: positive first, then k negatives), got "
            f"{tuple(student_scores.shape)}; reshape flat scores with .view(B, 1 + k), or stack pairwise "
            f"(B,) scores with torch.stack([pos, neg], dim=1)"
        )
    b, n = student_scores.shape
    if b == 0:
        raise ValueError("empty batch: the loss of zero groups is undefined")
    if n < min_size:
        raise ValueError(
            f"a group needs the positive and at least {min_size - 1} negative(s) (1+k >= {min_size} columns), got "
            f"{n} column(s)"
        )
    if teacher_scores is not None:
        if not isinstance(teacher_scores, torch.Tensor):
            raise ValueError(f"teacher_scores must be a torch.Tensor of shape {(b, n)}, got {type(teacher_scores).__name__}")
        if teacher_scores.shape != student_scores.shape:
            raise ValueError(
                f"teacher_scores has shape {tuple(teacher_scores.shape)} but student_scores has {(b, n)}; the teacher "
                f"must score the same B groups of 1+k passages in the same order (positive first)"
            )


def check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
