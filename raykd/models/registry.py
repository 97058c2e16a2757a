"""Students by name, and reopening any saved raykd model.

    load_student("bert_dot", "distilbert-base-uncased", pooling="cls")   # a new student to train
    load_scorer("runs/train/model")                                      # a trained one, whatever its kind

Kinds: ``bert_dot`` (:class:`~raykd.models.bi_encoder.BertDot`), ``bert_cat``
(:class:`~raykd.models.cross_encoder.CrossEncoder`), ``colbert`` (:class:`~raykd.models.colbert.ColBERT`),
``prettr`` (:class:`~raykd.models.prettr.PreTTR`), ``tk`` (:class:`~raykd.models.tk.TK`). The init may be a hub
name or a local HF folder (for TK: the model whose word embeddings and tokenizer it starts from).

``load_scorer`` reads ``raykd_model.json`` (written by every student here), else recognises the cross-encoder's
``raykd_cross_encoder.json`` / the TCT student's ``raykd_tct.json``, else treats an HF sequence-classification
checkpoint (a plain hub cross-encoder) as BERT_CAT.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from raykd import storage
from raykd.errors import UserError
from raykd.models.base import RankingModel, read_raykd_config


def _bert_dot(path: str, **kw) -> RankingModel:
    from raykd.models.bi_encoder import BertDot

    return BertDot.from_pretrained(path, **kw)


def _bert_cat(path: str, **kw) -> RankingModel:
    from raykd.models.cross_encoder import CrossEncoder

    return CrossEncoder.from_pretrained(path, **kw)


def _colbert(path: str, **kw) -> RankingModel:
    from raykd.models.colbert import ColBERT

    return ColBERT.from_pretrained(path, **kw)


def _prettr(path: str, **kw) -> RankingModel:
    from raykd.models.prettr import PreTTR

    return PreTTR.from_pretrained(path, **kw)


def _tk(path: str, **kw) -> RankingModel:
    from raykd.models.tk import TK

    return TK.from_pretrained(path, **kw)


def _tct(path: str, **kw) -> RankingModel:
    from raykd.models.tct import TctBiEncoder

    return TctBiEncoder.from_pretrained(path, **kw)


#: name -> loader(init_name_or_path, **options). Extend with :func:`register_student`.
STUDENTS: dict[str, Callable[..., RankingModel]] = {
    "bert_dot": _bert_dot,
    "bert_cat": _bert_cat,
    "colbert": _colbert,
    "prettr": _prettr,
    "tk": _tk,
}
# kinds that load_scorer can reopen but that are not offered as `--student` here
_SCORERS_ONLY: dict[str, Callable[..., RankingModel]] = {"tct": _tct}


def register_student(name: str, loader: Callable[..., RankingModel]) -> None:
    STUDENTS[name] = loader


def _check_init(init: str) -> str:
    if str(init).startswith("s3://"):  # a model folder in object storage: a local copy, downloaded once
        try:
            return storage.local_dir(str(init))
        except FileNotFoundError:
            raise UserError(f"model {init} does not exist in object storage") from None
    init = str(init).removeprefix("file://")
    looks_local = os.path.isabs(init) or init.startswith((".", "~")) or init.count("/") > 1
    if looks_local and not os.path.exists(os.path.expanduser(init)):
        raise UserError(f"init model {init} does not exist (expected a Hugging Face model folder or a hub name)")
    return os.path.expanduser(init) if looks_local else init


def load_student(kind: str, init_name_or_path: str, **options: Any) -> RankingModel:
    """A student of architecture ``kind`` initialised from ``init_name_or_path``; ``options`` are the
    architecture's keyword options (e.g. ``pooling="mean"``, ``split_layer=3``, ``dim=128``); None values are
    ignored."""
    if kind not in STUDENTS:
        raise UserError(f"unknown student {kind!r}; known students: {', '.join(sorted(STUDENTS))}")
    opts = {k: v for k, v in options.items() if v is not None}
    return STUDENTS[kind](_check_init(init_name_or_path), **opts)


def saved_kind(path: str) -> str | None:
    """The kind of the raykd model saved at ``path``; None when it is not one."""
    saved = read_raykd_config(path)
    if saved:
        return saved.get("kind")
    if os.path.isfile(os.path.join(path, "raykd_cross_encoder.json")):
        return "bert_cat"
    if os.path.isfile(os.path.join(path, "raykd_tct.json")):
        return "tct"
    cfg = os.path.join(path, "config.json")
    if os.path.isfile(cfg):
        with open(cfg) as f:
            archs = json.load(f).get("architectures") or []
        if any(a.endswith("ForSequenceClassification") for a in archs):
            return "bert_cat"
    return None


def load_scorer(path: str, **options: Any) -> RankingModel:
    """Reopen a saved model (any raykd student, the TCT student, or a plain HF cross-encoder as BERT_CAT)."""
    path = _check_init(path)
    kind = saved_kind(path) if os.path.isdir(path) else "bert_cat"
    loaders = {**STUDENTS, **_SCORERS_ONLY}
    if kind is None:
        raise UserError(
            f"{path}: not a raykd model (no raykd_model.json) and not a Hugging Face sequence-classification "
            f"checkpoint; give a folder written by `raykd train` or a cross-encoder"
        )
    if kind not in loaders:
        raise UserError(f"{path}: saved model kind {kind!r} is unknown; known: {', '.join(sorted(loaders))}")
    return loaders[kind](path, **{k: v for k, v in options.items() if v is not None})
