"""index: text store passages -> encoder actors that write their own vector shards -> one Faiss index per shard,
built in parallel Ray tasks (and optionally one merged index). Writes the :mod:`raykd.dense_index` format.

The driver only plans and commits: it holds no vectors (``stats.driver_bytes`` counts what reached it: the
actors' and tasks' small summaries). Phases, each resumable (a shard's commit files are written last and a
re-run skips committed work):

1. encode. The corpus rows are cut into N contiguous row ranges (shards). A pool of ``actors`` Ray actors
   (:class:`ShardEncoder`, one model each) takes shards one at a time: it reads the Parquet row groups of its
   shard once, in ``chunk_rows`` batches, encodes ``actor_batch_rows`` at a time (sorted by token count, then
   micro-batched: :meth:`raykd.encoders.DenseEncoder.encode`), streams the vectors into a local ``.npy`` and
   moves or uploads it, then writes ``ids.parquet`` and ``encoded.json``. An actor holds one batch of vectors,
   never a shard. The encode clock (``stats.encode_seconds``) starts before the actors do, so it includes their
   start (``stats.encoder_load_seconds``: imports and model load) as well as their work
   (``stats.encode_busy_seconds``, summed over actors).
2. train (IVF/PQ factories only): a Ray task trains the empty index on a ``train_sample`` drawn from every
   shard (memory-mapped one at a time) and saves ``trained.faiss``; every shard starts from it, so all share
   one quantizer.
3. build: one Ray task per shard, in parallel, each asking Ray for the memory of its index
   (:func:`raykd.dense_index.index_bytes`), adds the memory-mapped vectors and writes ``index.faiss`` with
   ``faiss.write_index`` from local disk, then ``shard.json``.
4. merge (``merge=True``): :func:`raykd.dense_index.merge_shards` in a Ray task asking for the merged index's
   memory. For Flat the shard set is the default way to search (no merge needed: same ranking).
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raykd import dense_index as dx
from raykd import finished, storage
from raykd.config import field
from raykd.encoders import EncoderSpec, resolve
from raykd.errors import UserError
from raykd.formats.store import TextStore, passage_text
from raykd.log import Progress, get_logger
from raykd.runtime import init_ray

log = get_logger("index")


@dataclass
class IndexConfig:
    SECTION = "index"

    data: str | None = field(None, help="Text store URI (made by `raykd prepare`).")
    encoder: str | None = field(None, help="HF encoder name/path or a raykd BERT_DOT/TCT checkpoint folder.")
    out: str | None = field(None, help="Output URI of the index (local path or s3://).", fingerprint=False)
    pooling: str | None = field(None, help="Pooling (unset: the checkpoint's raykd_model.json, else cls).",
                                choices=["cls", "mean"])
    normalize: bool | None = field(None, help="L2-normalise vectors (unset: from the checkpoint, else no).")
    max_length: int | None = field(None, help="Passage max tokens (unset: from the checkpoint, else 512).")
    query_max_length: int | None = field(None, help="Query max tokens, recorded for search (unset: 64).")
    query_prefix: str = field("", help="Text put before every query (e.g. 'query: ').")
    passage_prefix: str = field("", help="Text put before every passage (e.g. 'passage: ').")
    precision: str = field("auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 autocast on CUDA and on CPUs with native "
                                        "bf16 (AVX512-BF16/AMX), else fp32. Recorded; search encodes queries alike.")
    shards: int = field(1, help="Number of shards.")
    factory: str = field("Flat", help="Faiss index factory string: Flat, IVF4096,Flat, IVF4096,PQ64, HNSW32, ...")
    train_sample: int = field(100_000, help="Vectors sampled (over all shards) to train IVF/PQ factories.")
    merge: bool = field(False, help="Also write one merged index over all shards (needs it to fit in memory).")
    actors: int = field(1, help="Encoder actors in the Ray Data pool.", fingerprint=False)
    actor_cpus: float = field(0.5, help="Ray CPUs reserved per actor (fractional on small machines).", fingerprint=False)
    actor_gpus: float = field(0.0, help="GPUs per actor (1 on a GPU cluster).", fingerprint=False)
    torch_threads: int = field(0, help="Torch threads per actor (0: this node's cores / actors).", fingerprint=False)
    batch_size: int = field(32, help="Passages per forward pass (a length-sorted micro-batch).", fingerprint=False)
    actor_batch_rows: int = field(4096, help="Passages sorted by token count together, then micro-batched (a larger "
                                             "window pads less; at most chunk_rows).", fingerprint=False)
    chunk_rows: int = field(4096, help="Corpus rows per Parquet read inside an encoder actor.", fingerprint=False)
    build_cpus: float = field(1.0, help="Ray CPUs per index build/train/merge task (memory is asked for per "
                                        "task from the shard's size).", fingerprint=False)
    device: str | None = field(None, help="Torch device for the encoders (unset: cuda if available, else cpu).", fingerprint=False)
    overwrite: bool = field(False, help="Replace an existing output made with other settings instead of refusing.",
                            fingerprint=False)

    def spec(self) -> EncoderSpec:
        return EncoderSpec(
            name_or_path=self.encoder,
            pooling=self.pooling,
            normalize=self.normalize,
            max_length=self.max_length,
            query_max_length=self.query_max_length,
            query_prefix=self.query_prefix,
            passage_prefix=self.passage_prefix,
            precision=self.precision,
        )


# ---------------------------------------------------------------------------------------- planning
def _part_rows(store: TextStore) -> list[tuple[str, int]]:
    out = []
    for part in store.corpus_parts():
        fs, path = storage.filesystem(part)
        with fs.open(path, "rb") as f:
            out.append((part, pq.ParquetFile(f).metadata.num_rows))
    return out


def plan_shards(total: int, shards: int) -> list[dict]:
    """N contiguous row ranges of near-equal size."""
    if shards < 1:
        raise UserError(f"--shards must be >= 1, got {shards}")
    if shards > max(total, 1):
        raise UserError(f"--shards {shards} is more than the corpus's {total} passages")
    bounds = [total * s // shards for s in range(shards + 1)]
    return [{"name": dx.shard_name(s), "first_row": bounds[s], "rows": bounds[s + 1] - bounds[s]} for s in range(shards)]


def plan_pieces(parts: list[tuple[str, int]], shard: dict) -> list[dict]:
    """The (part, row range inside the part) pieces that make up one shard, in row order."""
    pieces, start = [], 0
    lo_s, hi_s = shard["first_row"], shard["first_row"] + shard["rows"]
    for part, n in parts:
        lo, hi = max(start, lo_s), min(start + n, hi_s)
        if lo < hi:
            pieces.append({"part": part, "lo": lo - start, "hi": hi - start})
        start += n
    return pieces


# ---------------------------------------------------------------------------------------- encode (actors)
def read_piece(piece: dict, batch_rows: int) -> Iterator[pa.Table]:
    """pid, doc_id and passage text of one piece, in batches of at most ``batch_rows``: only the Parquet row
    groups that overlap the piece are read, each once."""
    fs, path = storage.filesystem(piece["part"])
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        groups, start, first = [], 0, None
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if start < piece["hi"] and start + n > piece["lo"]:
                groups.append(g)
                first = start if first is None else first
            start += n
        pos = first or 0
        for batch in pf.iter_batches(batch_size=batch_rows, row_groups=groups,
                                     columns=["pid", "doc_id", "title", "text"]):
            lo, hi = max(piece["lo"] - pos, 0), min(piece["hi"] - pos, batch.num_rows)
            pos += batch.num_rows
            if lo < hi:
                t = pa.Table.from_batches([batch.slice(lo, hi - lo)])
                yield pa.table({"pid": t["pid"], "doc_id": t["doc_id"],
                                "passage": passage_text(t["title"], t["text"])})


class ShardEncoder:
    """A Ray actor holding one encoder: encodes whole shards and writes them itself (``vectors.npy`` streamed
    to local disk batch by batch, then moved or uploaded; ``ids.parquet``; ``encoded.json`` last). It returns
    only a small summary, so no vector passes through the driver."""

    def __init__(self, spec: dict, batch_size: int, threads: int, device: str | None):
        t0 = time.time()
        import torch

        from raykd.encoders import DenseEncoder

        if threads > 0:
            torch.set_num_threads(threads)
        self.encoder = DenseEncoder(EncoderSpec(**spec), device=device)
        self.batch_size = batch_size
        self.load_seconds = time.time() - t0  # imports and model load, after the worker process started

    def encode_shard(self, out: str, shard: dict, pieces: list[dict], read_rows: int, encode_rows: int) -> dict:
        e = self.encoder
        before = (e.forward_passes, e.tokens, e.padded_tokens)
        t0 = time.time()
        d = storage.join(out, "shards", shard["name"])
        writer, pids, docs, bf16_rows = None, [], [], 0
        with dx.local_output(storage.join(d, "vectors.npy")) as tmp:
            try:
                for piece in pieces:
                    for t in read_piece(piece, read_rows):
                        for a in range(0, t.num_rows, encode_rows):
                            part = t.slice(a, encode_rows)
                            vectors = e.encode_passages(part["passage"].to_pylist(), batch_size=self.batch_size)
                            if writer is None:
                                writer = dx.NpyWriter(tmp, shard["rows"], vectors.shape[1])
                            writer.write(vectors)
                            bf16_rows += len(vectors) if e.bf16 else 0
                        pids.append(t["pid"])
                        docs.append(t["doc_id"])
            finally:
                if writer is not None:
                    writer.close()
            if writer is None or writer.written != shard["rows"]:
                raise RuntimeError(f"shard {shard['name']}: got {writer.written if writer else 0} vectors "
                                   f"for {shard['rows']} rows")
        storage.write_parquet_atomic(
            pa.table({"pid": pa.concat_arrays([c for a in pids for c in a.chunks]).cast(pa.int64()),
                      "doc_id": pa.concat_arrays([c for a in docs for c in a.chunks]).cast(pa.string())}),
            storage.join(d, "ids.parquet"),
        )
        dx.write_json(storage.join(d, "encoded.json"),
                      {"rows": shard["rows"], "first_row": shard["first_row"], "dim": int(writer.dim)})
        return {"name": shard["name"], "rows": shard["rows"], "seconds": time.time() - t0,
                "forward_passes": e.forward_passes - before[0], "tokens": e.tokens - before[1],
                "padded_tokens": e.padded_tokens - before[2], "bf16_rows": bf16_rows,
                "load_seconds": self.load_seconds}


def _encode(cfg: IndexConfig, spec: EncoderSpec, store: TextStore, shards: list[dict], todo: set[int],
            stats: dict) -> None:
    import ray
    from ray.util import ActorPool

    total = sum(shards[s]["rows"] for s in todo)
    n_actors = max(1, min(cfg.actors, len(todo)))
    log.info("encoding %s passages into %d shard(s) with %d actor(s)", f"{total:,}", len(todo), n_actors)
    threads = cfg.torch_threads or max(1, (os.cpu_count() or 1) // n_actors)
    init_ray()
    # the clock starts before the actors do: their start (process, imports, model load) is part of encoding
    progress = Progress(log, "passages encoded", total)
    actor = ray.remote(ShardEncoder).options(num_cpus=cfg.actor_cpus, num_gpus=cfg.actor_gpus or None)
    kwargs = {"spec": spec.to_dict(), "batch_size": cfg.batch_size, "threads": threads, "device": cfg.device}
    actors = [actor.remote(**kwargs) for _ in range(n_actors)]
    parts = _part_rows(store)  # the Parquet footers are read while the actors load their model
    pool = ActorPool(actors)
    work = {"forward_passes": 0, "tokens": 0, "padded_tokens": 0, "bf16_rows": 0}
    busy, load = 0.0, 0.0
    driver_bytes = 0
    try:
        jobs = [(shards[s], plan_pieces(parts, shards[s])) for s in sorted(todo)]
        for result in pool.map_unordered(
            lambda a, job: a.encode_shard.remote(cfg.out, job[0], job[1], cfg.chunk_rows, cfg.actor_batch_rows),
            jobs,
        ):
            driver_bytes += len(pickle.dumps(result))  # what reached the driver: summaries only
            for key in work:
                work[key] += int(result[key])
            busy, load = busy + result["seconds"], max(load, result["load_seconds"])
            progress.update(int(result["rows"]))
            log.info("shard %s: %s vectors committed", result["name"], f"{result['rows']:,}")
    finally:
        for a in actors:
            ray.kill(a)
    stats["encode_seconds"] = round(progress.close(), 3)
    stats["passages_per_second"] = round(total / max(stats["encode_seconds"], 1e-9), 2)
    # where the time went: the actors' start (imports, model load) and their time in encode_shard, summed
    stats["encoder_load_seconds"], stats["encode_busy_seconds"] = round(load, 3), round(busy, 3)
    stats["encode_actors"] = n_actors
    stats["forward_passes"], stats["tokens"], stats["padded_tokens"] = (
        work["forward_passes"], work["tokens"], work["padded_tokens"])
    stats["encode_dtype"] = {0: "float32", total: "bfloat16"}.get(work["bf16_rows"], "mixed")
    stats["padding_fraction"] = round(1 - work["tokens"] / max(work["padded_tokens"], 1), 4)
    stats["driver_bytes"] = driver_bytes


def _check_dims(out: str, shards: list[dict]) -> int:
    dims = {}
    for sh in shards:
        uri = storage.join(out, "shards", sh["name"], "encoded.json")
        dims[sh["name"]] = int(dx.read_json(uri)["dim"])
    if len(set(dims.values())) != 1:
        raise UserError(
            f"{out}: shards have different vector dimensions {dims}; they were encoded by different encoders. "
            f"Delete the shards of the wrong encoder (or use a new --out) and re-run"
        )
    return next(iter(dims.values()))


# ---------------------------------------------------------------------------------------- train, build, merge (tasks)
def train_quantizer(out: str, shards: list[dict], dim: int, factory: str, sample: int) -> dict:
    """Train the empty index on ``sample`` vectors drawn from every shard (one shard mapped at a time) and write
    ``trained.faiss``; runs as a Ray task holding the sample and the index."""
    total = sum(s["rows"] for s in shards)
    rng = np.random.default_rng(0)
    picked = []
    for sh in shards:  # each shard gives its share of the sample
        want = min(sh["rows"], max(1, round(sample * sh["rows"] / total)))
        with dx.local_copy(storage.join(out, "shards", sh["name"], "vectors.npy")) as path:
            v = np.load(path, mmap_mode="r", allow_pickle=False)
            picked.append(np.asarray(v[np.sort(rng.choice(sh["rows"], want, replace=False))], dtype=np.float32))
            del v
    x = np.ascontiguousarray(np.concatenate(picked))
    t0 = time.time()
    empty = dx.new_index(dim, factory)
    try:
        empty.train(x)
    except RuntimeError as e:
        raise UserError(f"training {factory!r} on {len(x)} vectors failed: {str(e).splitlines()[-1]}") from None
    dx.write_index(empty, storage.join(out, "trained.faiss"))
    return {"train_seconds": round(time.time() - t0, 3), "train_vectors": int(len(x))}


def build_shard(out: str, shard: dict, dim: int, factory: str) -> dict:
    """Add one shard's (memory-mapped) vectors to its index, starting from ``trained.faiss`` when there is one;
    write ``index.faiss`` from local disk, then ``shard.json``. Runs as a Ray task."""
    t0 = time.time()
    d = storage.join(out, "shards", shard["name"])
    trained_uri = storage.join(out, "trained.faiss")
    index = dx.read_index(trained_uri) if storage.exists(trained_uri) else dx.new_index(dim, factory)
    with dx.local_copy(storage.join(d, "vectors.npy")) as path:
        dx.add_rows(index, np.load(path, mmap_mode="r", allow_pickle=False))
    size = dx.write_index(index, storage.join(d, "index.faiss"))
    dx.write_json(storage.join(d, "shard.json"), {**shard, "dim": dim, "factory": factory,
                                                   "ntotal": int(index.ntotal), "bytes": size})
    return {"name": shard["name"], "ntotal": int(index.ntotal), "seconds": time.time() - t0}


def _remote(fn, memory: int, cpus: float):
    import ray

    return ray.remote(fn).options(num_cpus=cpus, memory=memory, max_retries=0)


def _train(cfg: IndexConfig, shards: list[dict], dim: int, stats: dict) -> None:
    import ray

    if dx.new_index(dim, cfg.factory).is_trained or storage.exists(storage.join(cfg.out, "trained.faiss")):
        return
    n = min(cfg.train_sample, sum(s["rows"] for s in shards))
    log.info("training %s on %s sampled vectors (a Ray task)", cfg.factory, f"{n:,}")
    memory = 3 * n * dim * 4 + (512 << 20)  # the sample, its copy and the trainer's working set
    stats.update(ray.get(_remote(train_quantizer, memory, cfg.build_cpus).remote(
        cfg.out, shards, dim, cfg.factory, cfg.train_sample)))


def _build(cfg: IndexConfig, shards: list[dict], dim: int) -> None:
    import ray

    todo = [sh for sh in shards if not storage.exists(storage.join(cfg.out, "shards", sh["name"], "shard.json"))]
    refs = [_remote(build_shard, dx.index_bytes(sh["rows"], dim, cfg.factory), cfg.build_cpus).remote(
        cfg.out, sh, dim, cfg.factory) for sh in todo]
    for r in ray.get(refs):
        log.info("shard %s: %s index of %s vectors built", r["name"], cfg.factory, f"{r['ntotal']:,}")


def _merge(cfg: IndexConfig, shards: list[dict], dim: int) -> dict:
    import ray

    memory = dx.index_bytes(sum(s["rows"] for s in shards), dim, cfg.factory)
    log.info("merging %d shard(s) in a Ray task asking for %.1f GiB", len(shards), memory / 2**30)
    return ray.get(_remote(dx.merge_shards, memory, cfg.build_cpus).remote(cfg.out, shards, dim, cfg.factory))


# ---------------------------------------------------------------------------------------- the stage
def index(cfg: IndexConfig) -> storage.Manifest:
    """Encode the store's passages into ``cfg.shards`` Faiss shards under ``cfg.out``; resumable."""
    if not cfg.data or not cfg.encoder or not cfg.out:
        raise UserError("index needs --data (a text store), --encoder and --out")
    # actors get these as strings and do not share the driver's working directory
    cfg = dataclasses.replace(cfg, data=storage.absolute(cfg.data), out=storage.absolute(cfg.out),
                              encoder=storage.absolute_model(cfg.encoder))
    t0 = time.time()
    store = TextStore(cfg.data)
    spec = resolve(cfg.spec())
    dx.new_index(3840, cfg.factory)  # fail fast on a bad factory string (3840: divisible by common PQ sizes)
    total = sum(n for _, n in _part_rows(store))
    shards = plan_shards(total, cfg.shards)
    # the encoder settings as resolved from the checkpoint, so an explicit default is the same fingerprint
    resolved = {k: v for k, v in spec.to_dict().items() if k != "name_or_path"}
    claim = finished.claim(cfg.out, "index", finished.fingerprint(
        cfg, **resolved, **{f"{k}.created_at": finished.input_identity(getattr(cfg, k)) for k in ("data", "encoder")}), cfg.overwrite)
    if claim.finished:
        log.info("%s is already a finished index; nothing to do", cfg.out)
        return claim.manifest
    done = {
        s for s, sh in enumerate(shards) if storage.exists(storage.join(cfg.out, "shards", sh["name"], "encoded.json"))
    }
    todo = set(range(len(shards))) - done
    stats: dict = {"resumed_shards": len(done)}
    if todo:
        _encode(cfg, spec, store, shards, todo, stats)
    else:
        log.info("all %d shard(s) already encoded; nothing to encode", len(shards))
    dim = _check_dims(cfg.out, shards)
    t_build = time.time()
    init_ray()
    _train(cfg, shards, dim, stats)
    _build(cfg, shards, dim)
    stats["build_seconds"] = round(time.time() - t_build, 3)
    merged = _merge(cfg, shards, dim) if cfg.merge else None
    if merged:
        stats["merge"] = merged
    config = dataclasses.asdict(cfg)
    m = storage.write_manifest(
        cfg.out,
        "index",
        format=dx.FORMAT,
        format_version=dx.VERSION,
        config=config,
        inputs={"data": cfg.data, "encoder": spec.to_dict()},
        counts={"passages": total, "shards": len(shards), "dim": dim},
        stats=stats,
        parts=shards,
        timings={"total_seconds": round(time.time() - t0, 3)},
        fingerprint=claim.fingerprint,
    )
    log.info("index written to %s: %s passages, %d shard(s), dim %d", cfg.out, f"{total:,}", len(shards), dim)
    return m

