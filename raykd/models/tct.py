"""The TCT-ColBERT student (Lin, Yang and Lin 2020): the mean-pooled dot-product bi-encoder with TCT's input
format, an ordinary registered student (``--student tct``). The frozen ColBERT teacher that scores the batch
inside the training loop, and the in-batch step, live with the training code (:mod:`raykd.stages.train_steps`).

Student, :class:`TctBiEncoder`: a plain Hugging Face encoder (``AutoModel``), one vector per text by mean
pooling, relevance = dot product (Eq. 2, PoolAvg). Initialised from the trained teacher's encoder weights
(:meth:`TctBiEncoder.from_teacher`), as in the paper's stage 2. A checkpoint is an ordinary HF folder plus
``raykd_model.json`` (``kind: tct``, input format, max lengths), so the published
``castorini/tct_colbert-msmarco`` loads into it, and a raykd TCT student loads into pyserini's
``TctColBert*Encoder``.

Input format, ``tct_format=True`` (the released checkpoints' convention, as pyserini's
``TctColBertQueryEncoder`` / ``TctColBertDocumentEncoder`` feed them, tokenised with
``add_special_tokens=False``):

    query    "[CLS] [Q] " + q + "[MASK]" * 36   cut to exactly 36 tokens  ->  [CLS] [ q ] w1 .. wn [MASK] ..
    passage  "[CLS] [D] " + p                   cut to passage_max_length ->  [CLS] [ d ] w1 .. wm
    vector   mean of the last hidden states after the prefix (attention mask respected for passages)

With a BERT WordPiece vocabulary the markers are plain text: ``[Q]`` becomes the three tokens ``[ q ]``, so the
prefix is 4 tokens and pooling starts at position 4, exactly as pyserini's ``[:, 4:]``. (The prefix length is
measured from the tokenizer, so a tokenizer that registers ``[Q]`` as one token still pools after its prefix.)
Queries are never padded with [PAD]: every query is 36 tokens of which the [MASK]s are attended (query
augmentation, as in ColBERT). No [SEP] is appended.

``tct_format=False`` is the paper's PoolAvg baseline input: ``[CLS] text [SEP]`` and mean pooling over all
non-padding tokens.

Nothing here knows about Ray.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from typing import Any

import torch

from raykd.errors import UserError
from raykd.models.base import load_hf_encoder, saved_options
from raykd.models.bi_encoder import BertDot

TCT_QUERY_LENGTH = 36  # pyserini's TctColBertQueryEncoder: "hardcode for now"
DEFAULT_PASSAGE_MAX_LENGTH = 150  # the paper's training length (pyserini encodes up to 512)


class TctBiEncoder(BertDot):
    """The TCT-ColBERT student: BERT_DOT with mean pooling, one shared encoder, TCT's input format.

    Same interface as :class:`~raykd.models.bi_encoder.BertDot` (``tokenize`` gives ``query_*`` /
    ``passage_*`` tensors, ``forward(..., all_pairs=True)`` scores every query against every passage,
    ``return_embeddings=True`` returns the pooled vectors, ``encode_query`` / ``encode_passage``); only the
    tokenisation and the pooling offset differ.

    ``pooling``, ``normalize`` and ``pool_skip`` are accepted so that the options BERT_DOT records read back,
    but TCT's are fixed: mean pooling, no normalisation, pooling after the ``[CLS] [Q]`` / ``[CLS] [D]`` prefix.

    Example::

        student = TctBiEncoder.from_pretrained("castorini/tct_colbert-msmarco")    # or a local folder
        q = student.encode_query(["what is ray"])                                   # (1, 768)
        p = student.encode_passage(["Ray is a framework ..."])                      # (1, 768)
        score = q @ p.T
    """

    name = "tct"
    OPTIONS = ("tct_format", *BertDot.OPTIONS)

    def __init__(
        self,
        encoder: torch.nn.Module,
        tokenizer: Any,
        tct_format: bool = True,
        query_max_length: int = TCT_QUERY_LENGTH,
        passage_max_length: int = DEFAULT_PASSAGE_MAX_LENGTH,
        pooling: str = "mean",
        normalize: bool = False,
        pool_skip: int | None = None,
    ):
        self.tct_format = bool(tct_format)
        skip = 0
        if self.tct_format:
            q_skip, p_skip = _prefix_length(tokenizer, "[CLS] [Q] "), _prefix_length(tokenizer, "[CLS] [D] ")
            if q_skip != p_skip:
                raise UserError(
                    f"the tokenizer renders '[CLS] [Q]' as {q_skip} tokens but '[CLS] [D]' as {p_skip}: "
                    "TCT pools after one common prefix length"
                )
            skip = q_skip
            if query_max_length <= skip:
                raise ValueError(f"query_max_length {query_max_length} leaves no room after the {skip}-token prefix")
        fixed = {"pooling": ("mean", pooling), "normalize": (False, bool(normalize)),
                 "pool_skip": (skip, skip if pool_skip is None else int(pool_skip))}
        wrong = {k: v for k, (want, v) in fixed.items() if v != want}
        if wrong:
            raise UserError(
                f"the TCT student pools by the mean after its {skip}-token prefix, without normalisation; "
                f"{', '.join(f'{k}={v!r}' for k, v in wrong.items())} is not an option of it"
            )
        super().__init__(encoder, tokenizer, pooling="mean", normalize=False, pool_skip=skip,
                         query_max_length=query_max_length, passage_max_length=passage_max_length)

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, name_or_path: str, **kw: Any) -> TctBiEncoder:
        """A raykd TCT student folder (options from its ``raykd_model.json``) or any HF BERT encoder, e.g. the
        published ``castorini/tct_colbert-msmarco`` (the released convention: ``tct_format=True``, 36 / 150
        tokens; its BERT pretraining heads are ignored) or the ColBERT teacher whose weights stage 2 starts
        from (its own lengths are not the student's). ``kw`` overrides options."""
        path = os.path.expanduser(str(name_or_path))
        if (os.path.isabs(path) or path.startswith(".")) and not os.path.exists(path):
            raise UserError(f"TCT student path {path} does not exist (expected a Hugging Face model folder)")
        unknown = sorted(set(kw) - set(cls.OPTIONS))
        if unknown:
            raise UserError(f"unknown TCT student option(s) {', '.join(unknown)}; known: {', '.join(cls.OPTIONS)}")
        from transformers import AutoTokenizer

        return cls(load_hf_encoder(path), AutoTokenizer.from_pretrained(path), **saved_options(path, cls.name, cls.OPTIONS, kw))

    @classmethod
    def from_teacher(cls, teacher: torch.nn.Module, **kwargs: Any) -> TctBiEncoder:
        """A student whose encoder is a trainable copy of a ColBERT teacher's transformer (the paper initialises
        stage 2 from the stage-1 ColBERT weights); the teacher's tokenizer is shared. The copy is float32.
        ``teacher``: a raykd ColBERT, or a wrapper of one with a ``colbert`` attribute (the frozen teacher)."""
        colbert = getattr(teacher, "colbert", teacher)
        encoder = copy.deepcopy(colbert.encoder).float()
        for p in encoder.parameters():
            p.requires_grad_(True)
        return cls(encoder, colbert.tokenizer, **kwargs)

    # ------------------------------------------------------------------------------------------ tokenising
    def tokenize_queries(self, queries: Sequence[str]) -> dict[str, torch.Tensor]:
        """Query ids and attention mask; in TCT format every query is exactly ``query_max_length`` tokens."""
        queries = [str(q) for q in queries]
        if self.tct_format:
            texts = ["[CLS] [Q] " + q + "[MASK]" * self.query_max_length for q in queries]
            return self._tok_tct(texts, self.query_max_length)
        return self._tok(queries, self.query_max_length)

    def tokenize_passages(self, passages: Sequence[str]) -> dict[str, torch.Tensor]:
        """Passage ids and attention mask, padded to the longest in the batch."""
        passages = [str(p) for p in passages]
        if self.tct_format:
            return self._tok_tct(["[CLS] [D] " + p for p in passages], self.passage_max_length)
        return self._tok(passages, self.passage_max_length)

    def _tok_tct(self, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            texts, max_length=max_length, truncation=True, padding="longest",
            add_special_tokens=False, return_tensors="pt", return_token_type_ids=False,
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _prefix_length(tokenizer: Any, prefix: str) -> int:
    ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    if not ids or ids[0] != tokenizer.cls_token_id:
        raise UserError(f"the tokenizer does not render {prefix.strip()!r} starting with [CLS]: not a BERT vocabulary")
    return len(ids)
