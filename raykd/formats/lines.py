"""Streaming reads of raw input files (local or s3://, gzip'd or not) with exact error locations, and the
quarantine that lenient mode writes bad lines to.

Every stream is read in large blocks (:data:`BLOCK_BYTES`), never a line at a time: an unbuffered ``readline``
on an s3:// object fetches a whole read-ahead block per line (~35 ms a line measured with s3fs). A block holds
whole lines and knows the number of its first line, so a block parser can be vectorised and still name the
exact line of an error. A UTF-8 byte-order mark at the start of a file is skipped.

Every problem is reported as a :class:`~raykd.errors.FormatError` naming the file, the 1-based line number and
what was expected. In lenient mode a stage hands the error to a :class:`Quarantine` instead, which keeps the
raw line and the reason in ``quarantine/<file>.tsv`` and counts it for the manifest; nothing is dropped
silently.
"""

from __future__ import annotations

import gzip
import zlib
from collections import Counter
from collections.abc import Callable, Iterator

from raykd import storage
from raykd.errors import FormatError

BLOCK_BYTES = 1 << 23  # 8 MiB a read: one S3 request per ~25K passages or ~350K id triples
BOM = b"\xef\xbb\xbf"


def open_blocks(uri: str, block_bytes: int | None = None) -> Iterator[tuple[int, bytes]]:
    """Yield ``(first_line_number, block)``: consecutive blocks of whole lines (each ends with ``\\n`` except
    possibly the file's last) of about ``block_bytes`` each. ``.gz`` is decompressed transparently and a
    leading UTF-8 byte-order mark is dropped. Raises FormatError for a truncated or corrupt gzip (naming the
    line it ends in) or an empty file."""
    uri, block_bytes = str(uri), block_bytes or BLOCK_BYTES
    if not storage.exists(uri):
        raise FileNotFoundError(f"{uri}: file does not exist")
    gz = uri.endswith(".gz")
    raw = storage.open_read(uri, "rb")
    stream = gzip.GzipFile(fileobj=raw) if gz else raw
    n = 0  # lines yielded so far
    pending = b""
    bom_checked = False
    try:
        while True:
            try:
                chunk = stream.read(block_bytes)
            except EOFError:
                ln = n + pending.count(b"\n") + 1
                raise FormatError(uri, ln, f"truncated gzip stream: the file ends inside line {ln}") from None
            except (gzip.BadGzipFile, zlib.error, OSError) as e:
                if not gz:
                    raise
                raise FormatError(uri, n + pending.count(b"\n") + 1, f"corrupt gzip data ({e})") from None
            pending += chunk
            if not bom_checked and (len(pending) >= len(BOM) or not chunk):
                bom_checked = True
                if pending.startswith(BOM):
                    pending = pending[len(BOM) :]
            if not chunk:
                break
            end = pending.rfind(b"\n")
            if end >= 0:
                block, pending = pending[: end + 1], pending[end + 1 :]
                yield n + 1, block
                n += block.count(b"\n")
        if pending:
            yield n + 1, pending
            n += 1
    finally:
        raw.close()
    if n == 0:
        raise FormatError(uri, None, "file is empty")


def block_lines(
    uri: str, first_line: int, block: bytes, on_bad_line: Callable[[FormatError, str], None] | None = None
) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, line)`` of one block of :func:`open_blocks`, decoded, without line endings.
    Undecodable bytes raise FormatError unless ``on_bad_line`` is given: it then gets the error and the line
    (decoded with replacement characters) and the line is skipped (a quarantine's ``report``)."""
    lines = block.split(b"\n")
    if block.endswith(b"\n"):
        lines.pop()
    for i, b in enumerate(lines):
        ln = first_line + i
        try:
            line = b.decode("utf-8")
        except UnicodeDecodeError as e:
            err = FormatError(
                uri, ln, f"undecodable bytes at byte {e.start} of the line (expected UTF-8): {b[max(0, e.start - 10):e.start + 10]!r}"
            )
            if on_bad_line is None:
                raise err from None
            on_bad_line(err, b.decode("utf-8", "replace").rstrip("\r"))
            continue
        yield ln, line.rstrip("\r")


def raw_line(block: bytes, index: int) -> str:
    """Line ``index`` (0-based) of a block as text, for a quarantine entry."""
    return block.split(b"\n", index + 1)[index].decode("utf-8", "replace").rstrip("\r")


def open_text_lines(uri: str, on_bad_line: Callable[[FormatError, str], None] | None = None) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, line)`` of a UTF-8 text file without its line ending, read in large blocks (see
    :func:`open_blocks` and :func:`block_lines` for the errors)."""
    for first, block in open_blocks(uri):
        yield from block_lines(uri, first, block, on_bad_line)


def first_line(uri: str) -> str:
    """The first line of a file (for format sniffing), read with the same rules as every other line."""
    blocks = open_blocks(uri, block_bytes=1 << 16)
    try:
        first, block = next(blocks)
        return next(block_lines(uri, first, block.split(b"\n", 1)[0]))[1]
    finally:
        blocks.close()


class Quarantine:
    """Bad lines of lenient mode. ``strict=True`` turns every report into a raised FormatError instead."""

    def __init__(self, out_uri: str | None, strict: bool):
        self.out_uri, self.strict = out_uri, strict
        self.rows: dict[str, list[tuple[int | None, str, str]]] = {}
        self.counts: Counter = Counter()

    def report(self, err: FormatError, raw: str = "") -> None:
        if self.strict:
            raise err
        name = err.file.rstrip("/").rsplit("/", 1)[-1]
        self.rows.setdefault(name, []).append((err.line, err.reason, raw))
        self.counts[name] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def write(self) -> dict[str, int]:
        """Write ``quarantine/<file>.tsv`` (line, reason, raw line) for each file with bad lines."""
        for name, rows in self.rows.items():
            text = "line\treason\traw\n" + "".join(
                f"{ln if ln is not None else ''}\t{reason}\t{raw.replace(chr(9), ' ')}\n" for ln, reason, raw in sorted(rows, key=lambda r: r[0] or 0)
            )
            storage.write_bytes_atomic(storage.join(self.out_uri, "quarantine", f"{name}.tsv"), text.encode())
        return dict(self.counts)
