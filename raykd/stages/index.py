"""index: text store passages -> a Ray Data actor pool of encoders -> N shards of vectors + ids -> one Faiss
index per shard (and optionally one merged index). Writes the :mod:`raykd.dense_index` format.

Phases, each resumable (a shard's commit files are written last and a re-run skips committed work):

1. encode. The corpus rows are cut into N contiguous row ranges (shards) and into read chunks of at most
   ``chunk_rows`` rows. A Ray Data pipeline reads the chunks (tasks), encodes them in an actor pool (one model
   per actor, length-sorted micro-batches) and streams the vectors back in order; the driver fills one shard
   at a time and commits it (``vectors.npy``, ``ids.parquet``, ``encoded.json``). The driver never holds more
   than one shard of vectors.
2. train (IVF/PQ factories only): the empty index is trained once on a sample drawn from every shard (one shard
   read at a time) and saved as ``trained.faiss``; every shard starts from it, so all share one quantizer.
3. build: each shard's vectors are added to its own index (``index.faiss``, ``shard.json``).
4. merge (``merge=True``): :func:`raykd.dense_index.merge`.
"""

from __future__ import annotations

import dataclasses
import os
import time
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
    actor_batch_rows: int = field(512, help="Passages per actor call (sorted by length, then micro-batched).", fingerprint=False)
    chunk_rows: int = field(1024, help="Corpus rows per read task (also the unit of progress and streaming).", fingerprint=False)
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


# ---------------------------------------------------------------------------------------- Ray Data pieces
def _read_chunk(batch: dict) -> pa.Table:
    """Read one chunk (part URI, row range) of the corpus: shard, row (global), pid, doc_id, passage text."""
    tables = []
    for part, lo, hi, shard, first in zip(batch["part"], batch["lo"], batch["hi"], batch["shard"], batch["first"]):
        fs, path = storage.filesystem(str(part))
        with fs.open(path, "rb") as f:
            t = pq.read_table(f, columns=["pid", "doc_id", "title", "text"]).slice(int(lo), int(hi) - int(lo))
        n = t.num_rows
        tables.append(
            pa.table(
                {
                    "shard": pa.array(np.full(n, int(shard), dtype=np.int64)),
                    "row": pa.array(np.arange(int(first), int(first) + n, dtype=np.int64)),
                    "pid": t["pid"],
                    "doc_id": t["doc_id"],
                    "passage": passage_text(t["title"], t["text"]),
                }
            )
        )
    return pa.concat_tables(tables)


class _PassageEncoder:
    """Ray Data actor: loads the encoder once, returns a ``vector`` column (rows, dim)."""

    def __init__(self, spec: dict, batch_size: int, threads: int, device: str | None):
        import torch

        from raykd.encoders import DenseEncoder

        if threads > 0:
            torch.set_num_threads(threads)
        self.encoder = DenseEncoder(EncoderSpec(**spec), device=device)
        self.batch_size = batch_size

    def __call__(self, batch: dict) -> dict:
        e = self.encoder
        before = (e.forward_passes, e.tokens, e.padded_tokens)
        vectors = e.encode_passages(list(batch["passage"]), batch_size=self.batch_size)
        # this call's work, carried on its first row (the driver sums the column): forward passes, tokens,
        # padded tokens, and the rows encoded in bf16
        work = np.zeros((len(vectors), 4), dtype=np.int64)
        work[0] = (e.forward_passes - before[0], e.tokens - before[1], e.padded_tokens - before[2],
                   len(vectors) if e.bf16 else 0)
        return {
            "shard": batch["shard"],
            "row": batch["row"],
            "pid": batch["pid"],
            "doc_id": batch["doc_id"],
            "vector": vectors,
            "work": work,
        }


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


def plan_chunks(parts: list[tuple[str, int]], shards: list[dict], todo: set[int], chunk_rows: int) -> list[dict]:
    """Read chunks (within one part and one shard, at most ``chunk_rows``) covering the shards in ``todo``."""
    chunks, start = [], 0
    for part, n in parts:
        for s in sorted(todo):
            lo = max(start, shards[s]["first_row"])
            hi = min(start + n, shards[s]["first_row"] + shards[s]["rows"])
            for a in range(lo, hi, chunk_rows):
                b = min(a + chunk_rows, hi)
                chunks.append({"part": part, "lo": a - start, "hi": b - start, "shard": s, "first": a})
        start += n
    chunks.sort(key=lambda c: c["first"])
    return chunks


# ---------------------------------------------------------------------------------------- phases
def _encode(cfg: IndexConfig, spec: EncoderSpec, store: TextStore, shards: list[dict], todo: set[int],
            stats: dict) -> None:
    import ray
    import ray.data

    parts = _part_rows(store)
    chunks = plan_chunks(parts, shards, todo, cfg.chunk_rows)
    total = sum(shards[s]["rows"] for s in todo)
    log.info("encoding %s passages into %d shard(s) with %d actor(s)", f"{total:,}", len(todo), cfg.actors)
    ctx = ray.data.DataContext.get_current()
    old_order = ctx.execution_options.preserve_order
    ctx.execution_options.preserve_order = True  # shards fill in row order, so the driver holds one at a time
    threads = cfg.torch_threads or max(1, (os.cpu_count() or 1) // max(cfg.actors, 1))
    init_ray()
    try:
        ds = ray.data.from_items(chunks, override_num_blocks=max(1, len(chunks)))
        ds = ds.map_batches(_read_chunk, batch_size=1, batch_format="numpy", num_cpus=0.25)
        ds = ds.map_batches(
            _PassageEncoder,
            batch_size=cfg.actor_batch_rows,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, cfg.actors)),
            num_cpus=cfg.actor_cpus,
            num_gpus=cfg.actor_gpus or None,
            fn_constructor_kwargs={
                "spec": spec.to_dict(), "batch_size": cfg.batch_size, "threads": threads, "device": cfg.device,
            },
        )
        progress = Progress(log, "passages encoded", total)
        current, buf, ids_pid, ids_doc, filled = None, None, None, None, 0
        work = np.zeros(4, dtype=np.int64)
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            work += batch["work"].sum(axis=0)
            for s in np.unique(batch["shard"]):
                sel = batch["shard"] == s
                s = int(s)
                if s != current:
                    if current is not None:
                        _commit_vectors(cfg.out, shards[current], buf, ids_pid, ids_doc, filled)
                    sh = shards[s]
                    current, filled = s, 0
                    buf = None
                    ids_pid = np.empty(sh["rows"], dtype=np.int64)
                    ids_doc = np.empty(sh["rows"], dtype=object)
                vec = batch["vector"][sel]
                if buf is None:
                    buf = np.empty((shards[s]["rows"], vec.shape[1]), dtype=np.float32)
                local = batch["row"][sel] - shards[s]["first_row"]
                buf[local] = vec
                ids_pid[local] = batch["pid"][sel]
                ids_doc[local] = batch["doc_id"][sel]
                filled += int(sel.sum())
                progress.update(int(sel.sum()))
        if current is not None:
            _commit_vectors(cfg.out, shards[current], buf, ids_pid, ids_doc, filled)
        stats["encode_seconds"] = round(progress.close(), 3)
        stats["passages_per_second"] = round(total / max(stats["encode_seconds"], 1e-9), 2)
        stats["forward_passes"], stats["tokens"], stats["padded_tokens"] = (int(x) for x in work[:3])
        stats["encode_dtype"] = {0: "float32", total: "bfloat16"}.get(int(work[3]), "mixed")
        stats["padding_fraction"] = round(1 - int(work[1]) / max(int(work[2]), 1), 4)
    finally:
        ctx.execution_options.preserve_order = old_order


def _commit_vectors(out: str, shard: dict, buf, pids, docs, filled: int) -> None:
    if filled != shard["rows"]:
        raise RuntimeError(f"shard {shard['name']}: got {filled} vectors for {shard['rows']} rows")
    d = storage.join(out, "shards", shard["name"])
    dx.save_npy(buf, storage.join(d, "vectors.npy"))
    storage.write_parquet_atomic(
        pa.table({"pid": pa.array(pids, pa.int64()), "doc_id": pa.array(list(docs), pa.string())}),
        storage.join(d, "ids.parquet"),
    )
    dx.write_json(storage.join(d, "encoded.json"),
                  {"rows": shard["rows"], "first_row": shard["first_row"], "dim": int(buf.shape[1])})
    log.info("shard %s: %s vectors committed", shard["name"], f"{shard['rows']:,}")


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


def _train(cfg: IndexConfig, shards: list[dict], dim: int, stats: dict) -> None:
    uri = storage.join(cfg.out, "trained.faiss")
    empty = dx.new_index(dim, cfg.factory)
    if empty.is_trained or storage.exists(uri):
        return
    total = sum(s["rows"] for s in shards)
    rng = np.random.default_rng(0)
    sample = []
    for sh in shards:  # one shard in memory at a time; each gives its share of the sample
        want = min(sh["rows"], max(1, round(cfg.train_sample * sh["rows"] / total)))
        v = dx.load_npy(storage.join(cfg.out, "shards", sh["name"], "vectors.npy"))
        sample.append(np.asarray(v[np.sort(rng.choice(sh["rows"], want, replace=False))], dtype=np.float32))
        del v
    x = np.ascontiguousarray(np.concatenate(sample))
    t0 = time.time()
    log.info("training %s on %s sampled vectors", cfg.factory, f"{len(x):,}")
    try:
        empty.train(x)
    except RuntimeError as e:
        raise UserError(f"training {cfg.factory!r} on {len(x)} vectors failed: {str(e).splitlines()[-1]}") from None
    storage.write_bytes_atomic(uri, dx.to_bytes(empty))
    stats["train_seconds"] = round(time.time() - t0, 3)
    stats["train_vectors"] = int(len(x))


def _build(cfg: IndexConfig, shards: list[dict], dim: int) -> None:
    trained_uri = storage.join(cfg.out, "trained.faiss")
    for sh in shards:
        d = storage.join(cfg.out, "shards", sh["name"])
        if storage.exists(storage.join(d, "shard.json")):
            continue
        index = (dx.from_bytes(storage.read_bytes(trained_uri)) if storage.exists(trained_uri)
                 else dx.new_index(dim, cfg.factory))
        v = np.ascontiguousarray(dx.load_npy(storage.join(d, "vectors.npy")), dtype=np.float32)
        index.add(v)
        storage.write_bytes_atomic(storage.join(d, "index.faiss"), dx.to_bytes(index))
        dx.write_json(storage.join(d, "shard.json"), {**sh, "dim": dim, "factory": cfg.factory,
                                                       "ntotal": int(index.ntotal)})
        log.info("shard %s: %s index of %s vectors built", sh["name"], cfg.factory, f"{index.ntotal:,}")


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
    _train(cfg, shards, dim, stats)
    _build(cfg, shards, dim)
    stats["build_seconds"] = round(time.time() - t_build, 3)
    merged = dx.merge_shards(cfg.out, shards, dim, cfg.factory) if cfg.merge else None
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

