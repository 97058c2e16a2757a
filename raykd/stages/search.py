"""search: a split's queries -> a top-k run, four ways (format ``raykd.run`` v1).

- dense (``index``): encode the queries with the index's own encoder spec, search the merged index or the shard
  set (top-k merged over shards), see :mod:`raykd.dense_index`;
- BM25 (``bm25``): bm25s over the store's corpus (:mod:`raykd.bm25`);
- re-rank (``rerank`` + ``scorer``): score the top ``k`` candidates of a run (e.g. BM25 top-1000) with any raykd
  scorer (student or teacher, :func:`raykd.models.registry.load_scorer`);
- hybrid (``hybrid`` + ``dense`` + ``sparse``): TCT Eq. 7 (:mod:`raykd.fusion`); ``alpha`` given, or tuned by grid
  search on the ``tune_split`` queries (their dense and sparse runs given as ``tune_dense`` / ``tune_sparse``,
  or computed here from ``index`` and BM25).

Output under ``out``::

    run.trec       TREC run (original query and document ids), trec_eval order, ranks 1..k
    run.parquet    qid int64, query_id string, pid int64, doc_id string, rank int32, score float32
    manifest.json  stage "search"; counts; stats.latency_ms = per-query milliseconds of each component
                   (query_encoding, search, rerank, fusion, total), as in TCT-ColBERT's Table 2; written last

Latency is wall time of the batched component divided by the number of queries (a hybrid adds its inputs'
components when they are search outputs; a re-ranker adds its candidate run's); ``latency_queries = N`` also
times N queries one at a time (batch size 1, the paper's setting) as ``stats.latency_ms_single``, with
the indexes kept in memory between queries (so that must fit).
A re-run with the same ``out`` and settings returns the finished output (:mod:`raykd.finished`).

Runs given as input may be a TREC file or a search output URI (its ``run.trec``). A run naming a query that is
not in the split, or a document that is not in the corpus, is an error naming the file and line.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from raykd import finished, storage
from raykd.config import field
from raykd.errors import FormatError, UserError
from raykd.formats import trec
from raykd.formats.store import TextStore
from raykd.log import Progress, get_logger
from raykd.runs import FORMAT, VERSION, run_file, store_qrels

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
    nprobe: int | None = field(None, help="IVF: lists probed per query.")
    ef_search: int | None = field(None, help="HNSW: efSearch.")
    bm25: bool = field(False, help="BM25 retrieval over the store's corpus.", flag="--bm25")
    k1: float = field(0.9, help="BM25 k1 (Anserini's value).")
    b: float = field(0.4, help="BM25 b (Anserini's value).")
    stemmer: str = field("porter", help="BM25 stemmer.", choices=["porter", "english", "none"])
    rerank: str | None = field(None, help="Candidate run to re-rank (TREC file or search output URI).")
    scorer: str | None = field(None, help="Re-rank: a saved raykd scorer or HF cross-encoder folder.")
    hybrid: bool = field(False, help="TCT Eq. 7 fusion of --dense and --sparse.", flag="--hybrid")
    dense: str | None = field(None, help="Hybrid: dense run of --split.")
    sparse: str | None = field(None, help="Hybrid: sparse (BM25) run of --split.")
    alpha: float | None = field(None, help="Hybrid weight of the sparse score; unset: tuned on --tune-split.")
    tune_split: str = field("train", help="Hybrid: query split whose qrels tune alpha.")
    tune_dense: str | None = field(None, help="Hybrid: dense run of --tune-split (else made from --index).")
    tune_sparse: str | None = field(None, help="Hybrid: BM25 run of --tune-split (else made here).")
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
def split_queries(store: TextStore, split: str) -> pa.Table:
    """The split's queries; an empty query text is an error naming the row and query id."""
    t = store.queries(split)
    uri = storage.join(store.uri, "queries", f"{split}.parquet")
    for row, (qid, text) in enumerate(zip(t["query_id"].to_pylist(), t["text"].to_pylist())):
        if text is None or not str(text).strip():
            raise FormatError(uri, None, f"row {row}: query {qid} has an empty text; a query needs words to retrieve "
                                         f"with (drop it when preparing the store)")
    return t


def read_store_run(uri: str, store: TextStore, split: str, k: int | None = None) -> trec.Run:
    """A run whose every query is in ``split`` and every document in the corpus; top ``k`` per query kept."""
    path = run_file(uri)
    queries = set(store.queries(split)["query_id"].to_pylist())
    docs = store.pid_of_doc_id()
    run: trec.Run = {}
    for r in trec.iter_run(path):
        if r.qid not in queries:
            raise FormatError(path, r.line, f"query {r.qid} is not in split {split!r} of {store.uri}")
        if r.docno not in docs:
            raise FormatError(path, r.line, f"document {r.docno} is not in the corpus of {store.uri}")
        d = run.setdefault(r.qid, {})
        if r.docno in d:
            raise FormatError(path, r.line, f"document {r.docno} appears twice for query {r.qid}")
        d[r.docno] = r.score
    if k is not None:
        run = {q: dict(trec.trec_order(d)[:k]) for q, d in run.items()}
    return run


# ------------------------------------------------------------------------------------------- modes
def dense_run(cfg: SearchConfig, store: TextStore, split: str, latency: dict) -> trec.Run:
    from raykd.dense_index import DenseIndex
    from raykd.encoders import DenseEncoder, EncoderSpec

    di = DenseIndex(cfg.index, cache=cfg.latency_queries > 0)  # timing single queries: load shards once
    queries = split_queries(store, split)
    texts = queries["text"].to_pylist()
    spec = EncoderSpec(**di.encoder)
    if cfg.precision:
        spec.precision = cfg.precision
    encoder = DenseEncoder(spec, device=cfg.device)
    t0 = time.perf_counter()
    q = encoder.encode_queries(texts, batch_size=cfg.batch_size)
    t1 = time.perf_counter()
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
    doc_ids = np.asarray(di.ids()["doc_id"].to_pylist(), dtype=object)
    run: trec.Run = {}
    for i, qid in enumerate(queries["query_id"].to_pylist()):
        ok = rows[i] >= 0
        run[qid] = dict(zip(doc_ids[rows[i][ok]].tolist(), scores[i][ok].astype(float).tolist()))
    return run


def bm25_run(cfg: SearchConfig, store: TextStore, split: str, latency: dict) -> trec.Run:
    from raykd.bm25 import BM25Index, BM25Params

    corpus = store.corpus(columns=["doc_id", "title", "text"])
    from raykd.formats.store import passage_text

    t0 = time.perf_counter()
    index = BM25Index(BM25Params(k1=cfg.k1, b=cfg.b, stemmer=cfg.stemmer)).index(
        passage_text(corpus["title"], corpus["text"]).to_pylist(), corpus["doc_id"].to_pylist()
    )
    log.info("BM25 index of %s passages built in %.1f s", f"{corpus.num_rows:,}", time.perf_counter() - t0)
    queries = split_queries(store, split)
    t1 = time.perf_counter()
    ids, scores = index.search(queries["text"].to_pylist(), cfg.k)
    latency["search"] = 1000 * (time.perf_counter() - t1) / max(queries.num_rows, 1)
    run: trec.Run = {}
    for i, qid in enumerate(queries["query_id"].to_pylist()):
        keep = scores[i] > 0  # bm25s pads queries with fewer matches with score-0 documents
        run[qid] = dict(zip(ids[i][keep].tolist(), scores[i][keep].astype(float).tolist()))
    return run


def rerank_run(cfg: SearchConfig, store: TextStore, split: str, latency: dict) -> trec.Run:
    import torch

    from raykd.models.registry import load_scorer

    candidates = read_store_run(cfg.rerank, store, split, k=cfg.k)
    queries = split_queries(store, split)
    qtext = dict(zip(queries["query_id"].to_pylist(), queries["text"].to_pylist()))
    pid_of = store.pid_of_doc_id()
    model = load_scorer(cfg.scorer)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device).eval()
    pairs = [(q, d) for q, docs in candidates.items() for d in docs]
    # only the candidates' passages, read from the corpus parts into pid-sorted blocks (raykd.texts)
    pids = np.array([pid_of[d] for _, d in pairs], dtype=np.int64)
    passages = store.passage_lookup(pids=pids)
    scores = np.empty(len(pairs), dtype=np.float32)
    progress = Progress(log, "pairs re-ranked", len(pairs))
    t0 = time.perf_counter()
    for i in range(0, len(pairs), cfg.batch_size):
        chunk = pairs[i : i + cfg.batch_size]
        with torch.no_grad():
            s = model.score([qtext[q] for q, _ in chunk], passages.texts(pids[i : i + cfg.batch_size]))
        scores[i : i + len(chunk)] = s.float().cpu().numpy()
        progress.update(len(chunk))
    progress.close()
    latency["rerank"] = 1000 * (time.perf_counter() - t0) / max(len(candidates), 1)
    if storage.has_manifest(cfg.rerank):  # the first stage's cost is part of a re-ranking pipeline's
        for part, ms in storage.read_manifest(cfg.rerank)["stats"].get("latency_ms", {}).items():
            if part != "total":
                latency[part] = latency.get(part, 0.0) + ms
    run: trec.Run = {}
    for (q, d), s in zip(pairs, scores.tolist()):
        run.setdefault(q, {})[d] = s
    return run


def hybrid_run(cfg: SearchConfig, store: TextStore, split: str, latency: dict, stats: dict) -> trec.Run:
    from raykd import fusion

    if not cfg.dense or not cfg.sparse:
        raise UserError("hybrid needs --dense RUN and --sparse RUN of the split")
    dense = read_store_run(cfg.dense, store, split)
    sparse = read_store_run(cfg.sparse, store, split)
    alpha = cfg.alpha
    if alpha is None:
        qrels = store_qrels(store, cfg.tune_split)
        if cfg.tune_dense and cfg.tune_sparse:
            td = read_store_run(cfg.tune_dense, store, cfg.tune_split)
            ts = read_store_run(cfg.tune_sparse, store, cfg.tune_split)
        elif cfg.index:
            td = dense_run(cfg, store, cfg.tune_split, {})
            ts = bm25_run(cfg, store, cfg.tune_split, {})
        else:
            raise UserError("hybrid without --alpha tunes it: give --tune-dense and --tune-sparse runs of "
                            "--tune-split, or --index to compute them")
        grid = cfg.alpha_grid or fusion.DEFAULT_ALPHA_GRID
        alpha, curve = fusion.tune_alpha(td, ts, qrels, grid, cfg.tune_measure, cfg.k)
        stats["alpha_tuning"] = {"split": cfg.tune_split, "measure": cfg.tune_measure, "best": alpha,
                                 "curve": [[a, v] for a, v in curve]}
        log.info("alpha tuned on %s: %g (%s %.4f)", cfg.tune_split, alpha, cfg.tune_measure, dict(curve)[alpha])
    stats["alpha"] = alpha
    # a hybrid query costs what its two inputs cost (when they are search outputs) plus the fusion
    for uri in (cfg.dense, cfg.sparse):
        if storage.has_manifest(uri):
            for part, ms in storage.read_manifest(uri)["stats"].get("latency_ms", {}).items():
                if part != "total":
                    latency[part] = latency.get(part, 0.0) + ms
    t0 = time.perf_counter()
    run = fusion.hybrid(dense, sparse, alpha, cfg.k)
    latency["fusion"] = 1000 * (time.perf_counter() - t0) / max(len(run), 1)
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
    if mode == "dense":
        run = dense_run(cfg, store, cfg.split, latency)
    elif mode == "bm25":
        run = bm25_run(cfg, store, cfg.split, latency)
    elif mode == "rerank":
        run = rerank_run(cfg, store, cfg.split, latency)
    else:
        run = hybrid_run(cfg, store, cfg.split, latency, stats)
    single = latency.pop("single", None)
    latency["total"] = sum(latency.values())
    stats["latency_ms"] = {k: round(v, 4) for k, v in latency.items()}
    if single:
        stats["latency_ms_single"] = single
    _write_run(cfg, store, run, mode)
    m = storage.write_manifest(
        cfg.out,
        "search",
        format=FORMAT,
        format_version=VERSION,
        config=config,
        inputs={k: getattr(cfg, k) for k in ("data", "index", "rerank", "scorer", "dense", "sparse") if getattr(cfg, k)},
        counts={"queries": len(run), "results": sum(len(d) for d in run.values()), "k": cfg.k},
        stats=stats,
        parts=["run.trec", "run.parquet"],
        timings={"total_seconds": round(time.perf_counter() - t0, 3)},
        fingerprint=claim.fingerprint,
    )
    log.info("%s run of %d queries written to %s (%.2f ms/query)", mode, len(run), cfg.out, latency["total"])
    return m


def _write_run(cfg: SearchConfig, store: TextStore, run: trec.Run, mode: str) -> None:
    queries = store.queries(cfg.split)
    qid_of = dict(zip(queries["query_id"].to_pylist(), queries["qid"].to_pylist()))
    pid_of = store.pid_of_doc_id()
    cols: dict[str, list] = {"qid": [], "query_id": [], "pid": [], "doc_id": [], "rank": [], "score": []}
    for q, docs in run.items():
        for rank, (d, s) in enumerate(trec.trec_order(docs)[: cfg.k], start=1):
            cols["qid"].append(qid_of[q])
            cols["query_id"].append(q)
            cols["pid"].append(pid_of[d])
            cols["doc_id"].append(d)
            cols["rank"].append(rank)
            cols["score"].append(s)
    table = pa.table(
        {
            "qid": pa.array(cols["qid"], pa.int64()),
            "query_id": pa.array(cols["query_id"], pa.string()),
            "pid": pa.array(cols["pid"], pa.int64()),
            "doc_id": pa.array(cols["doc_id"], pa.string()),
            "rank": pa.array(cols["rank"], pa.int32()),
            "score": pa.array(cols["score"], pa.float32()),
        }
    )
    storage.write_parquet_atomic(table, storage.join(cfg.out, "run.parquet"))
    trec.write_run(run, storage.join(cfg.out, "run.trec"), tag=cfg.tag or f"raykd-{mode}", k=cfg.k)
