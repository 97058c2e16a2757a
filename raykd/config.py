"""Stage configurations: small dataclasses, one per stage, every field with a default and a help text.

A stage's config is built from (lowest to highest precedence) the dataclass defaults, a YAML file given with
``--config FILE``, and command-line flags that were actually given. The same dataclass is what a test or a
job script passes to the stage function.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def field(default: Any = dataclasses.MISSING, help: str = "", fingerprint: bool = True, **kw) -> Any:
    """A dataclass field with a help text (``metadata['help']``); mutable defaults become factories.
    ``fingerprint=False``: the field does not change the stage's result (where it writes, resources, speed), so
    it is left out of the output's fingerprint (:mod:`raykd.finished`)."""
    meta = {"help": help, "fingerprint": fingerprint}
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)


def load_yaml(path: str | None) -> dict:
    if not path:
        return {}
    from raykd import storage

    try:
        data = yaml.safe_load(storage.read_bytes(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise ValueError(f"config file {path} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a mapping of option: value at the top, got {type(data).__name__}")
    return data


def build(cls: type[T], config_file: str | None = None, **overrides: Any) -> T:
    """``cls`` from its defaults, then ``config_file`` (YAML), then ``overrides`` whose value is not None
    (an empty tuple from a repeatable click option counts as not given)."""
    values = load_yaml(config_file)
    names = {f.name for f in dataclasses.fields(cls)}
    # a YAML may hold one section per stage (e.g. the demo's config); take this stage's section if present
    section = getattr(cls, "SECTION", None)
    if section and isinstance(values.get(section), dict):
        values = values[section]
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(
            f"config file {config_file}: unknown option(s) {', '.join(unknown)} for {cls.__name__}; "
            f"known: {', '.join(sorted(names))}"
        )
    for k, v in overrides.items():
        if v is None or (isinstance(v, tuple) and len(v) == 0):
            continue
        if k not in names:
            raise ValueError(f"unknown option {k} for {cls.__name__}")
        values[k] = list(v) if isinstance(v, tuple) else v
    hints = typing.get_type_hints(cls)
    for k, v in list(values.items()):
        if isinstance(v, list) and "tuple" in str(hints.get(k, "")):
            values[k] = tuple(v)
    return cls(**values)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)
