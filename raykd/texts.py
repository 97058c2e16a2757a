"""Id -> text lookup shared by every stage: pid-sorted Arrow blocks, never one string array over 2 GiB.

Arrow's ``string`` type addresses its bytes with 32-bit offsets, and ``take``/``sort_by``/``concat`` over a
multi-chunk column first joins the chunks into one such array: MS MARCO's ~2.9 GB of passage text fails with
``ArrowInvalid: offset overflow while concatenating arrays``. A :class:`TextLookup` instead holds the texts as
a list of small blocks (``id`` int64 ascending, ``text`` string; each at most ``max_block_bytes``, default
64 MiB) plus the array of each block's first id, so a batch of ids is ``np.searchsorted`` to its blocks and
``take``n block by block; only the (small) answer is ever combined.

Built from the text store's corpus Parquet parts a record batch at a time: each batch is sorted by id and
appended to the current block while the ids keep ascending (MS MARCO's collection and BEIR's row-number pids
do); a collection in another order yields overlapping blocks, which are merged once into ascending ones.
``pids=`` keeps only the passages asked for (validation, re-ranking) while the parts stream by.

Sharing across processes lives with the stages (:mod:`raykd.stages.shared_texts`): ``share`` /
``share_passages`` put the blocks in Ray's object store once (one object per block, owned by the caller);
``SharedTexts.lookup`` in any task or actor maps them zero-copy, so a node holds one copy however many actors
read it. This module is plain pyarrow + numpy.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raykd import storage

DEFAULT_MAX_BLOCK_BYTES = 64 << 20
BATCH_ROWS = 65_536  # rows per Parquet record batch read (MS MARCO: ~22 MB of text)


def passage_text(title, text) -> pa.Array:
    """Vectorised ``title + " " + text`` (text alone where the title is empty), the BEIR convention."""
    title = pc.fill_null(title, "")
    joined = pc.binary_join_element_wise(title, text, " ")
    return pc.if_else(pc.equal(pc.utf8_length(title), 0), text, joined)


def _block(ids, texts) -> pa.Table:
    return pa.table({"id": pa.array(ids, pa.int64()), "text": pa.array(texts, pa.string())})


def _row_bytes(block: pa.Table) -> np.ndarray:
    """Bytes each row adds to a block: its text, its 4-byte offset, its 8-byte id and (rounded up) its bits in
    the validity bitmaps."""
    return pc.binary_length(block["text"]).to_numpy(zero_copy_only=False).astype(np.int64) + 13


def _cut(block: pa.Table, max_block_bytes: int) -> list[pa.Table]:
    """A sorted single-chunk block cut into consecutive slices of at most ``max_block_bytes`` (a row larger
    than that alone in its slice)."""
    if block.nbytes <= max_block_bytes or block.num_rows <= 1:
        return [block]
    return [block.slice(a, b - a) for a, b in _spans(_row_bytes(block), max_block_bytes)]


def _spans(row_bytes: np.ndarray, max_bytes: int) -> list[tuple[int, int]]:
    """Consecutive ``[start, end)`` row ranges of at most ``max_bytes`` each (at least one row each)."""
    cum = np.cumsum(row_bytes)
    max_bytes = max(1, max_bytes - 16)  # a block's fixed part: the extra offset, bitmap padding
    out, start, acc = [], 0, 0
    while start < len(cum):
        end = max(int(np.searchsorted(cum, acc + max_bytes, side="right")), start + 1)
        out.append((start, end))
        acc, start = int(cum[end - 1]), end
    return out


def _compact(t: pa.Table) -> pa.Table:
    """One chunk per column holding only the table's own rows (a slice keeps its parent's buffers alive)."""
    return pa.Table.from_batches(t.combine_chunks().to_batches()) if t.num_rows else t


def sorted_blocks(batches: Iterable[pa.Table | pa.RecordBatch], max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES,
                  ) -> list[pa.Table]:
    """``(id, text)`` batches -> blocks, each sorted by id and at most ``max_block_bytes``; consecutive blocks
    ascend when the input does. A batch must itself be under 2 GiB of text (record batches from Parquet are)."""
    blocks: list[pa.Table] = []
    cur: list[pa.Table] = []
    cur_bytes, cur_hi = 0, None
    for batch in batches:
        t = pa.table(batch) if isinstance(batch, pa.RecordBatch) else batch
        if t.num_rows == 0:
            continue
        t = t.combine_chunks()
        ids = t["id"].to_numpy()
        if ids.size > 1 and np.any(ids[1:] < ids[:-1]):
            t = t.sort_by("id")
        for piece in _cut(t, max_block_bytes):
            lo, nb = int(piece["id"][0].as_py()), piece.nbytes
            if cur and (cur_hi >= lo or cur_bytes + nb > max_block_bytes):
                blocks.append(_compact(pa.concat_tables(cur)))
                cur, cur_bytes = [], 0
            cur.append(piece)
            cur_bytes += nb
            cur_hi = int(piece["id"][-1].as_py())
    if cur:
        blocks.append(_compact(pa.concat_tables(cur)))
    return blocks


def _ascending(blocks: Sequence[pa.Table]) -> bool:
    his = [int(b["id"][-1].as_py()) for b in blocks]
    los = [int(b["id"][0].as_py()) for b in blocks]
    return all(h < lo for h, lo in zip(his, los[1:]))


def merge_blocks(blocks: Sequence[pa.Table], max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES) -> list[pa.Table]:
    """Blocks sorted each but overlapping (a collection not in id order) -> ascending blocks of at most
    ``max_block_bytes``: one argsort of the ids (8 bytes a row), then each new block gathered from its sources."""
    blocks = [b for b in blocks if b.num_rows]
    blocks.sort(key=lambda b: int(b["id"][0].as_py()))
    if _ascending(blocks):
        return list(blocks)
    ids = np.concatenate([b["id"].to_numpy() for b in blocks])
    src = np.concatenate([np.full(b.num_rows, i, np.int32) for i, b in enumerate(blocks)])
    row = np.concatenate([np.arange(b.num_rows, dtype=np.int64) for b in blocks])
    size = np.concatenate([_row_bytes(b) for b in blocks])
    order = np.argsort(ids, kind="stable")
    dup = ids[order][1:] == ids[order][:-1]
    if dup.any():
        raise ValueError(f"id {int(ids[order][1:][dup][0])} appears twice")
    out = []
    for start, end in _spans(size[order], max_block_bytes):
        sel = order[start:end]
        pieces = [blocks[s].take(pa.array(row[sel][src[sel] == s])) for s in np.unique(src[sel])]
        out.append(_compact(pa.concat_tables(pieces).sort_by("id")))
    return out


class TextLookup:
    """Texts by integer id over ascending, non-overlapping Arrow blocks (``id`` int64, ``text`` string)."""

    def __init__(self, blocks: Sequence[pa.Table], what: str = "id", where: str = ""):
        self.blocks = [b for b in blocks if b.num_rows]
        self.blocks.sort(key=lambda b: int(b["id"][0].as_py()))
        if not _ascending(self.blocks):
            raise ValueError("TextLookup needs ascending, non-overlapping blocks (see merge_blocks)")
        self.what, self.where = what, where
        self._keys = [b["id"].to_numpy() for b in self.blocks]  # zero-copy: int64 without nulls
        self._los = np.array([k[0] for k in self._keys], dtype=np.int64)

    def __len__(self) -> int:
        return sum(b.num_rows for b in self.blocks)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.blocks)

    def ids(self) -> np.ndarray:
        return np.concatenate(self._keys) if self._keys else np.empty(0, np.int64)

    def _locate(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Block and row of every id; a KeyError naming the first id that is not there."""
        blk = np.searchsorted(self._los, ids, side="right") - 1
        row = np.full(len(ids), -1, dtype=np.int64)
        for b in np.unique(blk[blk >= 0]):
            m = blk == b
            keys = self._keys[b]
            pos = np.minimum(np.searchsorted(keys, ids[m]), len(keys) - 1)
            row[m] = np.where(keys[pos] == ids[m], pos, -1)
        if (row < 0).any():
            bad = int(ids[row < 0][0])
            raise KeyError(f"{self.what} {bad} is not in {self.where or 'the lookup'}")
        return blk, row

    def take(self, ids) -> pa.Array:
        """The texts of ``ids`` in order, as one Arrow string array: for a batch (its text must stay under
        2 GiB); :meth:`texts` has no such bound."""
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size == 0:
            return pa.array([], pa.string())
        blk, row = self._locate(ids)
        pieces, where = [], []
        for b in np.unique(blk):
            m = np.flatnonzero(blk == b)
            pieces.append(self.blocks[b]["text"].take(pa.array(row[m])).combine_chunks())
            where.append(m)
        out = pa.concat_arrays(pieces)
        inverse = np.empty(len(ids), np.int64)
        inverse[np.concatenate(where)] = np.arange(len(ids))
        return out.take(pa.array(inverse))

    def texts(self, ids) -> list[str]:
        """The texts of ``ids`` in order, as Python strings (block by block: no combined array, any size)."""
        ids = np.asarray(ids, dtype=np.int64)
        out: list = [None] * len(ids)
        if ids.size == 0:
            return out
        blk, row = self._locate(ids)
        for b in np.unique(blk):
            m = np.flatnonzero(blk == b)
            for i, t in zip(m.tolist(), self.blocks[b]["text"].take(pa.array(row[m])).to_pylist()):
                out[i] = t
        return out

    def __getitem__(self, key: int) -> str:
        return self.texts([key])[0]

    @classmethod
    def from_table(cls, table: pa.Table, id_column: str, text_column: str, what: str = "id", where: str = "",
                   max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES) -> TextLookup:
        """A small table (queries: 808K MS MARCO queries are ~30 MB) as a lookup."""
        t = pa.table({"id": table[id_column], "text": table[text_column]})
        batches = [t.slice(i, BATCH_ROWS) for i in range(0, t.num_rows, BATCH_ROWS)]
        return cls(merge_blocks(sorted_blocks(batches, max_block_bytes), max_block_bytes), what, where)


def passage_batches(part_uris: Sequence[str], pids=None, batch_rows: int = BATCH_ROWS,
                    text_column: str | None = None) -> Iterator[pa.Table]:
    """``(id=pid, text)`` tables of the corpus parts, a record batch at a time; text is ``title + " " + text``
    (or ``text_column`` as it is, e.g. ``doc_id``); with ``pids``, only those passages are kept."""
    wanted = None if pids is None else pa.array(np.unique(np.asarray(pids, dtype=np.int64)))
    cols = ["pid", text_column] if text_column else ["pid", "title", "text"]
    for uri in part_uris:
        fs, path = storage.filesystem(str(uri))
        with fs.open(path, "rb") as f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=cols):
                if wanted is not None:
                    batch = batch.filter(pc.is_in(batch.column("pid"), wanted))
                    if batch.num_rows == 0:
                        continue
                text = batch.column(text_column) if text_column else passage_text(batch.column("title"),
                                                                                  batch.column("text"))
                yield pa.table({"id": batch.column("pid"), "text": text})


def passage_lookup(part_uris: Sequence[str], pids=None, max_block_bytes: int = DEFAULT_MAX_BLOCK_BYTES,
                   where: str = "the corpus", text_column: str | None = None) -> TextLookup:
    """The corpus parts (or only ``pids`` of them) as a :class:`TextLookup` in this process."""
    blocks = sorted_blocks(passage_batches(part_uris, pids, text_column=text_column), max_block_bytes)
    return TextLookup(merge_blocks(blocks, max_block_bytes), "pid", where)
