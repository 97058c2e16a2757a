"""search: a split's queries -> a top-k run, four ways (format ``raykd.run`` v1).

- dense (``index``): encode the queries with the index's own encoder spec, search the merged index or the shard
  set (top-k merged over shards), see :mod:`raykd.dense_index`;
- BM25 (``bm25``): bm25s over the store's corpus (:mod:`raykd.bm25`);
- re-rank (``rerank`` + ``scorer``): score the top ``k`` candidates of a run (e.g. BM25 top-1000) with any raykd
  scorer (student or teacher: what :func:`raykd.models.registry.load_scorer` loads, or a ``KIND:PATH`` teacher) through
  the scorer pipeline score uses (:mod:`raykd.stages.scoring`: texts, CPU tokenising, an actor pool, length
  bucketing), each block of whole queries ranked and written as a part as it arrives;
- hybrid (``hybrid`` + ``dense`` + ``sparse``): TCT Eq. 7 (:mod:`raykd.fusion`); ``alpha`` given, or tuned by grid
  search on the ``tune_split`` queries (their dense and sparse runs given as ``tune_dense`` / ``tune_sparse``,
  or computed here from ``index`` and BM25).

Output under ``out``::

    run.trec       TREC run (original query and document ids), trec_eval order, ranks 1..k
    run.parquet    qid int64, query_id string, pid int64, doc_id string, rank int32, score float32
    parts/         re-rank only: part-<block>.parquet, run.parquet's rows of one block of whole queries
    manifest.json  stage "search"; counts; stats.latency_ms = per-query milliseconds of each component
                   (query_encoding, search, rerank, fusion, total), as in TCT-ColBERT's Table 2; written last

Latency is wall time of the batched component divided by the number of queries (a hybrid adds its inputs'
components when they are search outputs; a re-ranker adds its candidate run's); ``latency_queries = N`` also
times N queries one at a time (batch size 1, the paper's setting) as ``stats.latency_ms_single``, with
the indexes kept in memory between queries (so that must fit).
A re-run with the same ``out`` and settings returns the finished output (:mod:`raykd.finished`).

Runs given as input may be a TREC file or a search output URI (read from its ``run.parquet``; a hybrid fuses the
scores its ``run.trec`` prints, so either gives the same run). A run naming a query that is not in the split, a
document twice for a query, or a document that is not in the corpus is an error naming the file and line (a search
output's: run.parquet and the row). A run stays an Arrow table from the searcher to the files
(:mod:`raykd.runs`): no Python object per result.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raykd import finished, storage
from raykd.config import field
from raykd.errors import FormatError, UserError
from raykd.formats.store import TextStore
from raykd.log import Progress, get_logger
from raykd.runs import (
    FORMAT,
    VERSION,
    ranks_within,
    run_columns,
    store_qrels,
    store_run,
    top_k_table,
    write_run,
)

log = get_logger("search")


@dataclass
class SearchConfig:
    SECTION = "search"

    data: str | None = field(None, help="Text store URI (queries of --split, corpus for BM25/re-ranking).")
    split: str = field("test", help="Query split of the store to search.")
    out: str | None = field(None, help="Output URI (run.trec + run.parquet + manifest).", fingerprint=False)
    k: int = field(1000, help="Results per query (re-rank: candidates re-scored per query).")
    index: str | None = field(None, help="Dense index URI (made by `raykd index`).")
    use: str = field("auto", help="Dense: one merged index, or shard by shard with the top-k merged.",
                     choices=["auto", "merged", "shards"])
    replicas: int = field(1, help="Dense: Ray actors per index part (a shard, or the merged index), each searching a "
                                  "slice of the queries; 0: search in this process, one shard at a time.",
                          fingerprint=False)
    search_cpus: float = field(1.0, help="Dense: Ray CPUs per searcher actor.", fingerprint=False)
    search_gpus: float = field(0.0, help="Dense: GPUs per searcher actor (faiss-gpu is used when Faiss sees one).",
                               fingerprint=False)
    query_block: int = field(4096, help="Dense: queries per searcher call (bounds what a call returns).",
                             fingerprint=False)
    nprobe: int | None = field(None, help="IVF: lists probed per query.")
    ef_search: int | None = field(None, help="HNSW: efSearch.")
    bm25: bool = field(False, help="BM25 retrieval over the store's corpus.", flag="--bm25")
    k1: float = field(0.9, help="BM25 k1 (Anserini's value).")
    b: float = field(0.4, help="BM25 b (Anserini's value).")
    stemmer: str = field("porter", help="BM25 stemmer.", choices=["porter", "english", "none"])
    bm25_index: str | None = field(None, help="BM25 index URI: built there once (a Ray task, bm25s save) if it "
                                              "is not there yet, then loaded memory-mapped; unset: <out>/bm25-index.",
                                   fingerprint=False)
    bm25_workers: int = field(4, help="BM25: query shards retrieved in parallel (one Ray task each).",
                              fingerprint=False)
    bm25_memory_gb: float = field(0.0, help="BM25: memory each index build task asks Ray for (0: estimated from "
                                            "the corpus text, see docs/retrieval.md).", fingerprint=False)
    bm25_shards: int = field(1, help="BM25: 1 builds one bm25s index of the whole corpus in one Ray task; N > 1 "
                                     "builds N shard indexes in N Ray tasks (each ~1/N of the memory) with the whole "
                                     "corpus's statistics, so scores and runs are those of one index "
                                     "(docs/retrieval.md).", fingerprint=False)
    rerank: str | None = field(None, help="Candidate run to re-rank (TREC file or search output URI).")
    scorer: str | None = field(None, help="Re-rank: a saved raykd scorer (any student kind) or HF cross-encoder "
                                          "folder, or a teacher spec KIND:PATH (docs/teachers.md).")
    rerank_block: int = field(2048, help="Re-rank: pairs per Ray Data block (whole queries; each block is sorted "
                                         "by length in the actor and written as one part).", fingerprint=False)
    rerank_actors: int = field(0, help="Re-rank: scoring actors (0: sized to the cluster, one per --rerank-gpus "
                                       "share of its GPUs, else half its CPUs in actors of --rerank-cpus).",
                               fingerprint=False)
    rerank_gpus: float | None = field(None, help="Re-rank: GPUs per scoring actor (unset: 1 when the cluster has "
                                                 "GPUs and --device is not cpu, else 0).", fingerprint=False)
    rerank_cpus: float = field(1.0, help="Re-rank: CPUs per scoring actor (on CPU also its torch threads unless "
                                         "--torch-threads).", fingerprint=False)
    rerank_task_cpus: float = field(0.25, help="Re-rank: CPUs per text-lookup / tokenising task.", fingerprint=False)
    hybrid: bool = field(False, help="TCT Eq. 7 fusion of --dense and --sparse.", flag="--hybrid")
    dense: str | None = field(None, help="Hybrid: dense run of --split.")
    sparse: str | None = field(None, help="Hybrid: sparse (BM25) run of --split.")
    alpha: float | None = field(None, help="Hybrid weight of the sparse score; unset: tuned on --tune-split.")
    tune_split: str = field("train", help="Hybrid: query split whose qrels tune alpha.")
    tune_dense: str | None = field(None, help="Hybrid: dense run of --tune-split (else made from --index).")
    tune_sparse: str | None = field(None, help="Hybrid: BM25 run of --tune-split (else made here).")
    tune_queries: int = field(1000, help="Hybrid: judged --tune-split queries alpha is tuned on (a seeded sample; "
                                         "0: all).")
    tune_seed: int = field(0, help="Hybrid: seed of the tuning sample.")
    tune_measure: str = field("nDCG@10", help="Hybrid: measure alpha maximises.")
    alpha_grid: list[float] = field([], help="Hybrid: alphas to try (unset: 0 and 41 values from 0.001 to 10).")
    batch_size: int = field(64, help="Queries per encoder pass / pairs per re-rank pass.", fingerprint=False)
    latency_queries: int = field(0, help="Also time this many queries one at a time (batch size 1).")
    precision: str | None = field(None, help="Dense query encoding precision (unset: the index's).",
                                  choices=["auto", "fp32", "bf16"])
    torch_threads: int = field(0, help="Torch threads (0: torch's default).", fingerprint=False)
    device: str | None = field(None, help="Torch device (unset: cuda if available, else cpu).", fingerprint=False)
    tag: str | None = field(None, help="Run tag in run.trec (unset: the mode).")
    overwrite: bool = field(False, help="Replace an existing output made with other settings instead of refusing.",
                            fingerprint=False)


# ------------------------------------------------------------------------------------------- inputs
def split_queries(store: TextStore, split: str, only: set[str] | None = None) -> pa.Table:
    """The split's queries (those in ``only`` when given); an empty query text is an error naming the row."""
    t = store.queries(split)
    uri = storage.join(store.uri, "queries", f"{split}.parquet")
    empty = pc.fill_null(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(t["text"])), 0), True).to_numpy(
        zero_copy_only=False)
    if empty.any():
        row = int(np.flatnonzero(empty)[0])
        raise FormatError(uri, None, f"row {row}: query {t['query_id'][row].as_py()} has an empty text; a query "
                                     f"needs words to retrieve with (drop it when preparing the store)")
    if only is not None:
        t = t.filter(pc.is_in(t["query_id"], value_set=pa.array(sorted(only), pa.string())))
    return t


# ------------------------------------------------------------------------------------------- dense
class IndexPartSearcher:
    """A Ray actor holding one part of a dense index (a shard, or the merged index), on the GPUs when Faiss
    sees any; returns each query's top-k with global rows."""

    def __init__(self, index_uri: str, part: str):
        from raykd.dense_index import DenseIndex, maybe_gpu, read_index

        di = DenseIndex(index_uri)
        if part == "merged":
            self.first_row, self.rows = 0, di.ntotal
            self.index = maybe_gpu(read_index(di.merged_uri()))
        else:
            shard = next(s for s in di.shards if s.name == part)
            self.first_row, self.rows = shard.first_row, shard.rows
            self.index = maybe_gpu(di.load_shard(shard))

    def search(self, queries: np.ndarray, k: int, nprobe: int | None, ef_search: int | None):
        from raykd.dense_index import search_part

        return search_part(self.index, queries, k, self.first_row, self.rows, nprobe, ef_search)


def search_parts(cfg: SearchConfig, di, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The shard set (or the merged index) searched by ``cfg.replicas`` Ray actors per part, each asking Ray
    for its part's memory; the parts' top-k lists are merged exactly (:func:`raykd.dense_index.topk_merge`)."""
    import ray

    from raykd.dense_index import index_bytes, topk_merge
    from raykd.runtime import init_ray

    use = "merged" if cfg.use == "merged" or (cfg.use == "auto" and di.has_merged()) else "shards"
    if use == "merged" and not di.has_merged():
        raise UserError(f"{di.uri} has no merged index; build it with `raykd index ... --merge`")
    parts = [("merged", di.ntotal)] if use == "merged" else [(s.name, s.rows) for s in di.shards]
    init_ray()
    actor = ray.remote(IndexPartSearcher)
    actors = {name: [actor.options(num_cpus=cfg.search_cpus, num_gpus=cfg.search_gpus or None,
                                   memory=index_bytes(rows, di.dim, di.factory)).remote(di.uri, name)
                     for _ in range(cfg.replicas)] for name, rows in parts}
    try:
        futures = []
        for b, a in enumerate(range(0, len(queries), cfg.query_block)):
            ref = ray.put(np.ascontiguousarray(queries[a : a + cfg.query_block], dtype=np.float32))
            futures.append([actors[name][b % cfg.replicas].search.remote(ref, cfg.k, cfg.nprobe, cfg.ef_search)
                            for name, _ in parts])
        out_s, out_r = [], []
        for block in futures:
            scores, rows = None, None
            for d, i in ray.get(block):
                scores, rows = (d, i) if scores is None else topk_merge(scores, rows, d, i, cfg.k)
            out_s.append(scores)
            out_r.append(rows)
    finally:
        for group in actors.values():
            for a in group:
                ray.kill(a)
    if not out_s:
        return np.zeros((0, cfg.k), np.float32), np.zeros((0, cfg.k), np.int64)
    return np.concatenate(out_s), np.concatenate(out_r)


def dense_run(cfg: SearchConfig, store: TextStore, split: str, latency: dict,
              only: set[str] | None = None) -> pa.Table:
    """The dense run of ``split`` (the queries in ``only`` when given) as a ranked run table
    (:func:`raykd.runs.top_k_table`)."""
    from raykd.dense_index import DenseIndex
    from raykd.encoders import DenseEncoder, EncoderSpec

    di = DenseIndex(cfg.index, cache=cfg.latency_queries > 0)  # timing single queries: load shards once
    queries = split_queries(store, split, only)
    texts = queries["text"].to_pylist()
    spec = EncoderSpec(**di.encoder)
    if cfg.precision:
        spec.precision = cfg.precision
    encoder = DenseEncoder(spec, device=cfg.device)
    t0 = time.perf_counter()
    q = encoder.encode_queries(texts, batch_size=cfg.batch_size)
    t1 = time.perf_counter()
    if cfg.replicas > 0:
        scores, rows = search_parts(cfg, di, q)
    else:
        scores, rows = di.search(q, cfg.k, use=cfg.use, nprobe=cfg.nprobe, ef_search=cfg.ef_search)
    t2 = time.perf_counter()
    n = max(len(texts), 1)
    latency["query_encoding"] = 1000 * (t1 - t0) / n
    latency["search"] = 1000 * (t2 - t1) / n
    if cfg.latency_queries > 0:
        m = min(cfg.latency_queries, len(texts))
        te = ts = 0.0
        for text in texts[:m]:
            a = time.perf_counter()
            v = encoder.encode_queries([text])
            b = time.perf_counter()
            di.search(v, cfg.k, use=cfg.use, nprobe=cfg.nprobe, ef_search=cfg.ef_search)
            te, ts = te + b - a, ts + time.perf_counter() - b
        latency["single"] = {"queries": m, "query_encoding": 1000 * te / m, "search": 1000 * ts / m}
    return top_k_table(queries["query_id"].combine_chunks(), di.ids()["doc_id"].combine_chunks(), rows, scores,
                       rows >= 0)


# ------------------------------------------------------------------------------------------- BM25
def _bm25_params(cfg: SearchConfig):
    from raykd.bm25 import BM25Params

    return BM25Params(k1=cfg.k1, b=cfg.b, stemmer=cfg.stemmer)


def _corpus_row_groups(store: TextStore) -> list[tuple[str, int, int, int]]:
    """``(part, row group, rows, text bytes)`` of the store's corpus in row order; text bytes: Parquet's
    uncompressed size of title + text."""
    out = []
    for part in store.corpus_parts():
        fs, path = storage.filesystem(part)
        with fs.open(path, "rb") as f:
            md = pq.ParquetFile(f).metadata
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            out.append((part, g, rg.num_rows, sum(rg.column(c).total_uncompressed_size for c in range(rg.num_columns)
                                                  if rg.column(c).path_in_schema in ("title", "text"))))
    return out


def bm25_build_memory(store: TextStore) -> int:
    """Bytes the BM25 build task asks for: ``BM25_BYTES_PER_TEXT_BYTE`` x the corpus text (Parquet's
    uncompressed size of title + text), measured in docs/retrieval.md, plus 1 GiB."""
    text = sum(g[3] for g in _corpus_row_groups(store))
    return int(BM25_BYTES_PER_TEXT_BYTE * text + (1 << 30))


def bm25_shard_memory(text_bytes: float, terms: int) -> int:
    """Bytes a BM25 shard build task asks for: ``BM25_BYTES_PER_TEXT_BYTE`` x the shard's text, the corpus
    vocabulary every shard holds (``BM25_BYTES_PER_TERM`` each), plus 1 GiB."""
    return int(BM25_BYTES_PER_TEXT_BYTE * text_bytes + BM25_BYTES_PER_TERM * terms + (1 << 30))


BM25_BYTES_PER_TERM = 300  # a str -> int dict entry, the idf and df arrays, the term list (an estimate)
BM25_STATS_MEMORY = 2 << 30  # a statistics task: one read batch and its part's vocabulary and df counts
BM25_BYTES_PER_TEXT_BYTE = 9.0  # measured 8.55 at 884K synthetic MS MARCO passages (docs/scale.md)


def _corpus_range(data: str, lo: int, hi: int, read_rows: int = 65536) -> Iterator[tuple[list[str], pa.Array]]:
    """``(passage texts, doc ids)`` batches of the corpus rows ``[lo, hi)``, reading only the row groups that
    hold them."""
    from raykd.formats.store import passage_text

    start = 0
    for part, g, rows, _ in _corpus_row_groups(TextStore(data)):
        if start < hi and start + rows > lo:
            fs, path = storage.filesystem(part)
            with fs.open(path, "rb") as f:
                at = start
                for b in pq.ParquetFile(f).iter_batches(batch_size=read_rows, row_groups=[g],
                                                        columns=["doc_id", "title", "text"]):
                    a, z = max(lo - at, 0), min(hi - at, b.num_rows)
                    at += b.num_rows
                    if a < z:
                        b = b.slice(a, z - a)
                        yield passage_text(b.column("title"), b.column("text")).to_pylist(), b.column("doc_id")
        start += rows


def _save_bm25(index, uri: str) -> int:
    """Save ``index`` to local disk and move or upload it to ``uri``; its bytes."""
    import shutil
    import tempfile

    from raykd import dense_index as dx

    tmp = tempfile.mkdtemp(prefix="raykd-bm25-", dir=os.environ.get("RAYKD_TMP"))
    try:
        index.save(tmp)
        size = 0
        for name in sorted(os.listdir(tmp)):
            with dx.local_output(storage.join(uri, name)) as out, open(os.path.join(tmp, name), "rb") as src, \
                    open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 16 << 20)
            size += os.path.getsize(os.path.join(tmp, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return size


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bm25_part_stats(data: str, lo: int, hi: int, params: dict, read_rows: int = 65536):
    """BM25 statistics (:class:`raykd.bm25.CorpusStats`) of corpus rows ``[lo, hi)``; a Ray task.
    ``(stats, info)``."""
    from raykd.bm25 import BM25Params, CorpusStats

    t0 = time.time()
    stats = CorpusStats.count((t for t, _ in _corpus_range(data, lo, hi, read_rows)), BM25Params(**params))
    return stats, {"seconds": round(time.time() - t0, 3), "peak_rss_bytes": _peak_rss()}


def build_bm25_shard(data: str, uri: str, lo: int, hi: int, params: dict, stats, read_rows: int = 65536) -> dict:
    """Build and save (bm25s ``save``, to ``uri``) the BM25 index of corpus rows ``[lo, hi)`` with the whole
    corpus's statistics ``stats``; a Ray task. Returns its timings and peak memory."""
    from raykd.bm25 import BM25Index, BM25Params

    t0 = time.time()
    index = BM25Index(BM25Params(**params)).index_shard(_corpus_range(data, lo, hi, read_rows), stats)
    t1 = time.time()
    size = _save_bm25(index, uri)
    return {"first_row": lo, "passages": len(index.ids), "build_seconds": round(t1 - t0, 3),
            "save_seconds": round(time.time() - t1, 3), "bytes": size, "peak_rss_bytes": _peak_rss()}


def build_bm25(data: str, uri: str, params: dict, read_rows: int = 65536) -> dict:
    """Build the BM25 index of the store's corpus, read batch by batch, save it (bm25s ``save``) to local
    disk and move or upload it to ``uri``; a Ray task. Returns its timings and peak memory."""
    from raykd.bm25 import BM25Index, BM25Params
    from raykd.formats.store import passage_text

    t0 = time.time()
    store = TextStore(data)
    batches = ((passage_text(b.column("title"), b.column("text")).to_pylist(), b.column("doc_id"))
               for b in storage.iter_parquet_batches(store.corpus_uri, columns=["doc_id", "title", "text"],
                                                     batch_size=read_rows))
    index = BM25Index(BM25Params(**params)).index_batches(batches)
    t1 = time.time()
    size = _save_bm25(index, uri)
    return {"passages": len(index.ids), "build_seconds": round(t1 - t0, 3), "save_seconds": round(time.time() - t1, 3),
            "bytes": size, "peak_rss_bytes": _peak_rss()}


BM25_SHARDS = "raykd_bm25_shards.json"


def retrieve_bm25(uri: str, texts: list[str], k: int) -> tuple[np.ndarray, np.ndarray, int]:
    """One query shard against the saved index, loaded memory-mapped (an S3 index is downloaded once per
    node); a Ray task. A sharded index is searched shard by shard, each shard's top-k taken with global rows
    and merged (score, then row). ``(rows, scores, peak RSS bytes)``."""
    import json

    from raykd.bm25 import BM25Index

    folder = storage.local_dir(uri)
    if not os.path.exists(os.path.join(folder, BM25_SHARDS)):
        rows, scores = BM25Index.load(folder, mmap=True).search_rows(texts, k)
        return rows, scores, _peak_rss()
    with open(os.path.join(folder, BM25_SHARDS)) as f:
        shards = json.load(f)["shards"]
    rows, scores = [], []
    for sh in shards:
        r, s = BM25Index.load(os.path.join(folder, sh["name"]), mmap=True).search_rows(texts, k)
        rows.append(r.astype(np.int64) + sh["first_row"])
        scores.append(s)
    rows, scores = np.concatenate(rows, axis=1), np.concatenate(scores, axis=1)
    best = np.lexsort((rows, -scores), axis=-1)[:, :k]
    return np.take_along_axis(rows, best, 1), np.take_along_axis(scores, best, 1), _peak_rss()


def ensure_bm25_index(cfg: SearchConfig, store: TextStore, stats: dict) -> str:
    """The BM25 index URI, built by a Ray task (memory asked for) unless a finished one with these settings
    is there; a finished index is reused by every later search."""
    import ray

    from raykd.runtime import init_ray

    uri = cfg.bm25_index or storage.join(cfg.out, "bm25-index")
    params = dataclasses.asdict(_bm25_params(cfg))
    if cfg.bm25_shards < 1:
        raise UserError(f"--bm25-shards must be 1 or more (got {cfg.bm25_shards})")
    sharded = {"shards": cfg.bm25_shards} if cfg.bm25_shards > 1 else {}
    claim = finished.claim(uri, "bm25_index", {**params, **sharded, "data": cfg.data,
                                               "data.created_at": finished.input_identity(cfg.data)})
    if claim.finished:
        return uri
    if sharded:
        return build_bm25_shards(cfg, store, uri, params, claim, stats)
    memory = int(cfg.bm25_memory_gb * 2**30) or bm25_build_memory(store)
    log.info("building the BM25 index of %s in a Ray task asking for %.1f GiB", store.uri, memory / 2**30)
    init_ray()
    info = ray.get(ray.remote(build_bm25).options(num_cpus=1, memory=memory, max_retries=0).remote(
        cfg.data, uri, params))
    storage.write_manifest(uri, "bm25_index", format="raykd.bm25", config=params, inputs={"data": cfg.data},
                           counts={"passages": info["passages"]}, stats={**info, "memory_requested": memory},
                           fingerprint=claim.fingerprint)
    stats["bm25_build"] = info
    log.info("BM25 index of %s passages built in %.1f s (peak RSS %.2f GiB)", f"{info['passages']:,}",
             info["build_seconds"], info["peak_rss_bytes"] / 2**30)
    return uri


def build_bm25_shards(cfg: SearchConfig, store: TextStore, uri: str, params: dict, claim, stats: dict) -> str:
    """The sharded BM25 index: Ray tasks count the statistics of the shards' row ranges (df per term,
    passages, tokens), merged here into the whole corpus's; then one Ray task per shard builds and saves its
    index with them (memory asked for: :func:`bm25_shard_memory`); ``raykd_bm25_shards.json`` lists the
    shards and ``ids.parquet`` holds every row's doc_id."""
    import json

    import ray

    from raykd.bm25 import CorpusStats
    from raykd.runtime import init_ray

    groups = _corpus_row_groups(store)
    n = sum(g[2] for g in groups)
    text = sum(g[3] for g in groups)
    shards = max(1, min(cfg.bm25_shards, n))
    bounds = [n * i // shards for i in range(shards + 1)]
    init_ray()
    t0 = time.time()
    task = ray.remote(bm25_part_stats).options(num_cpus=1, memory=BM25_STATS_MEMORY, max_retries=0)
    parts = ray.get([task.remote(cfg.data, bounds[i], bounds[i + 1], params) for i in range(shards)])
    total = CorpusStats.merge([p[0] for p in parts])
    del parts[:]
    t1 = time.time()
    log.info("BM25 statistics of %s passages (%s terms) counted in %.1f s by %d tasks", f"{total.n_docs:,}",
             f"{len(total.terms):,}", t1 - t0, shards)
    ref = ray.put(total)
    infos, memory = [], []
    for i in range(shards):
        mem = int(cfg.bm25_memory_gb * 2**30) or bm25_shard_memory(text * (bounds[i + 1] - bounds[i]) / max(n, 1),
                                                                   len(total.terms))
        memory.append(mem)
        infos.append(ray.remote(build_bm25_shard).options(num_cpus=1, memory=mem, max_retries=0).remote(
            cfg.data, storage.join(uri, f"shard-{i:05d}"), bounds[i], bounds[i + 1], params, ref))
    log.info("building %d BM25 shards of %s in Ray tasks asking for up to %.1f GiB each", shards, store.uri,
             max(memory) / 2**30)
    infos = ray.get(infos)
    for i, info in enumerate(infos):
        info.update(name=f"shard-{i:05d}", memory_requested=memory[i])
    ids = pa.concat_arrays([storage.read_parquet(storage.join(uri, info["name"], "ids.parquet"))["doc_id"]
                            .combine_chunks() for info in infos])
    storage.write_parquet_atomic(pa.table({"doc_id": ids}), storage.join(uri, "ids.parquet"))
    storage.write_bytes_atomic(storage.join(uri, BM25_SHARDS), json.dumps(
        {"shards": [{"name": i["name"], "first_row": i["first_row"], "passages": i["passages"]} for i in infos],
         "passages": total.n_docs, "tokens": total.n_tokens, "terms": len(total.terms)}, indent=1).encode())
    info = {"passages": total.n_docs, "shards": infos, "terms": len(total.terms), "stats_seconds": round(t1 - t0, 3),
            "build_seconds": round(time.time() - t1, 3), "bytes": sum(i["bytes"] for i in infos),
            "peak_rss_bytes": max(i["peak_rss_bytes"] for i in infos)}
    storage.write_manifest(uri, "bm25_index", format="raykd.bm25", config={**params, "shards": shards},
                           inputs={"data": cfg.data}, counts={"passages": total.n_docs, "shards": shards},
                           stats={**info, "memory_requested": max(memory)}, fingerprint=claim.fingerprint)
    stats["bm25_build"] = info
    log.info("BM25 index of %s passages built in %d shards in %.1f s (peak RSS per shard task %.2f GiB)",
             f"{total.n_docs:,}", shards, time.time() - t0, info["peak_rss_bytes"] / 2**30)
    return uri


def bm25_run(cfg: SearchConfig, store: TextStore, split: str, latency: dict, stats: dict | None = None,
             only: set[str] | None = None) -> pa.Table:
    """The BM25 run of ``split`` (the queries in ``only`` when given) as a ranked run table
    (:func:`raykd.runs.top_k_table`), its queries retrieved by ``cfg.bm25_workers`` Ray tasks."""
    import ray

    stats = {} if stats is None else stats
    queries = split_queries(store, split, only)
    uri = ensure_bm25_index(cfg, store, stats)
    texts = queries["text"].to_pylist()
    n_shards = max(1, min(cfg.bm25_workers, len(texts)))
    bounds = [len(texts) * i // n_shards for i in range(n_shards + 1)]
    t1 = time.perf_counter()
    # a fresh worker per task (max_calls=1): ru_maxrss is a process's lifetime peak, so in a reused worker (one
    # that built the index, say) the reported peak would be that earlier task's
    task = ray.remote(max_calls=1)(retrieve_bm25).options(num_cpus=1, max_retries=0)
    parts = ray.get([task.remote(uri, texts[bounds[i]:bounds[i + 1]], cfg.k) for i in range(n_shards)])
    latency["search"] = 1000 * (time.perf_counter() - t1) / max(queries.num_rows, 1)
    stats["bm25_retrieve_peak_rss_bytes"] = max(p[2] for p in parts)
    rows = np.concatenate([p[0] for p in parts]) if texts else np.zeros((0, 0), np.int64)
    scores = np.concatenate([p[1] for p in parts]) if texts else np.zeros((0, 0), np.float32)
    ids = storage.read_parquet(storage.join(uri, "ids.parquet"))["doc_id"].combine_chunks()
    # bm25s pads queries with fewer matches with score-0 documents
    return top_k_table(queries["query_id"].combine_chunks(), ids, rows, scores, scores > 0)


def rerank_candidates(uri: str, store: TextStore, split: str, k: int) -> pa.Table:
    """The top ``k`` candidates per query of run ``uri`` (:func:`raykd.runs.run_table`, trec_eval's order) as Arrow
    columns ``qid``, ``query_id``, ``pid``, ``doc_id``, sorted by qid, then rank. A query that is not in ``split``,
    a document twice for a query, or a document that is not in the corpus is an error naming the file and line
    (or run.parquet's row; :func:`raykd.runs.store_run`)."""
    cands = store_run(uri, store, split)
    cands = cands.sort_by([("qid", "ascending"), ("score", "descending"), ("doc_id", "descending")])
    keep = ranks_within(cands["qid"].to_numpy()) <= k
    return cands.filter(pa.array(keep)).drop_columns(["score"])


def ranked(scored: pa.Table, score: str = "score") -> pa.Table:
    """Re-ranked rows (qid, query_id, pid, doc_id and their ``score`` column) of whole queries in trec_eval's
    order with ranks 1..n: the columns of ``run.parquet``."""
    t = scored.sort_by([("qid", "ascending"), (score, "descending"), ("doc_id", "descending")])
    return pa.table({"qid": t["qid"], "query_id": t["query_id"], "pid": t["pid"], "doc_id": t["doc_id"],
                     "rank": pa.array(ranks_within(t["qid"].to_numpy()), pa.int32()),
                     "score": t[score].cast(pa.float32())})


def _first_of_each_pair(t: pa.Table) -> pa.Table:
    """``t`` with one row per (qid, pid), the first."""
    q, p = t["qid"].to_numpy(), t["pid"].to_numpy()
    order = np.lexsort((np.arange(len(q)), p, q))
    dup = np.zeros(len(q), dtype=bool)
    dup[order[1:]] = (q[order][1:] == q[order][:-1]) & (p[order][1:] == p[order][:-1])
    return t.filter(pa.array(~dup)) if dup.any() else t


def rerank_pool(cfg: SearchConfig) -> dict:
    """The scoring actor pool's size and resources: GPUs when the cluster has any (``rerank_gpus`` each, one
    actor per share), else CPU actors of ``rerank_cpus`` each filling half the cluster's CPUs (the other half
    reads, looks up texts and tokenises); ``rerank_actors`` fixes the number."""
    import ray

    res = ray.cluster_resources()
    gpus = cfg.rerank_gpus if cfg.rerank_gpus is not None else (
        1.0 if res.get("GPU", 0) > 0 and cfg.device != "cpu" else 0.0)
    if cfg.rerank_actors > 0:
        n = cfg.rerank_actors
    elif gpus > 0:
        n = max(1, int(res.get("GPU", 0) // gpus))
    else:
        n = max(1, int(res.get("CPU", 1) / 2 // max(cfg.rerank_cpus, 1e-9)))
    return {"actors": n, "gpus_per_actor": gpus, "cpus_per_actor": cfg.rerank_cpus,
            "torch_threads": cfg.torch_threads or max(1, int(cfg.rerank_cpus))}


def rerank_run(cfg: SearchConfig, store: TextStore, split: str, latency: dict,
               stats: dict) -> tuple[pa.Table, list[str]]:
    """Re-score the top ``cfg.k`` candidates per query of ``cfg.rerank`` with ``cfg.scorer`` through the scorer
    pipeline (:mod:`raykd.stages.scoring`): a Ray Dataset of (qid, pid) pairs, blocks of whole queries -> texts
    from the shared lookups -> CPU tokenising -> the actor pool; each block's queries are ranked and written
    as ``parts/part-<block>.parquet`` as it arrives. Returns the run as ``run.parquet``'s columns, and the parts."""
    import ray
    import ray.data

    from raykd.models.teachers import scorer_spec
    from raykd.runtime import init_ray
    from raykd.stages import scoring
    from raykd.stages import shared_texts as sharing

    spec = str(scorer_spec(cfg.scorer))
    cands = rerank_candidates(cfg.rerank, store, split, cfg.k)
    n_queries = len(np.unique(cands["qid"].to_numpy()))
    # blocks of whole queries of about rerank_block pairs: a block's rows are its queries' complete lists
    ranks = ranks_within(cands["qid"].to_numpy())
    starts = np.flatnonzero(ranks == 1)
    block = np.repeat(starts // max(1, cfg.rerank_block), np.diff(np.r_[starts, cands.num_rows])).astype(np.int64)
    cands = cands.append_column("block", pa.array(block))
    bounds = np.flatnonzero(np.r_[True, block[1:] != block[:-1], True])
    blocks = [cands.slice(a, b - a) for a, b in zip(bounds[:-1], bounds[1:])]
    expected = {int(b["block"][0].as_py()): b.num_rows for b in blocks}
    t0 = time.perf_counter()
    init_ray()
    pool = rerank_pool(cfg)
    log.info("re-ranking %s pairs of %d queries with %s in %d block(s): %d actor(s), %g GPU(s) each", f"{cands.num_rows:,}",
             n_queries, spec, len(blocks), pool["actors"], pool["gpus_per_actor"])
    parts, out = [], []
    if blocks:
        passages = sharing.share_passages(store.corpus_parts(), pids=ray.put(np.unique(cands["pid"].to_numpy())),
                                          where=f"the corpus of {store.uri}")
        queries = sharing.share(store.query_lookup(split))
        ds = scoring.scored(
            ray.data.from_arrow(blocks), [("rerank", spec)], passages, queries, query_max_length=None,
            passage_max_length=None, batch_size=cfg.batch_size, block_pairs=max(expected.values()), min_actors=1,
            max_actors=pool["actors"], gpus_per_actor=pool["gpus_per_actor"], cpus_per_actor=pool["cpus_per_actor"],
            actor_resources=None, cpus_per_task=cfg.rerank_task_cpus, torch_threads=pool["torch_threads"],
            load_options={"rerank": {"store": cfg.data}} if spec.startswith("bm25") else None)
        ds = ds.select_columns(["block", "qid", "query_id", "pid", "doc_id", "score__rerank"])
        gathered: dict[int, list[pa.Table]] = {}
        written: set[int] = set()
        progress = Progress(log, "pairs re-ranked", cands.num_rows)
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            for b in np.unique(batch["block"].to_numpy()).tolist():
                if b in written:  # rows of a block retried after it was complete
                    continue
                rows = batch.filter(pc.equal(batch["block"], b))
                gathered.setdefault(b, []).append(rows)
                if sum(x.num_rows for x in gathered[b]) < expected[b]:
                    continue
                t = _first_of_each_pair(pa.concat_tables(gathered[b]))  # a retried block's rows come twice
                if t.num_rows == expected[b]:
                    del gathered[b]
                    t = ranked(t, "score__rerank")
                    name = f"parts/part-{b:05d}.parquet"
                    storage.write_parquet_atomic(t, storage.join(cfg.out, name))
                    parts.append((b, name))
                    out.append((b, t))
                    written.add(b)
            progress.update(batch.num_rows)
        progress.close()
        if gathered or len(out) != len(blocks):
            raise RuntimeError(f"the re-rank pipeline lost pairs: {len(blocks) - len(out)} of {len(blocks)} "
                               f"block(s) incomplete")
    latency["rerank"] = 1000 * (time.perf_counter() - t0) / max(n_queries, 1)
    stats["rerank"] = {"scorer": spec, "pairs": cands.num_rows, "blocks": len(blocks), **pool}
    if storage.has_manifest(cfg.rerank):  # the first stage's cost is part of a re-ranking pipeline's
        for part, ms in storage.read_manifest(cfg.rerank)["stats"].get("latency_ms", {}).items():
            if part != "total":
                latency[part] = latency.get(part, 0.0) + ms
    names = [name for _, name in sorted(parts)]
    if not out:
        return ranked(pa.table({"qid": pa.array([], pa.int64()), "query_id": pa.array([], pa.string()),
                                "pid": pa.array([], pa.int64()), "doc_id": pa.array([], pa.string()),
                                "score": pa.array([], pa.float32())})), names
    return pa.concat_tables([t for _, t in sorted(out, key=lambda x: x[0])]), names


def tuning_sample(qrels: dict, n: int, seed: int) -> set[str]:
    """``n`` judged queries drawn without replacement (seeded) from ``qrels``; all of them when ``n`` is 0 or
    at least their number."""
    judged = sorted(qrels)
    if n <= 0 or n >= len(judged):
        return set(judged)
    rng = np.random.default_rng(seed)
    return {judged[i] for i in rng.choice(len(judged), n, replace=False)}


def sweep_alphas(cfg: SearchConfig, tune_dense: pa.Table, tune_sparse: pa.Table, qrels: dict,
                 grid: list[float]) -> list[tuple[float, float]]:
    """The tuning curve, alphas split over parallel Ray tasks (each fuses vectorised, :mod:`raykd.fusion`)."""
    import ray

    from raykd import fusion
    from raykd.runtime import init_ray

    init_ray()
    d, s = ray.put(tune_dense), ray.put(tune_sparse)
    q = ray.put(qrels)
    chunks = [grid[i :: max(1, cfg.bm25_workers)] for i in range(min(len(grid), max(1, cfg.bm25_workers)))]
    task = ray.remote(fusion.sweep).options(num_cpus=1, max_retries=0)
    curve = [av for part in ray.get([task.remote(d, s, q, c, cfg.tune_measure, cfg.k) for c in chunks])
             for av in part]
    return sorted(curve)


def input_run(uri: str, store: TextStore, split: str, only: set[str] | None = None) -> pa.Table:
    """A hybrid's input run as a run table (``query_id``, ``doc_id``, ``score``), checked against the store
    (:func:`raykd.runs.store_run`): a search output's run.parquet, with the scores its run.trec prints (so the
    output and its run.trec fuse alike), else the TREC file."""
    return store_run(uri, store, split, only=only, printed=True).select(["query_id", "doc_id", "score"])


def hybrid_run(cfg: SearchConfig, store: TextStore, split: str, latency: dict, stats: dict) -> pa.Table:
    """The TCT Eq. 7 fusion of ``cfg.dense`` and ``cfg.sparse`` as a ranked run table (queries in query_id
    order); alpha given, or tuned (``stats.alpha_tuning``)."""
    from raykd import fusion

    if not cfg.dense or not cfg.sparse:
        raise UserError("hybrid needs --dense RUN and --sparse RUN of the split")
    dense = input_run(cfg.dense, store, split)
    sparse = input_run(cfg.sparse, store, split)
    alpha = cfg.alpha
    if alpha is None:
        qrels = store_qrels(store, cfg.tune_split)
        sample = tuning_sample(qrels, cfg.tune_queries, cfg.tune_seed)
        qrels = {q: qrels[q] for q in sample}
        if cfg.tune_dense and cfg.tune_sparse:
            td = input_run(cfg.tune_dense, store, cfg.tune_split, only=sample)
            ts = input_run(cfg.tune_sparse, store, cfg.tune_split, only=sample)
        elif cfg.index:
            td = dense_run(cfg, store, cfg.tune_split, {}, only=sample)
            ts = bm25_run(cfg, store, cfg.tune_split, {}, stats, only=sample)
        else:
            raise UserError("hybrid without --alpha tunes it: give --tune-dense and --tune-sparse runs of "
                            "--tune-split, or --index to compute them")
        grid = sorted(float(x) for x in (cfg.alpha_grid or fusion.DEFAULT_ALPHA_GRID))
        curve = sweep_alphas(cfg, td, ts, qrels, grid)
        alpha = fusion.best_alpha(curve)
        stats["alpha_tuning"] = {"split": cfg.tune_split, "measure": cfg.tune_measure, "best": alpha,
                                 "queries": len(sample), "seed": cfg.tune_seed,
                                 "curve": [[a, v] for a, v in curve]}
        log.info("alpha tuned on %d %s queries: %g (%s %.4f)", len(sample), cfg.tune_split, alpha,
                 cfg.tune_measure, dict(curve)[alpha])
    stats["alpha"] = alpha
    # a hybrid query costs what its two inputs cost (when they are search outputs) plus the fusion
    for uri in (cfg.dense, cfg.sparse):
        if storage.has_manifest(uri):
            for part, ms in storage.read_manifest(uri)["stats"].get("latency_ms", {}).items():
                if part != "total":
                    latency[part] = latency.get(part, 0.0) + ms
    t0 = time.perf_counter()
    run = fusion.ListUnion(dense, sparse).table(alpha, cfg.k)
    latency["fusion"] = 1000 * (time.perf_counter() - t0) / max(pc.count_distinct(run["query_id"]).as_py(), 1)
    return run


# ------------------------------------------------------------------------------------------- the stage
def mode_of(cfg: SearchConfig) -> str:
    modes = [m for m, on in (("hybrid", cfg.hybrid), ("rerank", cfg.rerank), ("bm25", cfg.bm25)) if on]
    if len(modes) > 1:
        raise UserError(f"choose one of --hybrid, --rerank, --bm25 (got {', '.join(modes)})")
    if modes:
        return modes[0]
    if cfg.index:
        return "dense"
    raise UserError("search needs --index (dense), --bm25, --rerank RUN --scorer PATH, or --hybrid")


def search(cfg: SearchConfig) -> storage.Manifest:
    """Retrieve (or re-rank, or fuse) the top ``cfg.k`` of every query of ``cfg.split``; write the run."""
    if not cfg.data or not cfg.out:
        raise UserError("search needs --data (a text store) and --out")
    if cfg.k < 1:
        raise UserError(f"--k must be >= 1, got {cfg.k}")
    mode = mode_of(cfg)
    # Ray tasks get these as strings and do not share the driver's working directory
    cfg = dataclasses.replace(cfg, data=storage.absolute(cfg.data), out=storage.absolute(cfg.out),
                              index=storage.absolute(cfg.index), bm25_index=storage.absolute(cfg.bm25_index))
    if mode == "rerank" and not cfg.scorer:
        raise UserError("--rerank needs --scorer PATH")
    config = dataclasses.asdict(cfg)
    inputs = ("data", "index", "rerank", "scorer", "dense", "sparse", "tune_dense", "tune_sparse")
    claim = finished.claim(cfg.out, "search", finished.fingerprint(
        cfg, **{f"{k}.created_at": finished.input_identity(getattr(cfg, k)) for k in inputs}), cfg.overwrite)
    if claim.finished:
        log.info("%s already holds this search; nothing to do", cfg.out)
        return claim.manifest
    if cfg.torch_threads:
        import torch

        torch.set_num_threads(cfg.torch_threads)
    t0 = time.perf_counter()
    store = TextStore(cfg.data)
    latency: dict = {}
    stats: dict = {"mode": mode}
    parts: list[str] = []
    if mode == "dense":
        table = run_columns(dense_run(cfg, store, cfg.split, latency), store, cfg.split)
    elif mode == "bm25":
        table = run_columns(bm25_run(cfg, store, cfg.split, latency, stats), store, cfg.split)
    elif mode == "rerank":
        table, parts = rerank_run(cfg, store, cfg.split, latency, stats)
    else:
        table = run_columns(hybrid_run(cfg, store, cfg.split, latency, stats), store, cfg.split)
    single = latency.pop("single", None)
    latency["total"] = sum(latency.values())
    stats["latency_ms"] = {k: round(v, 4) for k, v in latency.items()}
    if single:
        stats["latency_ms_single"] = single
    write_run(table, cfg.out, tag=cfg.tag or f"raykd-{mode}")
    counts = {"queries": pc.count_distinct(table["query_id"]).as_py(), "results": table.num_rows, "k": cfg.k}
    m = storage.write_manifest(
        cfg.out,
        "search",
        format=FORMAT,
        format_version=VERSION,
        config=config,
        inputs={k: getattr(cfg, k) for k in ("data", "index", "rerank", "scorer", "dense", "sparse") if getattr(cfg, k)},
        counts=counts,
        stats=stats,
        parts=["run.trec", "run.parquet", *parts],
        timings={"total_seconds": round(time.perf_counter() - t0, 3)},
        fingerprint=claim.fingerprint,
    )
    log.info("%s run of %d queries written to %s (%.2f ms/query)", mode, counts["queries"], cfg.out,
             latency["total"])
    return m
