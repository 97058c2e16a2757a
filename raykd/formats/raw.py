"""Parsers of the raw files users have: MS MARCO tsv (collection, queries, qrels, id and text triples) and BEIR
folders (corpus.jsonl, queries.jsonl, qrels/<split>.tsv).

Each line parser takes ``(uri, line_number, line)`` and returns a tuple of typed fields, or raises a
FormatError that names the file, the line and what was expected. The block parsers (``*_block``) parse a block
of whole lines at once with pyarrow's CSV reader, for the large files (collection, id triples); they return
None whenever the block holds anything the line parser would judge differently, and the caller then re-parses
that block line by line, so errors and accepted values are the line parsers' exactly.
"""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv

from raykd.errors import FormatError

# MS MARCO's official file names, and the names a folder may use for each. "id_triples" is the id version of
# MS MARCO's small triples (39.8M rows): MS MARCO ships those only as text (triples.train.small.tsv); raykd's
# sample and users who map the text triples to ids name it qidpidtriples.train.small.tsv. MS MARCO's own id
# triples, qidpidtriples.train.full.2.tsv, have 397.8M rows (10x): prepare reads them only when named.
MSMARCO_FILES = {
    "collection": ["collection.tsv"],
    "queries.train": ["queries.train.tsv"],
    "queries.dev": ["queries.dev.small.tsv", "queries.dev.tsv"],
    "qrels.train": ["qrels.train.tsv"],
    "qrels.dev": ["qrels.dev.small.tsv", "qrels.dev.tsv"],
    "id_triples": ["qidpidtriples.train.small.tsv"],
    "text_triples": ["triples.train.small.tsv"],
    "full_id_triples": ["qidpidtriples.train.full.2.tsv", "qidpidtriples.train.full.tsv"],
}
FULL_ID_TRIPLES_ROWS = "397.8M"


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


def _tsv_block(block: bytes, names: list[str], id_columns: set[str]) -> pa.Table | None:
    """A block of whole lines as a table of string columns, ids cast to int64; None if any line has another
    column count, an id that is not plain ASCII digits (``int()`` accepts more, e.g. ``+5`` or `` 5``: the line
    parsers decide those), bytes that are not UTF-8, or a bare ``\r`` (the CSV reader splits lines there)."""
    n_lines = block.count(b"\n") + (not block.endswith(b"\n"))
    try:
        t = pa_csv.read_csv(
            pa.py_buffer(block),
            read_options=pa_csv.ReadOptions(column_names=names, use_threads=True, block_size=1 << 22),
            parse_options=pa_csv.ParseOptions(delimiter="\t", quote_char=False, escape_char=False, ignore_empty_lines=False),
            convert_options=pa_csv.ConvertOptions(
                column_types=dict.fromkeys(names, pa.string()), null_values=[], strings_can_be_null=False
            ),
        )
        if t.num_rows != n_lines:
            return None
        cols = {}
        for name in names:
            col = t[name]
            if name in id_columns:
                if not pc.all(pc.ascii_is_decimal(col)).as_py():
                    return None
                col = pc.cast(col, pa.int64())
            cols[name] = col
        return pa.table(cols)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None


def collection_block(block: bytes) -> pa.Table | None:
    """Block of ``collection.tsv`` lines -> table ``pid`` int64, ``text`` string (or None: see :func:`_tsv_block`)."""
    return _tsv_block(block, ["pid", "text"], {"pid"})


def id_triples_block(block: bytes) -> pa.Table | None:
    """Block of id triples -> table ``qid``, ``pos_pid``, ``neg_pid`` int64 (or None: see :func:`_tsv_block`)."""
    return _tsv_block(block, ["qid", "pos_pid", "neg_pid"], {"qid", "pos_pid", "neg_pid"})


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
