"""Hofstätter et al.'s NRKD teacher-score file (the published ``bert_cat_ensemble_msmarcopassage_train_scores_ids.tsv``).

One training triple per line, tab-separated, no header::

    pos_score<TAB>neg_score<TAB>qid<TAB>pos_pid<TAB>neg_pid

scores are floats, ids integers (MS MARCO ids). ``.gz`` files are read and written compressed. The reader
streams (constant memory) and raises :class:`raykd.errors.FormatError` naming the file and line on a bad line.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import uuid
from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa

from raykd import storage
from raykd.errors import FormatError

COLUMNS = ("pos_score", "neg_score", "qid", "pos_pid", "neg_pid")
SCHEMA = pa.schema(
    [
        ("pos_score", pa.float32()),
        ("neg_score", pa.float32()),
        ("qid", pa.int64()),
        ("pos_pid", pa.int64()),
        ("neg_pid", pa.int64()),
    ]
)
EXPECTED = "pos_score<TAB>neg_score<TAB>qid<TAB>pos_pid<TAB>neg_pid (two floats, three integer ids)"


def _open_text(uri: str):
    if not storage.exists(uri):
        raise FileNotFoundError(f"NRKD file {uri} does not exist")
    raw = storage.open_read(uri, "rb")
    if str(uri).endswith(".gz"):
        raw = gzip.GzipFile(fileobj=raw)
    return io.TextIOWrapper(raw, encoding="utf-8", newline="")


def parse_line(line: str, uri: str, lineno: int) -> tuple[float, float, int, int, int]:
    cols = line.rstrip("\r\n").split("\t")
    if len(cols) != 5:
        raise FormatError(uri, lineno, f"expected 5 tab-separated columns, found {len(cols)}: {EXPECTED}")
    try:
        pos, neg = float(cols[0]), float(cols[1])
    except ValueError:
        raise FormatError(uri, lineno, f"scores must be floats, got {cols[0]!r} and {cols[1]!r}: {EXPECTED}") from None
    if not (math.isfinite(pos) and math.isfinite(neg)):
        raise FormatError(uri, lineno, f"scores must be finite, got {cols[0]!r} and {cols[1]!r}")
    try:
        qid, pp, np_ = int(cols[2]), int(cols[3]), int(cols[4])
    except ValueError:
        raise FormatError(uri, lineno, f"ids must be integers, got {cols[2:]!r}: {EXPECTED}") from None
    return pos, neg, qid, pp, np_


def iter_batches(uri: str, batch_size: int = 65536) -> Iterator[pa.RecordBatch]:
    """Stream an NRKD file as Arrow record batches of :data:`SCHEMA`. Blank lines are skipped."""
    buf: list[tuple] = []
    with _open_text(uri) as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            buf.append(parse_line(line, uri, lineno))
            if len(buf) >= batch_size:
                yield _batch(buf)
                buf = []
    if buf:
        yield _batch(buf)


def _batch(rows: list[tuple]) -> pa.RecordBatch:
    cols = list(zip(*rows))
    return pa.RecordBatch.from_arrays(
        [
            pa.array(np.asarray(cols[0], np.float32)),
            pa.array(np.asarray(cols[1], np.float32)),
            pa.array(np.asarray(cols[2], np.int64)),
            pa.array(np.asarray(cols[3], np.int64)),
            pa.array(np.asarray(cols[4], np.int64)),
        ],
        schema=SCHEMA,
    )


def read(uri: str) -> pa.Table:
    """The whole file as one table (small files; stream with :func:`iter_batches` otherwise)."""
    batches = list(iter_batches(uri))
    return pa.Table.from_batches(batches, schema=SCHEMA)


def format_rows(batches: Iterable[pa.RecordBatch | pa.Table]) -> Iterator[str]:
    """NRKD lines (with newline) from batches that hold the columns of :data:`COLUMNS`. Scores are written with
    enough digits to round-trip float32 exactly."""
    for b in batches:
        pos = b.column("pos_score").to_numpy(zero_copy_only=False)
        neg = b.column("neg_score").to_numpy(zero_copy_only=False)
        qid = b.column("qid").to_numpy(zero_copy_only=False)
        pp = b.column("pos_pid").to_numpy(zero_copy_only=False)
        nn = b.column("neg_pid").to_numpy(zero_copy_only=False)
        for i in range(len(qid)):
            yield f"{float(pos[i])!r}\t{float(neg[i])!r}\t{int(qid[i])}\t{int(pp[i])}\t{int(nn[i])}\n"


def write(uri: str, batches: Iterable[pa.RecordBatch | pa.Table]) -> int:
    """Stream an NRKD file (gzip if ``uri`` ends in ``.gz``); returns the number of lines. The file appears
    whole or not at all: a local file is written under a temporary name and renamed, an S3 upload only becomes
    visible when complete."""
    fs, path = storage.filesystem(uri)
    tmp = path
    if not storage.is_s3(uri):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = os.path.join(os.path.dirname(path), f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
    n = 0
    with fs.open(tmp, "wb") as raw:
        sink = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) if str(uri).endswith(".gz") else raw
        for line in format_rows(batches):
            sink.write(line.encode())
            n += 1
        if sink is not raw:
            sink.close()
    if tmp != path:
        os.replace(tmp, path)
    return n
