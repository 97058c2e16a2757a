"""TREC run files and qrels: the exchange formats of every retrieval and evaluation tool.

Run file (what ``raykd search`` writes, what ``trec_eval`` reads), one line per retrieved document::

    qid Q0 docno rank score tag          whitespace separated, 6 columns

Reading also accepts MS MARCO's 3-column ``qid<TAB>docno<TAB>rank`` (score = -rank, so ranking by score keeps
the file's order). Ranks in a file are informational: like trec_eval, evaluation orders a query's documents
by score descending, ties by docno descending (:func:`trec_order`), and :func:`write_run` writes them in
exactly that order with ranks 1..n, so a file written here reads back as the same ranking anywhere.

Qrels, one judgement per line::

    qid iter docno relevance             TREC 4-column (iter ignored)
    query-id<TAB>corpus-id<TAB>score     BEIR 3-column tsv, an optional header line

Ids are strings (the original ids; a text store's integer keys never appear in these files). Every reading
error is a :class:`~raykd.errors.FormatError` naming the file, the line and what was expected.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from raykd import storage
from raykd.errors import FormatError

Run = dict[str, dict[str, float]]  # qid -> docno -> score
Qrels = dict[str, dict[str, int]]  # qid -> docno -> relevance


@dataclass(frozen=True)
class RunLine:
    """One line of a run file, with where it came from (for error messages)."""

    line: int
    qid: str
    docno: str
    rank: int
    score: float
    tag: str


def _lines(uri: str) -> Iterator[tuple[int, str]]:
    with storage.open_read(uri, "rb") as f:
        text = io.TextIOWrapper(f, encoding="utf-8", errors="strict")
        try:
            for n, line in enumerate(text, start=1):
                yield n, line.rstrip("\r\n")
        except UnicodeDecodeError as e:
            raise FormatError(uri, None, f"not UTF-8 text ({e})") from None


def iter_run(uri: str) -> Iterator[RunLine]:
    """The lines of a run file in file order; blank lines are skipped."""
    for n, line in _lines(uri):
        cols = line.split()
        if not cols:
            continue
        if len(cols) == 6:
            qid, _q0, docno, rank_s, score_s, tag = cols
        elif len(cols) == 3:
            qid, docno, rank_s = cols
            score_s, tag = None, "msmarco"
        else:
            raise FormatError(
                uri, n, f"expected 6 columns `qid Q0 docno rank score tag` (or MS MARCO's 3: qid docno rank), got {len(cols)}"
            )
        try:
            rank = int(rank_s)
        except ValueError:
            raise FormatError(uri, n, f"rank {rank_s!r} is not an integer") from None
        if score_s is None:
            score = float(-rank)
        else:
            try:
                score = float(score_s)
            except ValueError:
                raise FormatError(uri, n, f"score {score_s!r} is not a number") from None
            if score != score:
                raise FormatError(uri, n, "score is NaN")
        yield RunLine(n, qid, docno, rank, score, tag)


def read_run(uri: str) -> Run:
    """``{qid: {docno: score}}``; a document listed twice for one query is an error."""
    run: Run = {}
    for r in iter_run(uri):
        docs = run.setdefault(r.qid, {})
        if r.docno in docs:
            raise FormatError(uri, r.line, f"document {r.docno} appears twice for query {r.qid}")
        docs[r.docno] = r.score
    return run


def trec_order(docs: Mapping[str, float]) -> list[tuple[str, float]]:
    """``docs`` in trec_eval's order: score descending, ties broken by docno descending."""
    return sorted(docs.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)


def format_run(run: Mapping[str, Mapping[str, float]], tag: str = "raykd", k: int | None = None) -> str:
    out = []
    tag = tag.replace(" ", "_") or "raykd"
    for qid in run:
        for rank, (docno, score) in enumerate(trec_order(run[qid])[:k], start=1):
            out.append(f"{qid} Q0 {docno} {rank} {score:.8g} {tag}\n")
    return "".join(out)


def write_run(run: Mapping[str, Mapping[str, float]], uri: str, tag: str = "raykd", k: int | None = None) -> None:
    """Write ``run`` (queries in the mapping's order, documents in :func:`trec_order`, top ``k``) atomically."""
    for qid, docs in run.items():
        for docno in docs:
            if any(c.isspace() for c in f"{qid}{docno}") or not qid or not docno:
                raise ValueError(f"run ids must be non-empty and free of whitespace: query {qid!r}, document {docno!r}")
    storage.write_bytes_atomic(uri, format_run(run, tag, k).encode())


def write_ranked(query_ids: Iterable[str], doc_ids: Iterable[str], ranks: Iterable[int], scores: Iterable[float],
                 uri: str, tag: str = "raykd", lines_per_write: int = 65536) -> None:
    """Write a run given as ranked rows (already in :func:`trec_order` within each query, ranks 1..n), e.g. the
    columns of a ``run.parquet``, atomically; the lines are what :func:`write_run` writes for the same run.
    Streamed: at most ``lines_per_write`` lines are held as text (iterables may be generators)."""
    tag = tag.replace(" ", "_") or "raykd"
    with storage.open_write_atomic(uri) as f:
        out = []
        for qid, docno, rank, score in zip(query_ids, doc_ids, ranks, scores):
            if any(c.isspace() for c in f"{qid}{docno}") or not qid or not docno:
                raise ValueError(f"run ids must be non-empty and free of whitespace: query {qid!r}, "
                                 f"document {docno!r}")
            out.append(f"{qid} Q0 {docno} {rank} {score:.8g} {tag}\n")
            if len(out) >= lines_per_write:
                f.write("".join(out).encode())
                out = []
        f.write("".join(out).encode())


# 10**n, exact in float64, for the scalings printed_scores does exactly (n <= 12: see there)
_POW10 = np.array([float(10**n) for n in range(13)])


def printed_scores(scores) -> np.ndarray:
    """What a reader of a run file gets back for each score: ``float(f"{s:.8g}")`` (the ``%.8g`` of
    :func:`write_run`), vectorised and exact. A score that a float32 holds (every run.parquet score) is scaled
    to 8 integer digits by 10**n, n in 0..12, exactly (24 + 28 significant bits fit a double's 53), rounded half
    to even as the formatter does, and divided back (one correctly rounded division, as parsing the text does);
    other scores (beyond 1e8 or below 1e-5, or not float32) are formatted and parsed one by one."""
    x = np.asarray(scores, dtype=np.float64)
    out = x.copy()
    a = np.abs(x)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        fast = np.isfinite(x) & (a > 0) & (x == x.astype(np.float32))
        n = 7 - np.floor(np.log10(np.where(fast, a, 1.0))).astype(np.int64)
        for _ in range(2):  # log10 may be one off next to a power of ten: the exact product says which way
            t = a * _POW10[np.clip(n, 0, 12)]
            n = np.where(t >= 1e8, n - 1, np.where(t < 1e7, n + 1, n))
        p = _POW10[np.clip(n, 0, 12)]
        t = a * p
        fast &= (n >= 0) & (n <= 12) & (t >= 1e7) & (t < 1e8)
    out[fast] = np.copysign(np.rint(t[fast]) / p[fast], x[fast])
    slow = np.flatnonzero(~fast & np.isfinite(x) & (x != 0))
    if len(slow):
        out[slow] = [float(f"{v:.8g}") for v in x[slow].tolist()]
    return out


def read_qrels(uri: str) -> Qrels:
    """``{qid: {docno: relevance}}`` from TREC 4-column qrels or a BEIR 3-column tsv (header allowed)."""
    qrels: Qrels = {}
    for n, line in _lines(uri):
        cols = line.split()
        if not cols:
            continue
        if len(cols) == 4:
            qid, _it, docno, rel_s = cols
        elif len(cols) == 3:
            qid, docno, rel_s = cols
        else:
            raise FormatError(uri, n, f"expected 4 columns `qid iter docno relevance` (or BEIR's 3), got {len(cols)}")
        try:
            rel = int(rel_s)
        except ValueError:
            if n == 1 and len(cols) == 3:  # BEIR header `query-id corpus-id score`
                continue
            raise FormatError(uri, n, f"relevance {rel_s!r} is not an integer") from None
        docs = qrels.setdefault(qid, {})
        if docno in docs and docs[docno] != rel:
            raise FormatError(uri, n, f"document {docno} judged twice for query {qid} with different grades")
        docs[docno] = rel
    return qrels


def write_qrels(qrels: Mapping[str, Mapping[str, int]], uri: str) -> None:
    lines = [f"{q} 0 {d} {int(r)}\n" for q, docs in qrels.items() for d, r in docs.items()]
    storage.write_bytes_atomic(uri, "".join(lines).encode())


def run_from_rows(qids: Iterable[str], docnos: Iterable[str], scores: Iterable[float]) -> Run:
    run: Run = {}
    for q, d, s in zip(qids, docnos, scores):
        run.setdefault(q, {})[d] = float(s)
    return run
