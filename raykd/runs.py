"""Runs and qrels as the stages hand them to each other (search writes them, evaluate and re-ranking read them).

- :func:`run_file`: a run given as a TREC file or as a search output URI (format ``raykd.run``, its ``run.trec``);
- :func:`store_qrels`: a text store split's qrels as ``{query_id: {doc_id: relevance}}``.

Here rather than in a stage so that no stage imports another stage (tests/test_architecture.py).
"""

from __future__ import annotations

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
