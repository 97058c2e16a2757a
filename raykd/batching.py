"""The teacher's batch function: how one block of tokenised (query, passage) pairs becomes forward passes.

    block of pairs  ->  sort by length (bucketing)  ->  micro-batches of ``batch_size`` pairs
                    ->  pad each to its longest pair, rounded up to a multiple of 8
                    ->  forward under bf16 autocast on CUDA  ->  scores back in block order

The scorer pipeline's actors (:class:`raykd.stages.scoring.TeacherScorer`, one per scorer in each
ensemble actor) run a block through :func:`score_block` and do nothing else with the model; ``bench/gpu.py``
times the same function on a GPU without Ray. Nothing here knows about Ray (imports: numpy and torch).

Pairs come as a ragged array: a list of id lists, or anything with Arrow's ``ListArray`` shape
(``flatten()`` and ``offsets``; a ``ChunkedArray`` is combined first), so an actor hands over a Ray Data
column without turning it into Python lists.

A model may take more than one sequence per pair: ``features`` maps ``<prefix>input_ids`` (and optionally
``<prefix>token_type_ids``) to ragged columns, e.g. ``query_input_ids`` + ``passage_input_ids`` for a
bi-encoder, ColBERT, PreTTR or TK. Each sequence group is padded on its own and gets its own
``<prefix>attention_mask``; a pair's length (what bucketing sorts by) is the sum over its groups. Causal LMs
read their answer at the last position, so they are padded on the left (``padding_side="left"``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

PAD_TO_MULTIPLE_OF = 8  # tensor cores work on multiples of 8 in bf16


@dataclass
class Ragged:
    """Variable-length rows as one flat ``values`` array and ``offsets`` (row i = values[offsets[i]:offsets[i+1]])."""

    values: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets).astype(np.int32)

    @classmethod
    def of(cls, rows: Any) -> Ragged:
        """From a ``Ragged``, an Arrow list (chunked) array, or a sequence of id sequences."""
        if isinstance(rows, Ragged):
            return rows
        if hasattr(rows, "combine_chunks"):  # pyarrow ChunkedArray
            rows = rows.combine_chunks()
        if hasattr(rows, "offsets") and hasattr(rows, "flatten"):  # pyarrow ListArray, possibly a slice
            offsets = rows.offsets.to_numpy().astype(np.int64)
            values = rows.flatten().to_numpy(zero_copy_only=False)
            return cls(values.astype(np.int64, copy=False), offsets - offsets[0])
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        values = np.fromiter((t for r in rows for t in r), dtype=np.int64, count=int(offsets[-1]))
        return cls(values, offsets)

    @classmethod
    def from_lengths(cls, values: np.ndarray, lengths: np.ndarray) -> Ragged:
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(np.asarray(values, dtype=np.int64), offsets)


def padded_length(longest: int, pad_to_multiple_of: int = PAD_TO_MULTIPLE_OF) -> int:
    """``longest`` rounded up to a multiple of ``pad_to_multiple_of``."""
    if pad_to_multiple_of and longest % pad_to_multiple_of:
        longest += pad_to_multiple_of - longest % pad_to_multiple_of
    return longest


PADDING_SIDES = ("right", "left")


def pad_rows(rows: Ragged, index: np.ndarray, pad_id: int = 0,
             pad_to_multiple_of: int = PAD_TO_MULTIPLE_OF, padding_side: str = "right") -> tuple[np.ndarray, np.ndarray]:
    """Rows ``index`` of ``rows`` as one (n, L) int64 matrix padded with ``pad_id`` to the longest of them
    (rounded up to a multiple of ``pad_to_multiple_of``), and the (n, L) attention mask. ``padding_side``:
    ``right`` (tokens first) or ``left`` (tokens last, for causal LMs)."""
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {', '.join(PADDING_SIDES)}, got {padding_side!r}")
    starts = rows.offsets[index]
    lengths = rows.offsets[index + 1] - starts
    width = padded_length(int(lengths.max(initial=0)), pad_to_multiple_of)
    cols = np.arange(width)
    shift = (width - lengths) if padding_side == "left" else np.zeros_like(lengths)
    mask = (cols[None, :] >= shift[:, None]) & (cols[None, :] < (shift + lengths)[:, None])
    out = np.full((len(index), width), pad_id, dtype=np.int64)
    out[mask] = rows.values[(starts[:, None] + cols[None, :] - shift[:, None])[mask]]
    return out, mask.astype(np.int64)


def collate(input_ids: Any, token_type_ids: Any = None, pad_id: int = 0,
            pad_to_multiple_of: int = PAD_TO_MULTIPLE_OF) -> dict[str, torch.Tensor]:
    """Pad a batch of id lists to its longest (a multiple of ``pad_to_multiple_of``) with the attention mask
    and, if given, the token type ids (padded with 0): the model's keyword arguments as tensors."""
    ids = Ragged.of(input_ids)
    index = np.arange(len(ids))
    x, mask = pad_rows(ids, index, pad_id, pad_to_multiple_of)
    out = {"input_ids": torch.from_numpy(x), "attention_mask": torch.from_numpy(mask)}
    if token_type_ids is not None:
        out["token_type_ids"] = torch.from_numpy(pad_rows(Ragged.of(token_type_ids), index, 0, pad_to_multiple_of)[0])
    return out


@dataclass
class BlockScores:
    """What :func:`score_block` returns, in the block's order."""

    scores: np.ndarray  # float32 (n,)
    lengths: np.ndarray  # int32 (n,): real tokens of each pair
    padded_lengths: np.ndarray  # int32 (n,): the padded length of the forward pass the pair was in
    forward_passes: int


def batch_order(lengths: np.ndarray, bucket: bool = True) -> np.ndarray:
    """The order pairs go into micro-batches: by length (stable) when bucketing, else as given."""
    return np.argsort(lengths, kind="stable") if bucket else np.arange(len(lengths))


def sequence_groups(features: Mapping[str, Any]) -> dict[str, tuple[Ragged, Ragged | None]]:
    """``{prefix: (input_ids, token_type_ids or None)}`` of a features mapping (see the module docstring)."""
    groups: dict[str, tuple[Ragged, Ragged | None]] = {}
    for key, col in features.items():
        if not key.endswith("input_ids") or col is None:
            continue
        prefix = key[: -len("input_ids")]
        types = features.get(prefix + "token_type_ids")
        types = Ragged.of(types) if types is not None else None
        if types is not None and len(types.values) == 0:
            types = None  # a tokenizer without segment ids gives empty rows
        groups[prefix] = (Ragged.of(col), types)
    if not groups:
        raise ValueError(f"features need at least one '<prefix>input_ids' column, got {sorted(features)}")
    sizes = {len(ids) for ids, _ in groups.values()}
    if len(sizes) != 1:
        raise ValueError(f"every sequence group needs one row per pair, got {sizes} rows")
    return groups


def score_block(
    model: Callable[..., torch.Tensor],
    input_ids: Any = None,
    token_type_ids: Any = None,
    *,
    batch_size: int,
    pad_id: int = 0,
    device: str | torch.device | None = None,
    bucket: bool = True,
    autocast: bool | None = None,
    pad_to_multiple_of: int = PAD_TO_MULTIPLE_OF,
    features: Mapping[str, Any] | None = None,
    padding_side: str = "right",
) -> BlockScores:
    """Score one block of tokenised pairs.

    ``model(input_ids=, attention_mask=[, token_type_ids=])`` returns one score per row (a
    :class:`~raykd.models.cross_encoder.CrossEncoder`); with ``features`` (instead of ``input_ids`` /
    ``token_type_ids``) it gets ``<prefix>input_ids``, ``<prefix>attention_mask`` [and
    ``<prefix>token_type_ids``] per sequence group (a bi-encoder: ``query_*`` and ``passage_*``).
    ``bucket``: sort the block by length so each forward pass pads to similar lengths (False: micro-batches in
    the given order, the baseline). ``autocast``: bf16 autocast; None means on CUDA only. ``padding_side``:
    ``left`` for causal LMs. Scores stay on the device until the block is done, so the host pads the next
    micro-batch while the GPU runs the last one."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if features is None:
        features = {"input_ids": input_ids, "token_type_ids": token_type_ids}
    elif input_ids is not None or token_type_ids is not None:
        raise ValueError("give either input_ids/token_type_ids or features, not both")
    groups = sequence_groups(features)
    n = len(next(iter(groups.values()))[0])
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if autocast is None:
        autocast = device.type == "cuda"
    lengths = sum(ids.lengths for ids, _ in groups.values()).astype(np.int32)
    order = batch_order(lengths, bucket)
    padlen = np.zeros(n, dtype=np.int32)
    outs = []
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        for a in range(0, len(order), batch_size):
            idx = order[a : a + batch_size]
            feats = {}
            width = 0
            for prefix, (ids, types) in groups.items():
                x, mask = pad_rows(ids, idx, pad_id, pad_to_multiple_of, padding_side)
                feats[prefix + "input_ids"] = torch.from_numpy(x).to(device, non_blocking=True)
                feats[prefix + "attention_mask"] = torch.from_numpy(mask).to(device, non_blocking=True)
                if types is not None:
                    t = pad_rows(types, idx, 0, pad_to_multiple_of, padding_side)[0]
                    feats[prefix + "token_type_ids"] = torch.from_numpy(t).to(device)
                width += x.shape[1]
            outs.append(model(**feats).float().reshape(-1))
            padlen[idx] = width
    scores = np.empty(n, dtype=np.float32)
    if outs:
        scores[order] = torch.cat(outs).cpu().numpy()
    return BlockScores(scores, lengths, padlen, len(outs))
