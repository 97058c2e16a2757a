"""The interface every raykd ranking model (teacher or student) implements.

A model is a ``torch.nn.Module`` that owns its tokenizer(s). Tokenisation is separate from the forward pass
so that Ray Data can tokenise on CPU tasks and an actor only runs the model:

    batch = model.tokenize(queries, passages)       # dict of tensors, padded to the longest in the batch
    scores = model(**batch)                         # shape (B,), one relevance score per (query, passage)

Convenience: ``model.score(queries, passages)`` does both. Bi-encoders (BERT_DOT, ColBERT, the TCT student)
also offer ``encode_query`` / ``encode_passage``. ``save_pretrained(dir)`` / ``from_pretrained(dir)`` round
trip in Hugging Face format.
"""

from __future__ import annotations

import torch


class RankingModel(torch.nn.Module):
    """Base class: subclasses implement ``tokenize`` and ``forward``, and ``save_pretrained``."""

    name: str = "ranking_model"
    #: True when ``tokenize``/``forward`` accept k passages per query (``len(passages) == k * len(queries)``,
    #: passages of query i at rows i*k .. i*k+k-1) and encode each query once; False: one query per passage.
    grouped_passages: bool = False

    def tokenize(self, queries: list[str], passages: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def score(self, queries: list[str], passages: list[str]) -> torch.Tensor:
        if len(queries) != len(passages):
            raise ValueError(f"score() needs as many queries as passages, got {len(queries)} and {len(passages)}")
        batch = self.tokenize(queries, passages)
        device = next(self.parameters()).device
        return self(**{k: v.to(device) for k, v in batch.items()})

    def save_pretrained(self, out_dir: str) -> None:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------------------
# helpers shared by the students (added by the train issue)

RAYKD_CONFIG = "raykd_model.json"


def interleave_triples(queries: list[str], positives: list[str], negatives: list[str]) -> tuple[list[str], list[str]]:
    """``(queries, passages)`` for scoring B triples in ONE forward pass: each query appears once and the
    passages are ``[pos_0, neg_0, pos_1, neg_1, ...]`` (group size 2). Models whose ``forward`` accepts a group
    of passages per query (bi-encoders, PreTTR, TK) encode every query once; ``scores.view(B, 2)`` is then
    ``[[s(q_0, pos_0), s(q_0, neg_0)], ...]``."""
    if not (len(queries) == len(positives) == len(negatives)):
        raise ValueError(
            f"a triple batch needs as many queries as positives and negatives, got {len(queries)}, "
            f"{len(positives)} and {len(negatives)}"
        )
    passages = [p for pair in zip(positives, negatives) for p in pair]
    return list(queries), passages


def group_size(n_queries: int, n_passages: int) -> int:
    """How many passages each query has in a grouped batch (passages of query i are rows i*k .. i*k+k-1)."""
    if n_queries == 0 or n_passages % n_queries:
        raise ValueError(
            f"{n_passages} passages cannot be split evenly over {n_queries} queries: give one query per passage, "
            f"or k passages per query in query order"
        )
    return n_passages // n_queries


def write_raykd_config(out_dir: str, kind: str, **fields) -> None:
    """Write ``raykd_model.json`` (``kind`` + architecture options) beside a saved model so that
    :func:`raykd.models.registry.load_scorer` can reopen it."""
    import json
    import os

    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, RAYKD_CONFIG), "w") as f:
        json.dump({"kind": kind, "format_version": 1, **fields}, f, indent=2, sort_keys=True)


def read_raykd_config(model_dir: str) -> dict | None:
    """The ``raykd_model.json`` of a local model folder, or None when there is none (a plain HF model)."""
    import json
    import os

    path = os.path.join(str(model_dir), RAYKD_CONFIG)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def saved_options(name_or_path: str, kind: str, keys: tuple[str, ...], overrides: dict) -> dict:
    """A model's constructor options: those of ``keys`` saved in its ``raykd_model.json`` when that says
    ``kind`` (none for a plain HF folder, a hub name, or another kind's folder used as an init, e.g. the ColBERT
    teacher a TCT student starts from), updated with the ``overrides`` that are not None."""
    saved = read_raykd_config(name_or_path) or {}
    opts = {k: saved[k] for k in keys if k in saved} if saved.get("kind") == kind else {}
    opts.update({k: v for k, v in overrides.items() if v is not None})
    return opts


def save_encoder_folder(out_dir: str, encoder, tokenizer, kind: str, **fields) -> None:
    """The HF part of a saved model (encoder + tokenizer, loadable with ``AutoModel``) and its
    ``raykd_model.json``."""
    encoder.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    write_raykd_config(out_dir, kind, **fields)


def save_head(head: torch.nn.Module, out_dir: str, filename: str) -> None:
    """A small trained module beside the encoder (ColBERT's projection, PreTTR's scoring layer), as safetensors."""
    import os

    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, os.path.join(out_dir, filename))


def load_head(head: torch.nn.Module, model_dir: str, filename: str) -> bool:
    """Load :func:`save_head`'s file into ``head`` when ``model_dir`` is a saved raykd model that has it (an HF
    init has none: the head keeps its fresh weights). Whether it was loaded."""
    import os

    path = os.path.join(str(model_dir), filename)
    if read_raykd_config(model_dir) is None or not os.path.isfile(path):
        return False
    from safetensors.torch import load_file

    head.load_state_dict(load_file(path))
    return True


class EncoderFolder:
    """Mixin of the students saved as an HF encoder folder + ``raykd_model.json`` (+ one small trained module):
    BERT_DOT, TCT, ColBERT, PreTTR. A class lists its constructor options in ``OPTIONS`` (recorded and read
    back) and, when it has a head beside the encoder, the attribute and file (``HEAD_ATTR``, ``HEAD_FILE``).
    The constructor takes ``(encoder, tokenizer, **options)``."""

    OPTIONS: tuple[str, ...] = ()
    HEAD_ATTR: str | None = None
    HEAD_FILE: str | None = None

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kw):
        """From a saved raykd folder of this kind (its options) or any HF encoder as the initialisation (a hub
        name or a path); ``kw`` overrides options."""
        from transformers import AutoTokenizer

        opts = saved_options(name_or_path, cls.name, cls.OPTIONS, kw)
        model = cls(load_hf_encoder(name_or_path), AutoTokenizer.from_pretrained(name_or_path), **opts)
        if cls.HEAD_FILE:
            load_head(getattr(model, cls.HEAD_ATTR), name_or_path, cls.HEAD_FILE)
        return model

    def options(self) -> dict:
        """What ``raykd_model.json`` records and :meth:`from_pretrained` reads back."""
        return {k: getattr(self, k) for k in self.OPTIONS}

    def save_pretrained(self, out_dir: str) -> None:
        save_encoder_folder(out_dir, self.encoder, self.tokenizer, self.name, **self.options())
        if self.HEAD_FILE:
            save_head(getattr(self, self.HEAD_ATTR), out_dir, self.HEAD_FILE)


def load_hf_encoder(name_or_path: str):
    """A transformers encoder (AutoModel) WITHOUT the unused pooler where the architecture has one, so DDP
    does not fail on parameters that get no gradient."""
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(name_or_path)
    try:
        return AutoModel.from_pretrained(name_or_path, config=config, add_pooling_layer=False)
    except TypeError:
        return AutoModel.from_pretrained(name_or_path, config=config)


def tokenize_triples(model: RankingModel, queries: list[str], positives: list[str], negatives: list[str]) -> dict:
    """Model inputs that score B triples in ONE forward pass: ``model(**features).view(B, 2)`` is
    ``[[s(q_i, pos_i), s(q_i, neg_i)], ...]``. Grouped models see each query once; others get it twice."""
    q, p = interleave_triples(queries, positives, negatives)
    if not getattr(model, "grouped_passages", False):
        q = [x for x in q for _ in (0, 1)]
    return model.tokenize(q, p)
