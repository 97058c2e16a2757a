"""One place that turns a URI into a filesystem, commits parts atomically and reads/writes manifests.

URIs: a local path, ``file://path`` or ``s3://bucket/key``. S3 credentials come from the standard AWS chain
(environment, shared profile, instance role); ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) points at an
S3-compatible store such as MinIO or a moto server.

Commit protocol: every part is written whole or not at all. Locally a part is written to a temporary name in
the same folder and renamed into place; on S3 a PUT (single or multipart) only becomes visible once complete.
A stage writes its parts, then ``manifest.json`` last; a reader trusts an output only if its manifest exists
and says ``"complete": true``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raykd import __version__

MANIFEST = "manifest.json"


class IncompleteOutputError(RuntimeError):
    """An output URI has no finished manifest: its stage never finished (or wrote somewhere else)."""


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def _strip_file(uri: str) -> str:
    uri = str(uri)
    return uri[len("file://") :] if uri.startswith("file://") else uri


def absolute(uri: str | None) -> str | None:
    """A local path made absolute; ``s3://`` URIs and empty values unchanged. Stages pass URIs to Ray workers,
    whose working directory is not the driver's: a relative ``demo-out/...`` would name another folder there."""
    if not uri or is_s3(uri):
        return uri
    return os.path.abspath(os.path.expanduser(_strip_file(uri)))


def absolute_model(name_or_path: str | None) -> str | None:
    """A model given as an existing local folder made absolute (see :func:`absolute`); a hub name (no such
    local path) or an ``s3://`` URI unchanged."""
    path = absolute(name_or_path)
    return path if not path or is_s3(path) or os.path.exists(path) else name_or_path


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path inside it."""
    uri = str(uri)
    if is_s3(uri):
        import s3fs

        kwargs: dict[str, Any] = {}
        endpoint = s3_endpoint()
        if endpoint:
            kwargs["client_kwargs"] = {"endpoint_url": endpoint}
        # listings are cached by s3fs; stages write and re-list, so never serve stale listings
        fs = s3fs.S3FileSystem(use_listings_cache=False, **kwargs)
        return fs, uri[len("s3://") :].rstrip("/")
    return fsspec.filesystem("file"), absolute(uri)


def arrow_filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for ``uri`` (what Ray Data and pyarrow.dataset take) and the path inside it."""
    uri = str(uri)
    if is_s3(uri):
        endpoint = s3_endpoint()
        kwargs: dict[str, Any] = {}
        if endpoint:
            scheme = "https" if endpoint.startswith("https") else "http"
            kwargs = {"endpoint_override": endpoint.split("://", 1)[-1], "scheme": scheme}
        region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs), uri[len("s3://") :].rstrip("/")
    return pafs.LocalFileSystem(), absolute(uri)


def join(uri: str, *parts: str) -> str:
    uri = str(uri).rstrip("/")
    return "/".join([uri, *[p.strip("/") for p in parts if p]])


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def makedirs(uri: str) -> None:
    if not is_s3(uri):
        fs, path = filesystem(uri)
        fs.makedirs(path, exist_ok=True)


def listdir(uri: str) -> list[str]:
    """Names (not paths) of the entries directly under ``uri``; empty if it does not exist."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return []
    return sorted(os.path.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))


def open_read(uri: str, mode: str = "rb"):
    fs, path = filesystem(uri)
    return fs.open(path, mode)


def read_bytes(uri: str) -> bytes:
    with open_read(uri) as f:
        return f.read()


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """Write ``data`` so that a reader sees the old state or the whole new file, never a partial one."""
    fs, path = filesystem(uri)
    if is_s3(uri):
        fs.pipe_file(path, data)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextmanager
def open_write_atomic(uri: str, block_size: int = 64 << 20) -> Iterator[Any]:
    """A binary file to stream into, which appears at ``uri`` whole when the block ends, or not at all if it
    raises: locally a hidden temporary file renamed into place, on S3 a multipart upload that is aborted."""
    fs, path = filesystem(uri)
    if is_s3(uri):
        f = fs.open(path, "wb", block_size=block_size)
        try:
            yield f
        except BaseException:
            f.discard()
            f.closed = True
            raise
        f.close()
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
    try:
        with open(tmp, "wb", buffering=block_size) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_parquet_atomic(table: pa.Table, uri: str, compression: str = "zstd") -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression=compression)
    write_bytes_atomic(uri, buf.getvalue())


def read_parquet(uri: str, columns: list[str] | None = None) -> pa.Table:
    """Read one Parquet file or every ``*.parquet`` part under a folder (in name order)."""
    fs, path = filesystem(uri)
    if fs.isdir(path):
        parts = parquet_parts(uri)
        if not parts:
            raise FileNotFoundError(f"{uri}: no Parquet parts in this folder")
        tables = []
        for part in parts:
            pfs, ppath = filesystem(part)
            with pfs.open(ppath, "rb") as f:
                tables.append(pq.read_table(f, columns=columns))
        return pa.concat_tables(tables)
    with fs.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def parquet_parts(uri: str) -> list[str]:
    """URIs of the committed ``*.parquet`` parts directly under ``uri``, in name order. Hidden files (the
    ``.tmp-*`` of a write that was killed before its rename) are not parts."""
    return [join(uri, n) for n in listdir(uri) if n.endswith(".parquet") and not n.startswith((".", "_"))]


def iter_parquet_batches(uri: str, columns: list[str] | None = None, batch_size: int = 65536) -> Iterator[pa.RecordBatch]:
    fs, path = filesystem(uri)
    files = parquet_parts(uri) if fs.isdir(path) else [uri]
    for part in files:
        pfs, ppath = filesystem(part)
        with pfs.open(ppath, "rb") as f:
            yield from pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=columns)


# ---------------------------------------------------------------------------------------------------------
# secrets

# secret-named keys: "aws_secret_access_key", "hf_token", "password"... but not counts such as "padded_tokens"
_SECRET_KEY = re.compile(
    r"(secret|password|passwd|credential|access_key|api_key|private_key|session_token|(^|_)token$)", re.IGNORECASE
)
_URI_CREDS = re.compile(r"(?P<scheme>[a-z0-9+.-]+://)(?P<creds>[^/@\s]+)@")
_AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{12,}\b")


def redact(value: Any) -> Any:
    """A copy of ``value`` with secrets replaced by ``***``: secret-named keys, credentials inside URIs,
    AWS key ids, and the literal values of the AWS secret environment variables."""
    secrets = [os.environ.get(k) for k in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN")]
    secrets = [s for s in secrets if s and len(s) >= 6]
    if isinstance(value, dict):
        return {
            k: ("***" if isinstance(k, str) and _SECRET_KEY.search(k) and v not in (None, "") else redact(v))
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    if isinstance(value, str):
        out = _URI_CREDS.sub(lambda m: m.group("scheme") + "***@", value)
        out = _AWS_KEY_ID.sub("***", out)
        for s in secrets:
            out = out.replace(s, "***")
        return out
    return value


# ---------------------------------------------------------------------------------------------------------
# manifests


@dataclass
class Manifest:
    """What a finished stage output holds. Written last; its presence is the commit point of the stage."""

    stage: str
    format: str
    format_version: int
    config: dict
    inputs: dict
    counts: dict
    stats: dict
    parts: list
    timings: dict
    fingerprint: dict = dataclasses.field(default_factory=dict)
    code_version: str = __version__
    complete: bool = True
    created_at: float = 0.0

    def to_json(self) -> str:
        d = redact(self.__dict__.copy())
        return json.dumps(d, indent=2, sort_keys=True, default=str)


def write_manifest(
    out_uri: str,
    stage: str,
    *,
    format: str,
    format_version: int = 1,
    config: dict | None = None,
    inputs: dict | None = None,
    counts: dict | None = None,
    stats: dict | None = None,
    parts: list | None = None,
    timings: dict | None = None,
    fingerprint: dict | None = None,
) -> Manifest:
    """Commit ``out_uri``: write its manifest last. ``fingerprint``: the settings it was made with, from
    :func:`raykd.finished.claim`."""
    m = Manifest(
        stage=stage,
        format=format,
        format_version=format_version,
        config=config or {},
        inputs=inputs or {},
        counts=counts or {},
        stats=stats or {},
        parts=parts or [],
        timings=timings or {},
        fingerprint=fingerprint or {},
        created_at=time.time(),
    )
    write_bytes_atomic(join(out_uri, MANIFEST), m.to_json().encode())
    return m


def has_manifest(out_uri: str) -> bool:
    return exists(join(out_uri, MANIFEST))


def read_manifest(out_uri: str, stage: str | None = None, format: str | None = None) -> dict:
    """The finished manifest of ``out_uri``; raises :class:`IncompleteOutputError` with a clear message when the
    output is unfinished, or belongs to another stage or format than the caller expects."""
    uri = join(out_uri, MANIFEST)
    if not exists(uri):
        what = f"a finished `{stage}` output" if stage else "a finished raykd output"
        raise IncompleteOutputError(
            f"{out_uri}: no {MANIFEST} found, so this is not {what}. The stage that writes it did not finish "
            f"(re-run it with the same --out to resume), or the URI is wrong."
        )
    m = json.loads(read_bytes(uri))
    if not m.get("complete"):
        raise IncompleteOutputError(f"{uri}: manifest says the output is incomplete; re-run its stage to finish it")
    if stage and m.get("stage") != stage:
        raise IncompleteOutputError(f"{out_uri}: expected the output of stage `{stage}`, found stage `{m.get('stage')}`")
    if format and m.get("format") != format:
        raise IncompleteOutputError(f"{out_uri}: expected format `{format}`, found `{m.get('format')}`")
    return m


def worker_env() -> dict[str, str]:
    """Environment variables that Ray workers need to reach the same storage as the driver, passed through a
    Ray runtime env. No credentials: a runtime env is visible on the dashboard, and workers get keys the way the
    driver does (the environment the node was started with, a profile, or the instance role)."""
    keys = [
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_DEFAULT_REGION",
        "AWS_REGION",
        "AWS_PROFILE",
        "HF_HUB_OFFLINE",
        "HF_HOME",
    ]
    return {k: os.environ[k] for k in keys if os.environ.get(k)}


def local_dir(uri: str, cache_root: str | None = None) -> str:
    """A local folder with the contents of ``uri``: the path itself for local URIs; for ``s3://`` a copy
    downloaded once into ``cache_root`` (default ``$RAYKD_CACHE`` or ``~/.cache/raykd``), keyed by the URI and
    refreshed when the folder's manifest (if any) changes. Models are loaded with ``from_pretrained`` from here.
    Hub names (no scheme, not an existing path) pass through unchanged."""
    uri = str(uri)
    if not is_s3(uri):
        return _strip_file(uri)
    import hashlib

    root = cache_root or os.environ.get("RAYKD_CACHE") or os.path.expanduser("~/.cache/raykd")
    fs, path = filesystem(uri)
    if not fs.exists(path):
        raise FileNotFoundError(f"{uri}: does not exist")
    stamp = ""
    if fs.exists(path + "/" + MANIFEST):
        stamp = fs.cat_file(path + "/" + MANIFEST).decode(errors="replace")
    key = hashlib.sha256((uri + "\n" + stamp).encode()).hexdigest()[:20]
    dest = os.path.join(root, "s3", key)
    done = os.path.join(dest, ".raykd-complete")
    if os.path.exists(done):
        return dest
    tmp = f"{dest}.tmp-{uuid.uuid4().hex[:8]}"
    os.makedirs(tmp, exist_ok=True)
    for src in fs.find(path):
        rel = src[len(path) :].lstrip("/")
        target = os.path.join(tmp, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fs.get_file(src, target)
    open(os.path.join(tmp, ".raykd-complete"), "w").close()
    try:
        os.replace(tmp, dest)
    except OSError:  # another process finished the same download first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def upload_dir(local: str, uri: str) -> list[str]:
    """Copy a local folder to ``uri`` file by file (each file atomically); returns the relative names."""
    names = []
    for dirpath, _, files in os.walk(local):
        for name in sorted(files):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, local)
            with open(full, "rb") as f:
                write_bytes_atomic(join(uri, rel.replace(os.sep, "/")), f.read())
            names.append(rel)
    return sorted(names)
