"""Parsers of the raw files users have: MS MARCO tsv (collection, queries, qrels, id and text triples) and BEIR
folders (corpus.jsonl, queries.jsonl, qrels/<split>.tsv).

Each parser takes ``(uri, line_number, line)`` and returns a tuple of typed fields, or raises a FormatError
that names the file, the line and what was expected. Streaming is the caller's: these work line by line.
"""

from __future__ import annotations

import json

from raykd.errors import FormatError

# MS MARCO's official file names, and the names a folder may use for each
MSMARCO_FILES = {
    "collection": ["collection.tsv"],
    "queries.train": ["queries.train.tsv"],
    "queries.dev": ["queries.dev.small.tsv", "queries.dev.tsv"],
    "qrels.train": ["qrels.train.tsv"],
    "qrels.dev": ["qrels.dev.small.tsv", "qrels.dev.tsv"],
    "id_triples": ["qidpidtriples.train.small.tsv", "qidpidtriples.train.full.2.tsv", "qidpidtriples.train.full.tsv"],
    "text_triples": ["triples.train.small.tsv"],
}


def _int(uri: str, ln: int, value: str, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise FormatError(uri, ln, f"{what} must be an integer, got {value[:40]!r}") from None


def _split(uri: str, ln: int, line: str, n: int | tuple[int, ...], expected: str) -> list[str]:
    cols = line.split("\t")
    ok = (len(cols) == n) if isinstance(n, int) else (len(cols) in n)
    if not ok:
        raise FormatError(uri, ln, f"expected {expected} ({n} tab-separated columns), found {len(cols)} column(s)")
    return cols


def parse_collection(uri: str, ln: int, line: str) -> tuple[int, str]:
    """``pid<TAB>text`` (MS MARCO collection.tsv)."""
    pid, text = _split(uri, ln, line, 2, "pid<TAB>passage text")
    return _int(uri, ln, pid, "pid"), text


def parse_query(uri: str, ln: int, line: str) -> tuple[int, str]:
    """``qid<TAB>text`` (MS MARCO queries.*.tsv and TREC DL topics)."""
    qid, text = _split(uri, ln, line, 2, "qid<TAB>query text")
    return _int(uri, ln, qid, "qid"), text


def parse_qrels(uri: str, ln: int, line: str) -> tuple[str, str, int] | None:
    """One qrels line -> ``(query_id, doc_id, relevance)``. Accepts TREC's 4 columns ``qid iter docid rel``
    (space or tab separated) and BEIR's tsv ``query-id<TAB>corpus-id<TAB>score``; returns None for a BEIR header
    line (only allowed as line 1)."""
    cols = line.split()
    if len(cols) == 4:
        q, _, d, r = cols
    elif len(cols) == 3:
        q, d, r = cols
        if ln == 1 and not r.lstrip("-").isdigit():
            return None  # header: query-id corpus-id score
    else:
        raise FormatError(
            uri, ln, f"expected qrels as 'qid 0 docid relevance' (4 columns) or 'query-id corpus-id score' (3), "
            f"found {len(cols)} column(s)"
        )
    return q, d, _int(uri, ln, r, "relevance")


def parse_id_triple(uri: str, ln: int, line: str) -> tuple[int, int, int]:
    """``qid<TAB>pos_pid<TAB>neg_pid`` (qidpidtriples.train.*.tsv)."""
    q, p, n = _split(uri, ln, line, 3, "qid<TAB>pos_pid<TAB>neg_pid")
    return _int(uri, ln, q, "qid"), _int(uri, ln, p, "pos_pid"), _int(uri, ln, n, "neg_pid")


def parse_text_triple(uri: str, ln: int, line: str) -> tuple[str, str, str]:
    """``query<TAB>positive passage<TAB>negative passage`` (triples.train.small.tsv)."""
    q, p, n = _split(uri, ln, line, 3, "query<TAB>positive passage<TAB>negative passage")
    return q, p, n


def looks_like_text_triples(first_line: str) -> bool:
    cols = first_line.split("\t")
    return len(cols) == 3 and not all(c.strip().isdigit() for c in cols)


def _json(uri: str, ln: int, line: str, keys: tuple[str, ...]) -> dict:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise FormatError(uri, ln, f"invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise FormatError(uri, ln, "expected a JSON object")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise FormatError(uri, ln, f"missing field(s) {', '.join(missing)}; expected {', '.join(keys)}")
    return obj


def parse_beir_doc(uri: str, ln: int, line: str) -> tuple[str, str, str]:
    """``{"_id", "title", "text"}`` -> ``(doc_id, title, text)``; title may be absent."""
    obj = _json(uri, ln, line, ("_id", "text"))
    return str(obj["_id"]), str(obj.get("title") or ""), str(obj["text"])


def parse_beir_query(uri: str, ln: int, line: str) -> tuple[str, str]:
    obj = _json(uri, ln, line, ("_id", "text"))
    return str(obj["_id"]), str(obj["text"])
