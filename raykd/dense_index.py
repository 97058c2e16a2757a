"""The dense index format (``raykd.dense_index`` v1) and searching it: one shard at a time, or merged.

Layout under the index URI (what ``raykd index`` writes)::

    shards/shard-NNNNN/ids.parquet      pid int64, doc_id string; row i is the shard's Faiss label i
    shards/shard-NNNNN/vectors.npy      float32 (rows, dim) passage vectors, same row order
    shards/shard-NNNNN/encoded.json     commit point of the shard's vectors: rows, dim, first_row
    shards/shard-NNNNN/index.faiss      the shard's Faiss index (faiss.write_index), inner product
    shards/shard-NNNNN/shard.json       commit point of the shard's index: rows, dim, first_row, factory, ntotal
    trained.faiss                       (IVF/PQ factories only) the trained, empty index every shard starts from,
                                        so all shards share ONE coarse quantizer (and PQ codebooks)
    merged/index.faiss, merged/ids.parquet, merged/merged.json   (only if a merge was asked for)
    manifest.json                       stage "index"; inputs.encoder = the resolved encoder spec (search
                                        encodes queries with it; ``precision`` auto|fp32|bf16, read as fp32
                                        when absent: indexes written before it existed were fp32 on CPU),
                                        config.factory, counts.dim, parts = the shard table
                                        [{name, rows, first_row}], stats (``encode_dtype``: float32 |
                                        bfloat16 | mixed, what the actors used), timings; written last

Shard s holds the corpus rows ``[first_row, first_row + rows)`` in the text store's part order; global row =
``first_row + label``. Scores are inner products (for an L2-normalised encoder: cosine).

Large files never pass through memory as bytes: indexes are written with ``faiss.write_index`` to local disk
and moved or uploaded from the file (:func:`write_index`), read with ``faiss.read_index`` from a local file or
a download (:func:`read_index`), and vectors are streamed into ``.npy`` (:class:`NpyWriter`) and read
memory-mapped (:func:`local_copy`).

Two ways to search a sharded index, with the same ranking as one flat index over all vectors (ties aside):
(a) :func:`merge` puts every shard into one index (IVF: ``merge_from``, the shared quantizer makes that exact;
Flat: codes appended; HNSW cannot be merged, so its vectors are re-added), holding the merged index;
(b) the shard set: each part searched on its own (:func:`search_part`, on all GPUs when
``faiss.get_num_gpus() > 0``) and the top-k lists merged (:func:`topk_merge`): in parallel actors by the
search stage, or one shard at a time in one process by :meth:`DenseIndex.search`.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa

from raykd import storage
from raykd.errors import FormatError, UserError

FORMAT = "raykd.dense_index"
VERSION = 1


def encoder_of(manifest: dict) -> dict:
    """The encoder spec an index manifest records (see the layout above for ``precision``)."""
    return {"precision": "fp32", **manifest["inputs"]["encoder"]}


def shard_name(s: int) -> str:
    return f"shard-{s:05d}"


# ------------------------------------------------------------------------------------------- faiss helpers
def new_index(dim: int, factory: str) -> faiss.Index:
    try:
        return faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise UserError(f"Faiss index factory {factory!r} is not valid: {str(e).splitlines()[-1]}") from None


def _on_cpu(index: faiss.Index) -> faiss.Index:
    if faiss.get_num_gpus() > 0 and hasattr(faiss, "index_gpu_to_cpu"):
        try:
            return faiss.index_gpu_to_cpu(index)
        except (RuntimeError, TypeError):
            pass
    return index


def to_bytes(index: faiss.Index) -> bytes:
    """The index as bytes: for small indexes (tests); large ones go through :func:`write_index`."""
    return faiss.serialize_index(_on_cpu(index)).tobytes()


def from_bytes(data: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))


def set_search_params(index: faiss.Index, nprobe: int | None = None, ef_search: int | None = None) -> None:
    ps = faiss.ParameterSpace()
    if nprobe:
        try:
            ps.set_index_parameter(index, "nprobe", int(nprobe))
        except RuntimeError:
            pass
    if ef_search:
        try:
            ps.set_index_parameter(index, "efSearch", int(ef_search))
        except RuntimeError:
            pass


def maybe_gpu(index: faiss.Index) -> faiss.Index:
    """The index on all GPUs when Faiss sees any (HNSW has no GPU version and stays on CPU)."""
    if faiss.get_num_gpus() > 0 and hasattr(faiss, "index_cpu_to_all_gpus") and "HNSW" not in type(index).__name__:
        try:
            return faiss.index_cpu_to_all_gpus(index)
        except (RuntimeError, AttributeError):
            return index
    return index


@contextmanager
def local_copy(uri: str) -> Iterator[str]:
    """A local file with the contents of ``uri``: the file itself when local, else a download to a temporary
    file (``$RAYKD_TMP`` or the system's), removed afterwards. Large files are read through this, never as bytes."""
    if not storage.is_s3(uri):
        yield storage.filesystem(uri)[1]
        return
    fs, path = storage.filesystem(uri)
    fd, tmp = tempfile.mkstemp(prefix="raykd-", suffix="-" + os.path.basename(path), dir=os.environ.get("RAYKD_TMP"))
    os.close(fd)
    try:
        fs.get_file(path, tmp)
        yield tmp
    finally:
        os.remove(tmp)


@contextmanager
def local_output(uri: str) -> Iterator[str]:
    """A local path to write ``uri``'s contents to; when the block ends the file appears at ``uri`` whole (a
    rename next to it, or a streamed multipart upload from the local file), or not at all if the block raises."""
    if storage.is_s3(uri):
        fd, tmp = tempfile.mkstemp(prefix="raykd-", dir=os.environ.get("RAYKD_TMP"))
    else:
        path = storage.filesystem(uri)[1]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=os.path.dirname(path))
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the file should look like any other written one
        if storage.is_s3(uri):
            with open(tmp, "rb") as src, storage.open_write_atomic(uri) as dst:
                shutil.copyfileobj(src, dst, 16 << 20)
        else:
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_index(index: faiss.Index, uri: str) -> int:
    """``faiss.write_index`` to local disk, then moved or uploaded from the file (no copy in memory); the
    file's size in bytes. Same bytes as ``serialize_index``, so either reads it."""
    with local_output(uri) as tmp:
        faiss.write_index(_on_cpu(index), tmp)
        size = os.path.getsize(tmp)
    return size


def read_index(uri: str) -> faiss.Index:
    """``faiss.read_index`` from a local file (an S3 object is downloaded first): one copy in memory."""
    with local_copy(uri) as path:
        return faiss.read_index(path)


class NpyWriter:
    """Streams float32 rows into a ``.npy`` file of a known row count: header first, then batches in order,
    so a writer holds one batch, never the whole array. ``path`` is local."""

    def __init__(self, path: str, rows: int, dim: int):
        self.rows, self.dim, self.written = rows, dim, 0
        self._f = open(path, "wb")
        np.lib.format.write_array_header_1_0(
            self._f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                      "shape": (rows, dim)})

    def write(self, batch: np.ndarray) -> None:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 2 or batch.shape[1] != self.dim or self.written + len(batch) > self.rows:
            raise ValueError(f"batch of shape {batch.shape} does not fit ({self.rows}, {self.dim}) "
                             f"after {self.written} rows")
        self._f.write(batch.tobytes())
        self.written += len(batch)

    def close(self) -> None:
        self._f.close()
        if self.written != self.rows:
            raise RuntimeError(f"wrote {self.written} of {self.rows} rows")


def save_npy(array: np.ndarray, uri: str) -> None:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array, dtype=np.float32), allow_pickle=False)
    storage.write_bytes_atomic(uri, buf.getvalue())


def load_npy(uri: str) -> np.ndarray:
    if not storage.is_s3(uri):
        return np.load(storage.filesystem(uri)[1], mmap_mode="r", allow_pickle=False)
    return np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False)


def add_rows(index: faiss.Index, vectors: np.ndarray, block: int = 65536) -> None:
    """Add (memory-mapped) vectors block by block: one block is copied at a time, never the whole array."""
    for a in range(0, len(vectors), block):
        index.add(np.ascontiguousarray(vectors[a : a + block], dtype=np.float32))


def write_json(uri: str, obj: dict) -> None:
    storage.write_bytes_atomic(uri, json.dumps(obj, indent=2, sort_keys=True).encode())


def read_json(uri: str) -> dict:
    return json.loads(storage.read_bytes(uri))


def topk_merge(
    scores: np.ndarray, rows: np.ndarray, new_scores: np.ndarray, new_rows: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise top-k of two (nq, *) score/row arrays; Faiss pads missing results with label -1."""
    s = np.concatenate([scores, new_scores], axis=1)
    r = np.concatenate([rows, new_rows], axis=1)
    s = np.where(r < 0, -np.inf, s)
    top = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, top, 1), np.take_along_axis(r, top, 1)


# ------------------------------------------------------------------------------------------- reading
@dataclass
class Shard:
    name: str
    rows: int
    first_row: int


class DenseIndex:
    """A finished dense index (refuses one without a finished manifest)."""

    def __init__(self, uri: str, cache: bool = False):
        """``cache=True`` keeps every loaded index in memory (repeated searches of an index that fits); the
        default loads one shard at a time for each search."""
        self.uri = str(uri).rstrip("/")
        self._cache: dict | None = {} if cache else None
        self.manifest = storage.read_manifest(self.uri, stage="index", format=FORMAT)
        self.dim = int(self.manifest["counts"]["dim"])
        self.factory = self.manifest["config"]["factory"]
        self.shards = [Shard(s["name"], int(s["rows"]), int(s["first_row"])) for s in self.manifest["parts"]]
        self.encoder = encoder_of(self.manifest)
        self._ids: pa.Table | None = None

    @property
    def ntotal(self) -> int:
        return sum(s.rows for s in self.shards)

    def has_merged(self) -> bool:
        return storage.exists(storage.join(self.uri, "merged", "merged.json"))

    def shard_uri(self, shard: Shard, name: str = "") -> str:
        return storage.join(self.uri, "shards", shard.name, name)

    def _cached(self, key: str, load):
        if self._cache is None:
            return load()
        if key not in self._cache:
            self._cache[key] = load()
        return self._cache[key]

    def load_shard(self, shard: Shard) -> faiss.Index:
        return self._cached(shard.name, lambda: self._load_shard(shard))

    def _load_shard(self, shard: Shard) -> faiss.Index:
        uri = self.shard_uri(shard, "index.faiss")
        index = read_index(uri)
        if index.d != self.dim:
            raise FormatError(uri, None, f"vector dimension {index.d}, but the index manifest says {self.dim}: "
                                         f"shards of one index must come from one encoder")
        if index.ntotal != shard.rows:
            raise FormatError(uri, None, f"{index.ntotal} vectors, but the manifest says {shard.rows}")
        return index

    def shard_vectors(self, shard: Shard) -> np.ndarray:
        uri = self.shard_uri(shard, "vectors.npy")
        v = load_npy(uri)
        if v.ndim != 2 or v.shape[1] != self.dim:
            raise FormatError(uri, None, f"vectors of shape {v.shape}; expected (rows, {self.dim})")
        return v

    def ids(self) -> pa.Table:
        """pid and doc_id of every global row (shards in order)."""
        if self._ids is None:
            self._ids = pa.concat_tables(
                [storage.read_parquet(self.shard_uri(s, "ids.parquet")) for s in self.shards]
            )
        return self._ids

    def iter_shards(self) -> Iterator[tuple[Shard, faiss.Index]]:
        for s in self.shards:
            yield s, self.load_shard(s)

    def search(
        self, queries: np.ndarray, k: int, use: str = "auto", nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, rows)`` of shape (nq, k), best first; rows are global rows (-1 where fewer than k).
        ``use``: ``merged`` (the merged index), ``shards`` (the shard set, top-k merged) or ``auto``."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise UserError(f"query vectors of shape {queries.shape} do not match the index dimension {self.dim}")
        if use not in ("auto", "merged", "shards"):
            raise UserError(f"use must be auto, merged or shards, not {use!r}")
        if use == "merged" and not self.has_merged():
            raise UserError(f"{self.uri} has no merged index; build it with `raykd index ... --merge`")
        if use == "merged" or (use == "auto" and self.has_merged()):
            index = self._cached("merged", lambda: maybe_gpu(read_index(self.merged_uri())))
            return search_part(index, queries, k, 0, self.ntotal, nprobe, ef_search)
        nq = len(queries)
        scores = np.full((nq, 0), -np.inf, dtype=np.float32)
        rows = np.full((nq, 0), -1, dtype=np.int64)
        for shard in self.shards:
            index = self._cached(f"search:{shard.name}", lambda s=shard: maybe_gpu(self._load_shard(s)))
            d, i = search_part(index, queries, k, shard.first_row, shard.rows, nprobe, ef_search)
            scores, rows = topk_merge(scores, rows, d, i, k)
            del index
        return scores, rows

    def merged_uri(self) -> str:
        return storage.join(self.uri, "merged", "index.faiss")


def search_part(index: faiss.Index, queries: np.ndarray, k: int, first_row: int, rows: int,
                nprobe: int | None = None, ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of one index (a shard, or the merged index) with its labels turned into global rows (-1: none).
    Results of parts of a shard set are merged exactly by :func:`topk_merge`."""
    set_search_params(index, nprobe, ef_search)
    d, i = index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, max(rows, 1)))
    return d, np.where(i < 0, -1, i + first_row)


def index_bytes(rows: int, dim: int, factory: str) -> int:
    """An upper bound of the memory one index of ``rows`` vectors takes (Flat: the vectors; HNSW: + its graph;
    IVF/PQ: at most the vectors), plus 256 MiB of working room: what a build or search task asks Ray for."""
    per_row = dim * 4 + (8 * 64 if "HNSW" in factory else 8)
    return int(rows * per_row + (256 << 20))


# ------------------------------------------------------------------------------------------- merging
def merge(index_uri: str) -> dict:
    """Write ``merged/`` (one index over every shard's vectors, global row = label) and return its summary."""
    di_manifest = storage.read_manifest(index_uri, stage="index", format=FORMAT)
    return merge_shards(index_uri, di_manifest["parts"], int(di_manifest["counts"]["dim"]),
                        di_manifest["config"]["factory"])


def merge_shards(index_uri: str, shards: list[dict], dim: int, factory: str) -> dict:
    """One index over all shards (global row = label), written with ``faiss.write_index`` to local disk and
    uploaded from the file. Holds the merged index (all codes) in memory: run it where that fits (the index
    stage runs it as a Ray task asking for :func:`index_bytes` of memory)."""
    t0 = time.time()
    trained_uri = storage.join(index_uri, "trained.faiss")
    # start from a deserialised index so its C++ type equals the shards' (merge_from compares types)
    merged = read_index(trained_uri) if storage.exists(trained_uri) else from_bytes(to_bytes(new_index(dim, factory)))
    is_ivf = _is_ivf(merged)
    can_merge = is_ivf or isinstance(merged, faiss.IndexFlatCodes)
    ids = []
    for s in shards:
        shard_dir = storage.join(index_uri, "shards", s["name"])
        if can_merge:
            part = read_index(storage.join(shard_dir, "index.faiss"))
            if part.d != dim:
                raise FormatError(storage.join(shard_dir, "index.faiss"), None,
                                  f"vector dimension {part.d}, expected {dim}")
            merged.merge_from(part, merged.ntotal if is_ivf else 0)
        else:  # HNSW and other graph indexes cannot merge: re-add the vectors (the requested in-memory merge)
            with local_copy(storage.join(shard_dir, "vectors.npy")) as path:
                add_rows(merged, np.load(path, mmap_mode="r", allow_pickle=False))
        ids.append(storage.read_parquet(storage.join(shard_dir, "ids.parquet")))
    out = storage.join(index_uri, "merged")
    write_index(merged, storage.join(out, "index.faiss"))
    storage.write_parquet_atomic(pa.concat_tables(ids), storage.join(out, "ids.parquet"))
    info = {"ntotal": int(merged.ntotal), "dim": dim, "factory": factory,
            "method": "merge_from" if can_merge else "re-add vectors", "seconds": round(time.time() - t0, 3)}
    write_json(storage.join(out, "merged.json"), info)
    return info


def _is_ivf(index: faiss.Index) -> bool:
    try:
        faiss.extract_index_ivf(index)
        return True
    except RuntimeError:
        return False
