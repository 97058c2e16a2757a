"""Published teacher-score files other than NRKD's tsv (:mod:`raykd.formats.nrkd`), read and written in their
own formats (docs/teachers.md, "Published teacher scores").

sentence-transformers' MS MARCO cross-encoder scores (``cross-encoder-ms-marco-MiniLM-L-6-v2-scores.pkl.gz``)
    a gzip'd pickle of ``{qid: {pid: score}}`` (MS MARCO integer ids), read together with its hard negatives
    (``msmarco-hard-negatives.jsonl.gz``: one ``{"qid": .., "pos": [pid, ..], "neg": {system: [pid, ..]}}`` per
    line). Triples are positives x negatives per query: the negatives are the union over the systems (in
    system-name order, first occurrence kept, positives left out), cut to ``negatives_per_query`` by a seeded
    draw per query (the same draw for the same seed and query, whatever the file order). Both scores of a
    triple come from the pickle. A pickle can run arbitrary code when it is loaded, so it is only read with
    ``trust_pickle=True`` (``--trust-pickle``): open only files you trust.
lightonai's distillation sets (``lightonai/ms-marco-en-bge``, PyLate's ``KDProcessing``)
    Parquet or jsonl rows ``{"query_id", "document_ids": [..], "scores": [..]}``, ids as strings; one n-way list
    of teacher scores per query. The lists are kept as they are (for listwise losses); triples are derived from
    them: the positive is each document the store's qrels judge relevant for the query (``positives``), or,
    without qrels, the list's top-scored document; every other document of the list is a negative.

Rows that do not fit (a score that is not a finite number, lists of different lengths, an id that is not an
id) raise :class:`~raykd.errors.FormatError` naming the file and the line (jsonl, pickle: the qid; Parquet: the
row, 1-based). Unknown ids are checked against a text store by :func:`split_unknown` (strict: an error naming
the first; lenient: quarantined with a reason).
"""

from __future__ import annotations

import gzip
import io
import json
import math
import pickle
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from raykd import storage
from raykd.errors import FormatError, UserError

PICKLE_REFUSAL = (
    "{uri} is a Python pickle, and loading a pickle can run arbitrary code. Pass --trust-pickle (trust_pickle: "
    "true) only for a file from a source you trust, e.g. sentence-transformers' published score file"
)
TRIPLE_SCHEMA = pa.schema([("qid", pa.int64()), ("pos_pid", pa.int64()), ("neg_pid", pa.int64()),
                           ("pos_score", pa.float32()), ("neg_score", pa.float32())])
LIST_SCHEMA = pa.schema([("qid", pa.int64()), ("pids", pa.list_(pa.int64())), ("scores", pa.list_(pa.float32()))])


def _open_binary(uri: str):
    if not storage.exists(uri):
        raise UserError(f"{uri} does not exist")
    raw = storage.open_read(uri, "rb")
    buffered = io.BufferedReader(raw) if not isinstance(raw, io.BufferedReader) else raw
    if buffered.peek(2)[:2] == b"\x1f\x8b":  # gzip magic, whatever the name says
        return gzip.GzipFile(fileobj=buffered)
    return buffered


def _int_id(value, uri: str, where: int | None, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer, str)):
        raise FormatError(uri, where, f"{what} must be an integer id, got {value!r}")
    try:
        return int(value)
    except ValueError:
        raise FormatError(uri, where, f"{what} must be an integer id, got {value!r}") from None


def _finite(value, uri: str, where: int | None, what: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise FormatError(uri, where, f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise FormatError(uri, where, f"{what} must be finite, got {value!r}")
    return x


# ---------------------------------------------------------------------------------------------------------
# sentence-transformers: scores pickle + hard negatives jsonl


def read_st_scores(uri: str, trust_pickle: bool = False) -> dict[int, dict[int, float]]:
    """The ``{qid: {pid: score}}`` pickle (gzip'd or not). Refused unless ``trust_pickle`` (see module doc)."""
    if not trust_pickle:
        raise UserError(PICKLE_REFUSAL.format(uri=uri))
    with _open_binary(uri) as f:
        try:
            data = pickle.load(f)  # noqa: S301 (the user has declared the file trusted)
        except (pickle.UnpicklingError, EOFError, gzip.BadGzipFile) as e:
            raise FormatError(uri, None, f"not a readable pickle: {e}") from None
    if not isinstance(data, Mapping):
        raise FormatError(uri, None, f"expected a dict {{qid: {{pid: score}}}}, got {type(data).__name__}")
    out: dict[int, dict[int, float]] = {}
    for q, row in data.items():
        qid = _int_id(q, uri, None, "a qid")
        if not isinstance(row, Mapping):
            raise FormatError(uri, None, f"qid {q}: expected a dict {{pid: score}}, got {type(row).__name__}")
        out[qid] = {_int_id(p, uri, None, f"qid {q}: a pid"): _finite(s, uri, None, f"qid {q}, pid {p}: the score")
                    for p, s in row.items()}
    return out


def write_st_scores(uri: str, scores: Mapping[int, Mapping[int, float]]) -> None:
    """Write ``{qid: {pid: score}}`` as a gzip'd pickle (the published layout)."""
    data = {int(q): {int(p): float(s) for p, s in row.items()} for q, row in scores.items()}
    with storage.open_write_atomic(uri) as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        pickle.dump(data, f)


@dataclass
class HardNegatives:
    """One line of the hard-negatives jsonl."""

    line: int
    qid: int
    pos: list[int]
    neg: dict[str, list[int]] = field(default_factory=dict)


def iter_hard_negatives(uri: str) -> Iterator[HardNegatives]:
    """The lines of ``msmarco-hard-negatives.jsonl[.gz]``; a bad line is a FormatError naming it."""
    with _open_binary(uri) as f:
        for lineno, line in enumerate(io.TextIOWrapper(f, encoding="utf-8"), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise FormatError(uri, lineno, f"invalid JSON: {e}") from None
            if not isinstance(row, dict) or "qid" not in row or not isinstance(row.get("pos"), list) \
                    or not isinstance(row.get("neg", {}), dict):
                raise FormatError(uri, lineno, 'expected {"qid": id, "pos": [pid, ...], "neg": {system: [pid, ...]}}')
            neg = {}
            for system, pids in row.get("neg", {}).items():
                if not isinstance(pids, list):
                    raise FormatError(uri, lineno, f"neg[{system!r}] must be a list of pids")
                neg[str(system)] = [_int_id(p, uri, lineno, f"neg[{system!r}] pid") for p in pids]
            yield HardNegatives(lineno, _int_id(row["qid"], uri, lineno, "qid"),
                                [_int_id(p, uri, lineno, "pos pid") for p in row["pos"]], neg)


def write_hard_negatives(uri: str, rows: Sequence[HardNegatives]) -> None:
    with storage.open_write_atomic(uri) as raw:
        sink = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) if uri.endswith(".gz") else raw
        for r in rows:
            sink.write((json.dumps({"qid": r.qid, "pos": r.pos, "neg": r.neg}) + "\n").encode())
        if sink is not raw:
            sink.close()


def sample_negatives(hn: HardNegatives, negatives_per_query: int | None, seed: int,
                     systems: Sequence[str] | None = None) -> list[int]:
    """The query's negatives: union over ``systems`` (default all, in name order), first occurrence kept,
    positives left out, then a seeded draw of ``negatives_per_query`` (kept in union order)."""
    pos = set(hn.pos)
    seen: dict[int, None] = {}
    for system in sorted(hn.neg) if systems is None else systems:
        for p in hn.neg.get(system, []):
            if p not in pos:
                seen.setdefault(p, None)
    negs = list(seen)
    if negatives_per_query is not None and len(negs) > negatives_per_query:
        keep = np.random.default_rng([int(seed), hn.qid & 0xFFFFFFFF]).choice(len(negs), negatives_per_query,
                                                                               replace=False)
        negs = [negs[i] for i in sorted(keep)]
    return negs


def st_triples(hard_negatives_uri: str, scores: Mapping[int, Mapping[int, float]], negatives_per_query: int | None,
               seed: int = 0, systems: Sequence[str] | None = None, lenient: bool = False
               ) -> tuple[pa.Table, list[tuple[int, int, int, int, str]]]:
    """Triples (:data:`TRIPLE_SCHEMA`) from the hard negatives, scored from the pickle's ``scores``, and the
    triples left out for want of a score (``(qid, pos, neg, line, reason)``; strict: a FormatError instead)."""
    cols: list[list] = [[], [], [], [], []]
    missing = []
    for hn in iter_hard_negatives(hard_negatives_uri):
        row = scores.get(hn.qid, {})
        negs = sample_negatives(hn, negatives_per_query, seed, systems)
        for p in hn.pos:
            for n in negs:
                if p not in row or n not in row:
                    reason = f"no teacher score for qid {hn.qid}, pid {p if p not in row else n} in the score file"
                    if not lenient:
                        raise FormatError(hard_negatives_uri, hn.line, reason + " (--lenient quarantines it)")
                    missing.append((hn.qid, p, n, hn.line, reason))
                    continue
                for c, v in zip(cols, (hn.qid, p, n, row[p], row[n])):
                    c.append(v)
    return pa.Table.from_arrays([pa.array(c, t.type) for c, t in zip(cols, TRIPLE_SCHEMA)], schema=TRIPLE_SCHEMA), missing


# ---------------------------------------------------------------------------------------------------------
# lightonai: n-way lists


def read_lightonai(uri: str, qid_of: Mapping[str, int] | None = None, pid_of: Mapping[str, int] | None = None,
                   lenient: bool = False) -> tuple[pa.Table, list[tuple[int, str, str]]]:
    """A lightonai distillation file (``.parquet``, or ``.jsonl[.gz]``) as :data:`LIST_SCHEMA` rows, ids mapped
    through ``qid_of`` / ``pid_of`` (a text store's original ids; None: ids must be integers). Returns the
    table and the rows left out in lenient mode as ``(row, query_id, reason)``: an id the mappings lack."""
    rows = _lightonai_rows(uri)
    qids, pids, scores, bad = [], [], [], []
    for where, r in rows:
        if not isinstance(r, Mapping) or not {"query_id", "document_ids", "scores"} <= set(r):
            raise FormatError(uri, where, 'expected {"query_id", "document_ids": [...], "scores": [...]}')
        docs, sc = r["document_ids"], r["scores"]
        if not isinstance(docs, (list, tuple, np.ndarray)) or not isinstance(sc, (list, tuple, np.ndarray)):
            raise FormatError(uri, where, "document_ids and scores must be lists")
        if len(docs) != len(sc) or not len(docs):
            raise FormatError(uri, where, f"document_ids ({len(docs)}) and scores ({len(sc)}) must be non-empty "
                              f"lists of one length")
        s = [_finite(x, uri, where, f"query {r['query_id']}: a score") for x in sc]
        try:
            q = qid_of[str(r["query_id"])] if qid_of is not None else _int_id(r["query_id"], uri, where, "query_id")
            ps = [pid_of[str(d)] if pid_of is not None else _int_id(d, uri, where, "a document id") for d in docs]
        except KeyError as e:
            reason = f"unknown id {e.args[0]!r} (not in the text store)"
            if not lenient:
                raise FormatError(uri, where, reason + " (--lenient quarantines the row)") from None
            bad.append((where, str(r["query_id"]), reason))
            continue
        qids.append(q)
        pids.append(ps)
        scores.append(s)
    table = pa.Table.from_arrays([pa.array(qids, pa.int64()), pa.array(pids, pa.list_(pa.int64())),
                                  pa.array(scores, pa.list_(pa.float32()))], schema=LIST_SCHEMA)
    return table, bad


def _lightonai_rows(uri: str) -> Iterator[tuple[int, dict]]:
    if uri.endswith(".parquet"):
        t = storage.read_parquet(uri)
        yield from enumerate(t.to_pylist(), start=1)
        return
    with _open_binary(uri) as f:
        for lineno, line in enumerate(io.TextIOWrapper(f, encoding="utf-8"), start=1):
            if line.strip():
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    raise FormatError(uri, lineno, f"invalid JSON: {e}") from None


def write_lightonai(uri: str, lists: pa.Table, query_id_of: Mapping[int, str] | None = None,
                    doc_id_of: Mapping[int, str] | None = None) -> int:
    """Write :data:`LIST_SCHEMA` rows in lightonai's layout (ids as strings: the original ids through the maps,
    else the integers), Parquet or jsonl by the name; returns the rows."""
    qs = [query_id_of[q] if query_id_of else str(q) for q in lists["qid"].to_pylist()]
    ds = [[doc_id_of[p] if doc_id_of else str(p) for p in row] for row in lists["pids"].to_pylist()]
    sc = lists["scores"].to_pylist()
    if uri.endswith(".parquet"):
        t = pa.table({"query_id": pa.array(qs, pa.string()), "document_ids": pa.array(ds, pa.list_(pa.string())),
                      "scores": pa.array(sc, pa.list_(pa.float32()))})
        storage.write_parquet_atomic(t, uri)
    else:
        with storage.open_write_atomic(uri) as raw:
            sink = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) if uri.endswith(".gz") else raw
            for q, d, s in zip(qs, ds, sc):
                sink.write((json.dumps({"query_id": q, "document_ids": d, "scores": s}) + "\n").encode())
            if sink is not raw:
                sink.close()
    return len(qs)


def list_triples(lists: pa.Table, positives: Mapping[int, set[int]] | None = None) -> pa.Table:
    """Triples (:data:`TRIPLE_SCHEMA`) of n-way lists: positive = each listed document in ``positives[qid]``
    (the store's qrels), or without ``positives`` the list's top-scored one; negatives = the rest of the list.
    A query with no positive in its list gives no triple."""
    cols: list[list] = [[], [], [], [], []]
    for q, ps, ss in zip(lists["qid"].to_pylist(), lists["pids"].to_pylist(), lists["scores"].to_pylist()):
        if positives is not None:
            pos_idx = [i for i, p in enumerate(ps) if p in positives.get(q, ())]
        else:
            pos_idx = [int(np.argmax(ss))]
        for i in pos_idx:
            for j in range(len(ps)):
                if j in pos_idx:
                    continue
                for c, v in zip(cols, (q, ps[i], ps[j], ss[i], ss[j])):
                    c.append(v)
    return pa.Table.from_arrays([pa.array(c, t.type) for c, t in zip(cols, TRIPLE_SCHEMA)], schema=TRIPLE_SCHEMA)


# ---------------------------------------------------------------------------------------------------------
# id checks


def split_unknown(triples: pa.Table, known_qids: np.ndarray, known_pids: np.ndarray, uri: str,
                  lenient: bool) -> tuple[pa.Table, pa.Table]:
    """``(kept, quarantined)`` triples: a qid outside ``known_qids`` or a pid outside ``known_pids`` (a text
    store's) is an error naming the first such triple (strict) or quarantined with a reason (lenient)."""
    q = triples["qid"].to_numpy()
    p, n = triples["pos_pid"].to_numpy(), triples["neg_pid"].to_numpy()
    ok_q, ok_p, ok_n = np.isin(q, known_qids), np.isin(p, known_pids), np.isin(n, known_pids)
    ok = ok_q & ok_p & ok_n
    if ok.all():
        return triples, triples.slice(0, 0)
    bad = np.flatnonzero(~ok)
    reasons = [f"unknown qid {q[i]}" if not ok_q[i] else f"unknown pid {p[i] if not ok_p[i] else n[i]}" for i in bad]
    if not lenient:
        raise FormatError(uri, None, f"triple {int(bad[0]) + 1} (qid {q[bad[0]]}, pos {p[bad[0]]}, neg "
                          f"{n[bad[0]]}): {reasons[0]} in the text store; {len(bad)} such triple(s) "
                          f"(--lenient quarantines them)")
    quarantined = triples.take(pa.array(bad)).append_column("reason", pa.array(reasons, pa.string()))
    return triples.filter(pa.array(ok)), quarantined
