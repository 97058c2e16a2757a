"""One contract for every stage's output: is it finished, and was it made with these settings?

A stage's **fingerprint** is the settings that change its result: the fields of its config dataclass (minus those
declared with ``field(..., fingerprint=False)``: where it writes, resources, actor counts, batch sizes that
change nothing but speed, log frequency, ``overwrite`` itself), with values the stage resolved substituted where
it resolves them, plus the identity of the raykd outputs it reads (their manifests' ``created_at``).

Every stage starts with :func:`claim` and finishes by writing its manifest with the claim's fingerprint:

- ``manifest.json`` present with the same fingerprint: :attr:`State.FINISHED`, the stage returns that manifest
  and recomputes nothing;
- ``_started.json`` (written by :func:`claim`) with the same fingerprint and no manifest: :attr:`State.RESUME`,
  the stage continues, skipping the parts it already committed;
- nothing there yet: :attr:`State.FRESH`;
- a different fingerprint, in the manifest or in the started marker of an unfinished run that committed
  something: refused with a :class:`~raykd.errors.UserError` naming each differing field with both values. ``overwrite=True`` removes
  the old output (only what lies under that output's prefix) and starts fresh.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
import shutil
import time
from typing import Any

from raykd import __version__, storage
from raykd.errors import UserError

STARTED = "_started.json"


class State(str, enum.Enum):
    FRESH = "fresh"
    RESUME = "resume"
    FINISHED = "finished"


@dataclasses.dataclass
class Claim:
    """What :func:`claim` found; ``manifest`` is set when ``state`` is FINISHED."""

    state: State
    fingerprint: dict
    manifest: storage.Manifest | None = None

    @property
    def finished(self) -> bool:
        return self.state is State.FINISHED


def _plain(value: Any) -> Any:
    """``value`` as it reads back from the manifest's JSON (tuples become lists, secrets ``***``)."""
    return json.loads(json.dumps(storage.redact(value), sort_keys=True, default=str))


def fingerprint(cfg: Any, **resolved: Any) -> dict:
    """The fields of the config dataclass ``cfg`` that change its result (every field not declared with
    ``fingerprint=False``), with ``resolved`` values replacing or adding entries (a default the stage resolved,
    an input's identity from :func:`input_identity`)."""
    fp = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.metadata.get("fingerprint", True)}
    fp.update(resolved)
    return _plain(fp)


def input_identity(uri: str | None) -> float | None:
    """The identity of a raykd output read as input: its manifest's ``created_at`` (a re-made input is another
    input); for the ``model/`` folder of a train output, that output's. None for anything else (a plain file, a
    hub name, nothing)."""
    if not uri:
        return None
    uri = str(uri).rstrip("/")
    for candidate in (uri, uri.rsplit("/", 1)[0] if uri.endswith("/model") else None):
        if candidate and storage.has_manifest(candidate):
            return json.loads(storage.read_bytes(storage.join(candidate, storage.MANIFEST))).get("created_at")
    return None


def _show(value: Any) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value, sort_keys=True)


_ABSENT = object()


def differences(was: dict, now: dict) -> list[tuple[str, Any, Any]]:
    """``(field, value there, value now)`` for each field that differs; a missing field reads as absent."""
    keys = list(now) + [k for k in was if k not in now]
    return [(k, was.get(k, _ABSENT), now.get(k, _ABSENT)) for k in keys if was.get(k, _ABSENT) != now.get(k, _ABSENT)]


def _refuse(out: str, where: str, what: str, diff: list[tuple[str, Any, Any]]) -> UserError:
    lines = "\n".join(f"  {k}: {_show(a)} (in {where}) != {_show(b)} (now)" for k, a, b in diff)
    return UserError(
        f"{out} already holds {what} made with other settings:\n{lines}\n"
        f"Pass another --out to keep it, or --overwrite to replace it."
    )


def _read_json(uri: str) -> dict | None:
    try:
        return json.loads(storage.read_bytes(uri))
    except FileNotFoundError:
        return None


def claim(out: str, stage: str, fp: dict, overwrite: bool = False) -> Claim:
    """Check ``out`` against ``fp`` before ``stage`` writes there (see the module docstring); unless the output
    is finished, (re)writes the started marker. Raises :class:`UserError` on a different fingerprint."""
    fp = _plain(fp)
    manifest_uri, marker_uri = storage.join(out, storage.MANIFEST), storage.join(out, STARTED)
    if overwrite:
        remove(out)
    manifest = _read_json(manifest_uri)
    if manifest is not None:
        was = {"stage": manifest.get("stage"), **(manifest.get("fingerprint") or {})}
        diff = differences(was, {"stage": stage, **fp})
        if not diff and manifest.get("complete"):
            fields = {f.name for f in dataclasses.fields(storage.Manifest)}
            return Claim(State.FINISHED, fp, storage.Manifest(**{k: v for k, v in manifest.items() if k in fields}))
        if not manifest.get("fingerprint"):
            raise UserError(
                f"{out} already holds a `{manifest.get('stage')}` output whose manifest records no fingerprint "
                f"(written before raykd recorded one), so its settings cannot be checked. "
                f"Pass another --out to keep it, or --overwrite to replace it."
            )
        raise _refuse(out, manifest_uri, f"a finished `{manifest.get('stage')}` output", diff)
    marker = _read_json(marker_uri)
    entries = storage.listdir(out)
    if marker is not None and entries != [STARTED]:
        diff = differences({"stage": marker.get("stage"), **(marker.get("fingerprint") or {})}, {"stage": stage, **fp})
        if diff:
            raise _refuse(out, marker_uri, f"an unfinished `{marker.get('stage')}` run", diff)
        state = State.RESUME
    elif marker is not None:  # a run that failed before committing anything (a bad input, say): nothing to keep
        state = State.FRESH
    elif entries:
        raise UserError(
            f"{out} is not empty but holds no raykd output (no {storage.MANIFEST}, no {STARTED}); "
            f"choose a new or empty --out"
        )
    else:
        state = State.FRESH
    storage.write_bytes_atomic(marker_uri, json.dumps(
        {"stage": stage, "fingerprint": fp, "started_at": time.time(), "code_version": __version__,
         "resumes": (marker or {}).get("resumes", -1) + 1}, indent=2, sort_keys=True).encode())
    return Claim(state, fp)


def remove(out: str) -> bool:
    """Delete the raykd output at ``out`` (everything under its prefix, nothing beside it); returns whether
    there was one. A folder that is not a raykd output (no manifest, no started marker) is never deleted."""
    entries = storage.listdir(out)
    if not entries:
        return False
    if storage.MANIFEST not in entries and STARTED not in entries:
        raise UserError(
            f"{out} holds no raykd output (no {storage.MANIFEST}, no {STARTED}); --overwrite deletes only raykd "
            f"outputs: choose a new or empty --out"
        )
    fs, path = storage.filesystem(out)
    path = path.rstrip("/")
    if storage.is_s3(out):
        if "/" not in path:
            raise UserError(f"{out}: --overwrite will not empty a whole bucket; write under a prefix")
        keys = [k for k in fs.find(path + "/") if k.startswith(path + "/")]
        if keys:
            fs.rm(keys)
    else:
        if os.path.dirname(path) == path or path == os.path.expanduser("~"):
            raise UserError(f"{out}: --overwrite will not delete a filesystem root or a home folder")
        shutil.rmtree(path)
    return True
