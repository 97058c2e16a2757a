"""The text lookup (:mod:`raykd.texts`) shared through Ray's object store: one object per pid-sorted block,
read and sorted by one Ray task per corpus part, so the driver never holds the texts and every actor on a node
maps the same blocks zero-copy."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import ray

from raykd.texts import DEFAULT_MAX_BLOCK_BYTES, TextLookup, merge_blocks, passage_batches, sorted_blocks


@dataclass
class SharedTexts:
    """Object-store references to a lookup's blocks: small and picklable, so tasks and actors take it as an
    argument; :meth:`lookup` maps the blocks zero-copy (Arrow buffers in the node's shared memory)."""

    refs: list
    what: str = "id"
    where: str = ""

    def lookup(self) -> TextLookup:
        return TextLookup(ray.get(list(self.refs)), self.what, self.where)


def share(lookup: TextLookup) -> SharedTexts:
    """Put a lookup built in this process into the object store, one object per block."""
    return SharedTexts([ray.put(b) for b in lookup.blocks], lookup.what, lookup.where)


def _part_blocks(uri: str, max_block_bytes: int, pids) -> Iterator[Any]:
    """Ray generator task body: one corpus part's sorted blocks, each preceded by its size (so the caller
    never fetches a block to learn about it)."""
    for b in sorted_blocks(passage_batches([uri], pids), max_block_bytes):
        yield {"rows": b.num_rows, "nbytes": b.nbytes, "lo": int(b["id"][0].as_py()), "hi": int(b["id"][-1].as_py())}
        yield b


def _merged(max_block_bytes: int, *blocks: pa.Table) -> Iterator[pa.Table]:
    """Ray generator task body: overlapping blocks (a collection not in pid order) merged into ascending ones."""
    for b in merge_blocks(blocks, max_block_bytes):  # noqa: UP028  Ray sends values in: `yield from` a list fails
        yield b


def share_passages(part_uris: Sequence[str], pids=None, max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES,
                   where: str = "the corpus", memory: int | None = None) -> SharedTexts:
    """The corpus parts as blocks in the object store, read and sorted by one Ray task per part (the driver
    never holds the texts); the blocks are owned by the caller, so they live as long as it does."""
    read = ray.remote(_part_blocks).options(num_cpus=0.25, memory=memory)
    gens = [read.remote(str(u), max_block_bytes, pids) for u in part_uris]
    metas, refs = [], []
    for g in gens:
        for meta_ref in g:
            metas.append(ray.get(meta_ref))
            refs.append(next(g))
    order = sorted(range(len(metas)), key=lambda i: metas[i]["lo"])
    metas, refs = [metas[i] for i in order], [refs[i] for i in order]
    if any(a["hi"] >= b["lo"] for a, b in zip(metas, metas[1:])):  # not in pid order: one merge task
        merge = ray.remote(_merged).options(num_cpus=0.25, memory=memory)
        refs = list(merge.remote(max_block_bytes, *refs))
    return SharedTexts(refs, "pid", where)
