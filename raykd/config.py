"""Stage configurations: small dataclasses, one per stage, every field with a default and a help text.

The dataclass is the one source of truth for a stage's options: ``options(cls)`` turns its fields into the
click options of the command line (and of ``jobs/*.py``), and ``build`` makes the config from (lowest to
highest precedence) the dataclass defaults, a YAML file given with ``--config FILE``, and the flags that were
actually given. The same dataclass is what a test or a job script passes to the stage function. How a field
becomes a flag: docs/cli.md.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

import click
import yaml

T = TypeVar("T")


def field(default: Any = dataclasses.MISSING, help: str = "", *, flag: str | None = None,
          choices: typing.Sequence[str] | None = None, comma: bool = False, fingerprint: bool = True, **kw) -> Any:
    """A dataclass field with a help text; mutable defaults become factories.

    ``flag`` overrides the command-line spelling (``"--teacher"``, ``"--lenient/--strict"``, or ``"--bm25"``
    for a bool that is an on-only flag); ``choices`` limits a str field's values; ``comma`` lets each value of
    a list flag be a comma-separated list as well (``--metrics a,b --metrics c``). ``fingerprint=False``: the
    field does not change the stage's result (where it writes, resources, speed), so it is left out of the
    output's fingerprint (:mod:`raykd.finished`)."""
    metadata = {"help": help, "flag": flag, "choices": tuple(choices) if choices else None, "comma": comma,
                "fingerprint": fingerprint}
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=metadata, **kw)
    return dataclasses.field(default=default, metadata=metadata, **kw)


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
    (an empty tuple, list or dict from a repeatable click option counts as not given). A dict override
    is merged key by key over the file's (or the default) dict: ``--loss-option tau=0.5`` changes tau only."""
    values = load_yaml(config_file)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    # a YAML may hold one section per stage (e.g. the demo's config); take this stage's section if present
    section = getattr(cls, "SECTION", None)
    if section and isinstance(values.get(section), dict):
        values = values[section]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(
            f"config file {config_file}: unknown option(s) {', '.join(unknown)} for {cls.__name__}; "
            f"known: {', '.join(sorted(fields))}"
        )
    values = dict(values)
    for k, v in overrides.items():
        if v is None or (isinstance(v, (tuple, list, dict)) and len(v) == 0):
            continue
        if k not in fields:
            raise ValueError(f"unknown option {k} for {cls.__name__}")
        if isinstance(v, dict):
            below = values.get(k, _default(fields[k]))
            v = {**(below if isinstance(below, dict) else {}), **v}
        values[k] = list(v) if isinstance(v, tuple) else v
    hints = typing.get_type_hints(cls)
    for k, v in list(values.items()):
        if isinstance(v, list) and _origin(_unwrap_optional(hints.get(k))) is tuple:
            values[k] = tuple(v)
    return cls(**values)


# ---------------------------------------------------------------------------------------------------------
# the command-line options of a config dataclass


def options(cls: type, *, prefix: str = "", only: typing.Iterable[str] | None = None) -> list:
    """One click option per field of ``cls`` (or of the fields named in ``only``), in field order.

    Every option's click default is None (or empty), so a flag that is not given leaves the ``--config`` file's
    value alone; the dataclass default is shown once in the help. A ``prefix`` (``"sample"``) spells the flags
    ``--sample-<field>`` and names the parameters ``sample_<field>`` (see ``flags_of``)."""
    hints = typing.get_type_hints(cls)
    keep = set(only) if only is not None else None
    out = []
    for f in dataclasses.fields(cls):
        if keep is not None and f.name not in keep:
            continue
        meta = f.metadata
        hint = _unwrap_optional(hints[f.name])
        kind, item = _kind(hint, _default(f))
        name = f"{prefix}_{f.name}" if prefix else f.name
        flag = meta.get("flag") or _flag_name(f.name, kind, prefix)
        help_text = (meta.get("help") or "").strip()
        if kind == "list":
            help_text += "  Repeatable, or comma-separated." if meta.get("comma") else "  Repeatable."
        elif kind == "dict":
            help_text += "  Repeatable; VALUE is read as YAML."
        shown = _default_text(_default(f), kind, flag)
        if shown is not None:
            help_text = f"{help_text}  [default: {shown}]"
        if kind == "bool" and "/" in flag:
            out.append(click.Option([flag, name], default=None, help=help_text))
        elif kind == "bool":
            out.append(click.Option([flag, name], is_flag=True, default=None, help=help_text))
        elif kind == "list" and meta.get("comma"):
            # each value may hold several: split first, then check the items
            out.append(click.Option([flag, name], multiple=True, callback=_split_commas, help=help_text))
        elif kind == "list":
            out.append(click.Option([flag, name], multiple=True, type=_click_type(item, meta.get("choices")),
                                    help=help_text))
        elif kind == "dict":
            out.append(click.Option([flag, name], multiple=True, type=KEY_VALUE, callback=_to_dict,
                                    metavar="KEY=VALUE", help=help_text))
        else:
            out.append(click.Option([flag, name], type=_click_type(hint, meta.get("choices")), default=None,
                                    help=help_text))
    return out


def flags_of(cls: type, params: dict, prefix: str = "") -> dict:
    """The values of ``cls``'s options in a click ``params`` dict, by field name (see ``options``)."""
    p = f"{prefix}_" if prefix else ""
    return {f.name: params[p + f.name] for f in dataclasses.fields(cls) if p + f.name in params}


def _default_text(value: Any, kind: str, flag: str) -> str | None:
    """How ``--help`` shows a field's dataclass default; None when it is unset (None, "", empty)."""
    if kind == "bool":
        if value is None:
            return None
        on, _, off = flag.partition("/")
        if off:
            return (on if value else off).lstrip("-")
        return "on" if value else "off"
    if value is None or value == "" or (isinstance(value, (list, tuple, dict)) and not value):
        return None
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _origin(hint: Any) -> Any:
    if hint in (list, tuple, dict):
        return hint
    return typing.get_origin(hint)


def _unwrap_optional(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _kind(hint: Any, default: Any) -> tuple[str, Any]:
    """("bool" | "list" | "dict" | "scalar", the type of a list's items)."""
    origin = _origin(hint)
    if hint is bool:
        return "bool", None
    if origin in (list, tuple):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        item = args[0] if args else (type(default[0]) if default else str)
        return "list", item
    if origin is dict:
        return "dict", None
    return "scalar", None


def _flag_name(name: str, kind: str, prefix: str) -> str:
    if kind == "dict" and name.endswith("s"):
        name = name[:-1]  # student_options -> --student-option KEY=VALUE, given once per key
    flag = f"{prefix}-{name}" if prefix else name
    flag = flag.replace("_", "-")
    if kind == "bool":
        return f"--{flag}/--no-{flag}"
    return f"--{flag}"


def _click_type(hint: Any, choices: typing.Sequence[str] | None) -> click.ParamType:
    if choices:
        return click.Choice(list(choices))
    return {int: click.INT, float: click.FLOAT, bool: click.BOOL}.get(hint, click.STRING)


def _split_commas(ctx, param, values):
    return tuple(v for spec in values or () for v in spec.split(",") if v) or None


def _to_dict(ctx, param, values):
    return dict(values) if values else None


class KeyValue(click.ParamType):
    """``KEY=VALUE`` -> (KEY, VALUE read as a YAML scalar: 0.5 -> float, true -> bool, mean -> str)."""

    name = "key=value"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        key, sep, raw = str(value).partition("=")
        if not sep or not key.strip():
            self.fail(f"{value!r} is not KEY=VALUE", param, ctx)
        try:
            parsed = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            parsed = raw
        return key.strip(), parsed


KEY_VALUE = KeyValue()
