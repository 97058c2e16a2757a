"""Students by name, and reopening any saved raykd model.

    load_student("bert_dot", "distilbert-base-uncased", pooling="cls")   # a new student to train
    load_scorer("runs/train/model")                                      # a trained one, whatever its kind
    load_encoder("runs/train/model")                                     # one vector per text: index, search

Kinds: ``bert_dot`` (:class:`~raykd.models.bi_encoder.BertDot`), ``bert_cat``
(:class:`~raykd.models.cross_encoder.CrossEncoder`), ``colbert`` (:class:`~raykd.models.colbert.ColBERT`),
``prettr`` (:class:`~raykd.models.prettr.PreTTR`), ``tk`` (:class:`~raykd.models.tk.TK`), ``tct``
(:class:`~raykd.models.tct.TctBiEncoder`). Every one loads the same way, ``cls.from_pretrained(path, **options)``.
The init may be a hub name or a local HF folder (for TK: the model whose word embeddings and tokenizer it starts
from).

``load_scorer`` reads ``raykd_model.json`` (written by every student here), else recognises the cross-encoder's
``raykd_cross_encoder.json``, else treats an HF sequence-classification checkpoint (a plain hub cross-encoder)
as BERT_CAT.
"""

from __future__ import annotations

import json
import os
from typing import Any

from raykd import storage
from raykd.errors import UserError
from raykd.models.base import RankingModel, read_raykd_config
from raykd.models.bi_encoder import BertDot
from raykd.models.colbert import ColBERT
from raykd.models.cross_encoder import CrossEncoder
from raykd.models.prettr import PreTTR
from raykd.models.tct import TctBiEncoder
from raykd.models.tk import TK

#: name -> model class; each class loads with ``from_pretrained(init_name_or_path, **options)``
STUDENTS: dict[str, type[RankingModel]] = {
    "bert_dot": BertDot,
    "bert_cat": CrossEncoder,
    "colbert": ColBERT,
    "prettr": PreTTR,
    "tk": TK,
    "tct": TctBiEncoder,
}


def local_path(init: str) -> str:
    """A local folder for a model given as a folder, an s3:// URI (downloaded once per node) or a hub name
    (returned as it is); a local path that does not exist is a UserError."""
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


def _load(kind: str, path: str, options: dict) -> RankingModel:
    return STUDENTS[kind].from_pretrained(path, **{k: v for k, v in options.items() if v is not None})


def load_student(kind: str, init_name_or_path: str, **options: Any) -> RankingModel:
    """A student of architecture ``kind`` initialised from ``init_name_or_path``; ``options`` are the
    architecture's keyword options (e.g. ``pooling="mean"``, ``split_layer=3``, ``dim=128``); None values are
    ignored."""
    if kind not in STUDENTS:
        raise UserError(f"unknown student {kind!r}; known students: {', '.join(sorted(STUDENTS))}")
    return _load(kind, local_path(init_name_or_path), options)


def saved_kind(path: str) -> str | None:
    """The kind of the raykd model saved at ``path``; None when it is not one."""
    saved = read_raykd_config(path)
    if saved:
        return saved.get("kind")
    if os.path.isfile(os.path.join(path, "raykd_cross_encoder.json")):
        return "bert_cat"
    cfg = os.path.join(path, "config.json")
    if os.path.isfile(cfg):
        with open(cfg) as f:
            archs = json.load(f).get("architectures") or []
        if any(a.endswith("ForSequenceClassification") for a in archs):
            return "bert_cat"
    return None


def load_scorer(path: str, **options: Any) -> RankingModel:
    """Reopen a saved model (any raykd student, or a plain HF cross-encoder as BERT_CAT)."""
    path = local_path(path)
    kind = saved_kind(path) if os.path.isdir(path) else "bert_cat"
    if kind is None:
        raise UserError(
            f"{path}: not a raykd model (no raykd_model.json) and not a Hugging Face sequence-classification "
            f"checkpoint; give a folder written by `raykd train` or a cross-encoder"
        )
    if kind not in STUDENTS:
        raise UserError(f"{path}: saved model kind {kind!r} is unknown; known: {', '.join(sorted(STUDENTS))}")
    return _load(kind, path, options)


def encoder_kind(path: str) -> str:
    """The student kind a dense encoder at ``path`` loads as: its saved raykd kind, or ``bert_dot`` for a plain
    HF encoder (a hub name or a folder without raykd_model.json). Only single-vector bi-encoders qualify."""
    local = os.path.expanduser(str(path))
    kind = (saved_kind(local) if os.path.isdir(local) else None) or "bert_dot"
    if kind not in STUDENTS or not issubclass(STUDENTS[kind], BertDot):
        dense = sorted(k for k, c in STUDENTS.items() if issubclass(c, BertDot))
        raise UserError(
            f"{path}: a saved {kind!r} model gives no single vector per passage for a dense index; "
            f"give a plain HF encoder or a raykd {' / '.join(dense)} student"
        )
    return kind


def load_encoder(name_or_path: str, **options: Any) -> BertDot:
    """A dense encoder for index and search: a raykd BERT_DOT or TCT student as its own class (encoding exactly
    as in training and validation), or a plain HF encoder as a BERT_DOT with the given ``pooling`` /
    ``normalize`` / max lengths. ``options`` override the saved ones; None values are ignored."""
    path = local_path(name_or_path)
    return _load(encoder_kind(path), path, options)  # type: ignore[return-value]
