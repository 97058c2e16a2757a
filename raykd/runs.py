"""Runs and qrels as the stages hand them to each other (search writes them, evaluate and re-ranking read them).

- :func:`run_file`: a run given as a TREC file or as a search output URI (format ``raykd.run``, its ``run.trec``);
- :func:`store_qrels`: a text store split's qrels as ``{query_id: {doc_id: relevance}}``;
- :func:`run_table`: a run (file or search output) as an Arrow table, for runs too large for dicts (mining).
- :func:`corpus_ids` / :func:`pids_of`: doc_id -> pid by Arrow joins (``index_in``), never a Python dict over
  the corpus (MS MARCO: 8.8M passages).

Here rather than in a stage so that no stage imports another stage (tests/test_architecture.py).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from raykd import storage
from raykd.errors import UserError
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


def run_table(uri: str) -> pa.Table:
    """A run as columns ``query_id`` (string), ``doc_id`` (string), ``score`` (float64), one row per line, for
    runs too large for a dict of dicts (400K queries x 200). A search output gives its ``run.trec``'s rows from
    ``run.parquet``; a TREC file (6 columns, or MS MARCO's 3 with score = -rank) is parsed by pyarrow's CSV
    reader, and by :func:`raykd.formats.trec.iter_run` (errors naming the line) when it is not plainly
    single-space or tab separated."""
    if storage.has_manifest(uri):
        storage.read_manifest(uri, stage="search", format=FORMAT)
        t = storage.read_parquet(storage.join(uri, "run.parquet"), columns=["query_id", "doc_id", "score"])
        return t.set_column(2, "score", t["score"].cast(pa.float64()))
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
                          convert_options=pcsv.ConvertOptions(column_types=types, strings_can_be_null=False))
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
