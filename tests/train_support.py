"""Helpers for the train tests: a scores output written by hand in the ``raykd.triple_scores`` contract, with a
real (lexical) teacher: the fraction of query words a passage contains, which ranks the planted positive above
most negatives without ever looking at the labels."""

from __future__ import annotations

import numpy as np

from raykd import storage
from raykd.formats import scores as scores_format
from raykd.formats.store import TextStore


def overlap_teacher(query: str, passage: str) -> float:
    q = set(query.lower().split())
    return 3.0 * len(q & set(passage.lower().split())) / max(1, len(q))


def write_scores(store_uri: str, out_uri: str, max_triples: int | None = None, nan_row: int | None = None,
                 manifest: bool = True) -> str:
    store = TextStore(store_uri)
    t = store.triples()
    if max_triples:
        t = t.slice(0, max_triples)
    q = store.queries("train")
    qtext = dict(zip(q["qid"].to_pylist(), q["text"].to_pylist()))
    qid, pos, neg = (t[c].to_numpy() for c in ("qid", "pos_pid", "neg_pid"))
    pos_t, neg_t = store.passages(pos), store.passages(neg)
    sp = np.array([overlap_teacher(qtext[a], b) for a, b in zip(qid, pos_t)], np.float32)
    sn = np.array([overlap_teacher(qtext[a], b) for a, b in zip(qid, neg_t)], np.float32)
    if nan_row is not None:
        sp[nan_row] = np.nan
    table = scores_format.make_table(qid, pos, neg, {"overlap": (sp, sn)}, [1.0])
    part = "parts/" + scores_format.part_name(0)
    storage.write_parquet_atomic(table, storage.join(out_uri, part))
    if manifest:
        storage.write_manifest(out_uri, "score", format=scores_format.FORMAT, format_version=scores_format.VERSION,
                               counts={"triples": table.num_rows}, stats={"teachers": ["overlap"], "weights": [1.0]},
                               parts=[part])
    return out_uri
