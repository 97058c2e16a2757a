"""Runs and qrels as the stages hand them to each other (search writes them, evaluate and re-ranking read them).

- :func:`run_file`: a run given as a TREC file or as a search output URI (format ``raykd.run``, its ``run.trec``);
- :func:`store_qrels`: a text store split's qrels as ``{query_id: {doc_id: relevance}}``;
- :func:`run_table`: a run (file or search output) as an Arrow table, for runs too large for dicts (mining).
- :func:`corpus_ids` / :func:`pids_of`: doc_id -> pid by Arrow joins (``index_in``), never a Python dict over
  the corpus (MS MARCO: 8.8M passages).
- :func:`store_run`: a run checked against a store's split and corpus (file and line, or row, of a bad entry);
  :func:`top_k_table`: a searcher's (queries, k) result arrays as a ranked run table; :func:`run_columns` and
  :func:`write_run`: a ranked run table -> ``run.parquet`` and ``run.trec``. A run stays an Arrow table from the
  searcher to the files: MS MARCO dev (6,980 queries x 1000) as a dict of dicts held ~0.74 GB of Python objects.

Here rather than in a stage so that no stage imports another stage (tests/test_architecture.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raykd import storage
from raykd.errors import FormatError, UserError
from raykd.formats import trec
from raykd.formats.store import TextStore

FORMAT = "raykd.run"  # the format name a search output's manifest carries
VERSION = 1


def run_file(uri: str) -> str:
    """The TREC file of a run given as a file or as a search output URI."""
    if storage.has_manifest(uri):
        storage.read_manifest(uri, stage="search", format=FORMAT)
        return storage.join(uri, "run.trec")
    if not storage.exists(uri):
        raise UserError(f"run {uri} does not exist")
    return uri


def store_qrels(store: TextStore, split: str) -> dict[str, dict[str, int]]:
    """The qrels of ``split`` in ``store``, keyed by the original query and document ids."""
    if not store.has_qrels(split):
        raise UserError(f"{store.uri}: split {split!r} has no qrels")
    t = store.qrels(split)
    out: dict[str, dict[str, int]] = {}
    for q, d, r in zip(t["query_id"].to_pylist(), t["doc_id"].to_pylist(), t["relevance"].to_pylist()):
        out.setdefault(q, {})[d] = int(r)
    return out


def _run_parquet(uri: str) -> str | None:
    """The run.parquet of a search output (None: a TREC file, or an output holding only its run.trec)."""
    if storage.has_manifest(uri):
        storage.read_manifest(uri, stage="search", format=FORMAT)
        if storage.exists(storage.join(uri, "run.parquet")):
            return storage.join(uri, "run.parquet")
    return None


def run_table(uri: str, printed: bool = False) -> pa.Table:
    """A run as columns ``query_id`` (string), ``doc_id`` (string), ``score`` (float64), one row per line, for
    runs too large for a dict of dicts (400K queries x 200). A search output gives its ``run.trec``'s rows from
    ``run.parquet``; a TREC file (6 columns, or MS MARCO's 3 with score = -rank) is parsed by pyarrow's CSV
    reader, and by :func:`raykd.formats.trec.iter_run` (errors naming the line) when it is not plainly
    single-space or tab separated. ``printed``: a search output's scores as its run.trec prints them
    (:func:`raykd.formats.trec.printed_scores`), so the output and its run.trec give the same run."""
    parquet = _run_parquet(uri)
    if parquet:
        t = storage.read_parquet(parquet, columns=["query_id", "doc_id", "score"])
        score = trec.printed_scores(t["score"].to_numpy()) if printed else t["score"].cast(pa.float64())
        return t.set_column(2, "score", pa.array(score, pa.float64()) if printed else score)
    path = run_file(uri)
    try:
        return _run_table_csv(path)
    except (pa.ArrowInvalid, ValueError):
        rows = list(trec.iter_run(path))  # names the bad line
        return pa.table({"query_id": pa.array([r.qid for r in rows], pa.string()),
                         "doc_id": pa.array([r.docno for r in rows], pa.string()),
                         "score": pa.array([r.score for r in rows], pa.float64())})


def _run_table_csv(path: str) -> pa.Table:
    import pyarrow.compute as pc
    import pyarrow.csv as pcsv

    with storage.open_read(path, "rb") as f:
        head = f.read(1 << 16).split(b"\n", 1)[0]
    sep = "\t" if b"\t" in head else " "
    width = len(head.split(sep.encode()))
    if width not in (3, 6):
        raise ValueError(f"{width} columns")
    names = ["query_id", "doc_id", "rank"] if width == 3 else ["query_id", "q0", "doc_id", "rank", "score", "tag"]
    types = {"query_id": pa.string(), "doc_id": pa.string(), "rank": pa.int64(), "score": pa.float64()}
    with storage.open_read(path, "rb") as f:
        t = pcsv.read_csv(f, read_options=pcsv.ReadOptions(column_names=names, block_size=8 << 20),
                          parse_options=pcsv.ParseOptions(delimiter=sep, quote_char=False),
                          convert_options=pcsv.ConvertOptions(column_types=types, strings_can_be_null=False,
                                                            include_columns=[n for n in names if n in types]))
    score = pc.negate(t["rank"].cast(pa.float64())) if width == 3 else t["score"]
    if pc.any(pc.is_nan(score)).as_py():
        raise ValueError("NaN score")
    return pa.table({"query_id": t["query_id"], "doc_id": t["doc_id"], "score": score})


def corpus_ids(store: TextStore) -> pa.Table:
    """``pid`` and ``doc_id`` of every passage, as Arrow columns (no per-passage Python objects)."""
    return store.corpus(columns=["pid", "doc_id"])


def pids_of(ids: pa.Table, doc_ids) -> np.ndarray:
    """The pid of each of ``doc_ids`` (an Arrow array or a list) by an Arrow hash lookup in ``ids``
    (:func:`corpus_ids`); -1 where a document is not in the corpus."""
    doc_ids = doc_ids if isinstance(doc_ids, (pa.Array, pa.ChunkedArray)) else pa.array(doc_ids, pa.string())
    pos = pc.index_in(doc_ids, value_set=ids["doc_id"].combine_chunks())
    pids = ids["pid"].combine_chunks().take(pos)
    return pc.fill_null(pids, -1).to_numpy(zero_copy_only=False).astype(np.int64)


def top_k_table(query_ids: pa.Array, doc_ids: pa.Array, rows: np.ndarray, scores: np.ndarray,
                keep: np.ndarray) -> pa.Table:
    """A ranked run table (``query_id``, ``doc_id``, ``score``) from a searcher's ``(queries, k)`` result rows and
    scores, keeping the entries ``keep`` marks; ``query_ids[i]`` names query i and ``doc_ids[row]`` a row. Queries in
    ``query_ids``' order, each in trec_eval's order (score descending, ties by doc_id descending). Built by
    ``take`` on the arrays: no Python object per row."""
    counts = keep.sum(axis=1)
    query = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    t = pa.table({"query": query, "doc_id": doc_ids.take(pa.array(rows[keep].astype(np.int64))),
                  "score": pa.array(scores[keep])})
    t = t.take(pc.sort_indices(t, sort_keys=[("query", "ascending"), ("score", "descending"),
                                             ("doc_id", "descending")]))
    return pa.table({"query_id": query_ids.take(t["query"]), "doc_id": t["doc_id"], "score": t["score"]})


def ranks_within(qids: np.ndarray) -> np.ndarray:
    """1-based position of each row within its run of equal ``qids`` (rows grouped by query)."""
    if len(qids) == 0:
        return np.zeros(0, np.int32)
    starts = np.flatnonzero(np.r_[True, qids[1:] != qids[:-1]])
    first = np.repeat(starts, np.diff(np.r_[starts, len(qids)]))
    return (np.arange(len(qids)) - first + 1).astype(np.int32)


def run_columns(run: pa.Table, store: TextStore, split: str) -> pa.Table:
    """``run.parquet``'s columns (qid, query_id, pid, doc_id, rank, score) of a ranked run table (``query_id``,
    ``doc_id``, ``score``; each query's rows together, in trec_eval's order) whose queries are in ``split`` and
    documents in the corpus: qid and pid by Arrow lookups, ranks 1..n per query. ``score`` keeps its type."""
    queries = store.queries(split)
    pos = pc.index_in(run["query_id"], value_set=queries["query_id"].combine_chunks())
    qid = queries["qid"].combine_chunks().take(pos)
    return pa.table({"qid": qid, "query_id": run["query_id"],
                     "pid": pa.array(pids_of(corpus_ids(store), run["doc_id"]), pa.int64()), "doc_id": run["doc_id"],
                     "rank": pa.array(ranks_within(qid.to_numpy()), pa.int32()), "score": run["score"]})


def write_run(table: pa.Table, out: str, tag: str) -> None:
    """``run.parquet`` (``table``'s columns, :func:`run_columns`, score as float32) and ``run.trec`` (the same rows in
    the same order, each score as ``table`` holds it: a float64 fused score is printed from its float64), both under
    ``out``, written atomically; run.trec is streamed from the columns in slices."""
    storage.write_parquet_atomic(table.set_column(5, "score", table["score"].cast(pa.float32())).combine_chunks(),
                                 storage.join(out, "run.parquet"))

    def values(name: str):
        for b in table.select([name]).to_batches(max_chunksize=65536):
            yield from b.column(0).to_pylist()

    trec.write_ranked(values("query_id"), values("doc_id"), values("rank"), values("score"),
                      storage.join(out, "run.trec"), tag=tag)


def _codes(ids) -> np.ndarray:
    """Integer codes of ``ids`` (equal ids, equal codes; numbered in order of first appearance)."""
    return ids.combine_chunks().dictionary_encode().indices.to_numpy(zero_copy_only=False).astype(np.int64)


def repeated_rows(queries: np.ndarray, docs: np.ndarray) -> np.ndarray:
    """The rows whose (query, doc) codes an earlier row already has, in row order."""
    order = np.lexsort((np.arange(len(docs)), docs, queries))
    same = (queries[order][1:] == queries[order][:-1]) & (docs[order][1:] == docs[order][:-1])
    return np.sort(order[1:][same])


def checked_run(uri: str, corpus: pa.Table | None = None, where: str = "") -> pa.Table:
    """Run ``uri`` as :func:`run_table` gives it (a search output's scores as its run.trec prints them), refused
    with the file and line (or run.parquet's row) of the first document not in ``corpus`` (:func:`corpus_ids`,
    when given; ``where`` names it), then of the first document repeated for a query."""
    t = run_table(uri, printed=True)
    path = run_file(uri)
    if corpus is not None:
        bad = np.flatnonzero(pids_of(corpus, t["doc_id"]) < 0)
        if len(bad):
            row = int(bad[0])
            raise _bad_entry(uri, path, row, f"document {t['doc_id'][row].as_py()} is not in the corpus of {where}")
    twice = repeated_rows(_codes(t["query_id"]), _codes(t["doc_id"]))
    if len(twice):
        row = int(twice[0])
        raise _bad_entry(uri, path, row, f"document {t['doc_id'][row].as_py()} appears twice for query "
                                         f"{t['query_id'][row].as_py()}")
    return t


def query_blocks(run: pa.Table, queries: int = 500) -> Iterator[dict[str, dict[str, float]]]:
    """``run`` (``query_id``, ``doc_id``, ``score``) as ``{query_id: {doc_id: score}}`` dicts of ``queries`` queries
    each, queries in order of first appearance: what :func:`raykd.metrics.evaluate_blocks` reads, holding one
    block's Python objects at a time."""
    codes = _codes(run["query_id"])
    order = np.argsort(codes, kind="stable")
    run, codes = run.take(pa.array(order)), codes[order]
    starts = np.flatnonzero(np.r_[True, codes[1:] != codes[:-1]])
    bounds = np.r_[starts[::queries], len(codes)] if len(codes) else np.zeros(1, np.int64)
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        block: dict[str, dict[str, float]] = {}
        part = run.slice(a, b - a)
        for q, d, v in zip(part["query_id"].to_pylist(), part["doc_id"].to_pylist(), part["score"].to_pylist()):
            block.setdefault(q, {})[d] = v
        yield block


def _bad_entry(uri: str, path: str, row: int, message: str) -> FormatError:
    """The error naming where row ``row`` of the run ``uri`` is: run.parquet's row, or the TREC file's line."""
    parquet = _run_parquet(uri)
    if parquet:
        return FormatError(parquet, None, f"row {row}: {message}")
    for i, r in enumerate(trec.iter_run(path)):
        if i == row:
            return FormatError(path, r.line, message)
    return FormatError(path, row + 1, message)


def store_run(uri: str, store: TextStore, split: str, only: set[str] | None = None,
              printed: bool = False) -> pa.Table:
    """Run ``uri`` (:func:`run_table`: a search output's run.parquet, else the TREC file) as columns ``qid``,
    ``query_id``, ``pid``, ``doc_id``, ``score`` (float64), in the run's row order; only the queries in ``only`` when
    given. A query that is not in ``split`` (any row), a document twice for a query or a document that is not in
    the corpus (rows kept) is a :class:`FormatError` naming the TREC file and line, or run.parquet and row; queries
    and repeats first, in row order, then documents, as a line-by-line reading finds them. Ids are looked up by
    Arrow joins, never a dict over the corpus. ``printed``: scores as run.trec carries them
    (:func:`raykd.formats.trec.printed_scores`) also when read from run.parquet, so a search output and its
    run.trec give the same run."""
    t = run_table(uri, printed)
    path = run_file(uri)
    queries = store.queries(split).select(["qid", "query_id"])
    qrow = pc.fill_null(pc.index_in(t["query_id"], value_set=queries["query_id"].combine_chunks()), -1).to_numpy(
        zero_copy_only=False).astype(np.int64)
    bad_query = np.flatnonzero(qrow < 0)
    if only is not None:
        kept = np.flatnonzero(pc.is_in(t["query_id"], value_set=pa.array(sorted(only), pa.string())).to_numpy(
            zero_copy_only=False))
    else:
        kept = np.arange(t.num_rows)
    twice = kept[repeated_rows(qrow[kept], _codes(t["doc_id"])[kept])]
    if len(bad_query) or len(twice):
        row = int(min(np.concatenate([bad_query, twice])))
        q, d = t["query_id"][row].as_py(), t["doc_id"][row].as_py()
        raise _bad_entry(uri, path, row, f"query {q} is not in split {split!r} of {store.uri}" if qrow[row] < 0
                         else f"document {d} appears twice for query {q}")
    t = t.take(pa.array(kept)) if only is not None else t
    qrow = qrow[kept]
    pids = pids_of(corpus_ids(store), t["doc_id"])
    bad_doc = np.flatnonzero(pids < 0)
    if len(bad_doc):
        row = int(kept[bad_doc[0]])
        raise _bad_entry(uri, path, row, f"document {t['doc_id'][int(bad_doc[0])].as_py()} is not in the corpus "
                                         f"of {store.uri}")
    return pa.table({"qid": queries["qid"].combine_chunks().take(pa.array(qrow)), "query_id": t["query_id"],
                     "pid": pa.array(pids, pa.int64()), "doc_id": t["doc_id"], "score": t["score"]})
