"""Runs and qrels as the stages hand them to each other (search writes them, evaluate and re-ranking read them).

- :func:`run_file`: a run given as a TREC file or as a search output URI (format ``raykd.run``, its ``run.trec``);
- :func:`store_qrels`: a text store split's qrels as ``{query_id: {doc_id: relevance}}``;
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
