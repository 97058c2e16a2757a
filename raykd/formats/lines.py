"""Streaming line reading of raw input files (local or s3://, gzip'd or not) with exact error locations, and
the quarantine that lenient mode writes bad lines to.

Every problem is reported as a :class:`~raykd.errors.FormatError` naming the file, the 1-based line number and
what was expected. In lenient mode a stage hands the error to a :class:`Quarantine` instead, which keeps the
raw line and the reason in ``quarantine/<file>.tsv`` and counts it for the manifest; nothing is dropped
silently.
"""

from __future__ import annotations

import gzip
import io
import zlib
from collections import Counter
from collections.abc import Callable, Iterator

from raykd import storage
from raykd.errors import FormatError


def open_text_lines(uri: str, on_bad_line: Callable[[FormatError, str], None] | None = None) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, line)`` of a UTF-8 text file without its line ending. ``.gz`` is decompressed
    transparently. Raises FormatError for a truncated or corrupt gzip or an empty file, and for undecodable
    bytes unless ``on_bad_line`` is given: it then gets the error and the line (decoded with replacement
    characters) and the line is skipped (a quarantine's ``report``)."""
    uri = str(uri)
    if not storage.exists(uri):
        raise FileNotFoundError(f"{uri}: file does not exist")
    raw = storage.open_read(uri, "rb")
    stream = gzip.GzipFile(fileobj=raw) if uri.endswith(".gz") else raw
    buffered = io.BufferedReader(stream, buffer_size=1 << 20) if uri.endswith(".gz") else stream
    n = 0
    try:
        while True:
            try:
                b = buffered.readline()
            except EOFError:
                raise FormatError(uri, n + 1, f"truncated gzip stream: the file ends inside line {n + 1}") from None
            except (gzip.BadGzipFile, zlib.error, OSError) as e:
                raise FormatError(uri, n + 1, f"corrupt gzip data ({e})") from None
            if not b:
                break
            n += 1
            try:
                line = b.decode("utf-8")
            except UnicodeDecodeError as e:
                err = FormatError(
                    uri, n, f"undecodable bytes at byte {e.start} of the line (expected UTF-8): {b[max(0, e.start - 10):e.start + 10]!r}"
                )
                if on_bad_line is None:
                    raise err from None
                on_bad_line(err, b.decode("utf-8", "replace").rstrip("\r\n"))
                continue
            yield n, line.rstrip("\r\n")
    finally:
        raw.close()
    if n == 0:
        raise FormatError(uri, None, "file is empty")


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
