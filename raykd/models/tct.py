"""TCT-ColBERT models (Lin, Yang and Lin 2020): the mean-pooled dot-product student and the frozen ColBERT
teacher that scores every (query, passage) pair of a training batch inside the loop.

Student, :class:`TctBiEncoder`: a plain Hugging Face encoder (``AutoModel``), one vector per text by mean
pooling, relevance = dot product (Eq. 2, PoolAvg). Initialised from the trained teacher's encoder weights
(:meth:`TctBiEncoder.from_teacher`), as in the paper's stage 2. A checkpoint is an ordinary HF folder plus
``raykd_model.json`` + ``raykd_tct.json`` (``kind: tct``, input format, max lengths), so the published
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
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import torch

from raykd.errors import UserError
from raykd.models.base import (
    group_size,
    load_hf_encoder,
    load_tokenizer,
    read_raykd_config,
    write_raykd_config,
)
from raykd.models.bi_encoder import BertDot

TCT_CONFIG = "raykd_tct.json"
TCT_QUERY_LENGTH = 36  # pyserini's TctColBertQueryEncoder: "hardcode for now"
DEFAULT_PASSAGE_MAX_LENGTH = 150  # the paper's training length (pyserini encodes up to 512)


class TctBiEncoder(BertDot):
    """The TCT-ColBERT student: BERT_DOT with mean pooling, one shared encoder, TCT's input format.

    Same interface as :class:`~raykd.models.bi_encoder.BertDot` (``tokenize`` gives ``query_*`` /
    ``passage_*`` tensors, ``forward(..., all_pairs=True)`` scores every query against every passage,
    ``return_embeddings=True`` returns the pooled vectors); only the tokenisation and the pooling offset differ.

    Example::

        student = TctBiEncoder.from_pretrained("castorini/tct_colbert-msmarco")    # or a local folder
        q = student.encode_query(["what is ray"])                                   # (1, 768)
        p = student.encode_passage(["Ray is a framework ..."])                      # (1, 768)
        score = q @ p.T
    """

    kind = "tct"
    name = "tct"

    def __init__(
        self,
        encoder: torch.nn.Module,
        tokenizer: Any,
        tct_format: bool = True,
        query_max_length: int = TCT_QUERY_LENGTH,
        passage_max_length: int = DEFAULT_PASSAGE_MAX_LENGTH,
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
        super().__init__(encoder, tokenizer, pooling="mean", normalize=False, pool_skip=skip,
                         query_max_length=query_max_length, passage_max_length=passage_max_length)

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, name_or_path: str, **kw: Any) -> TctBiEncoder:
        """A raykd TCT student folder (options from its ``raykd_model.json``) or any HF BERT encoder, e.g. the
        published ``castorini/tct_colbert-msmarco`` (the released convention: ``tct_format=True``, 36 / 150
        tokens; its BERT pretraining heads are ignored). ``kw`` overrides options."""
        path = os.path.expanduser(str(name_or_path))
        if (os.path.isabs(path) or path.startswith(".")) and not os.path.exists(path):
            raise UserError(f"TCT student path {path} does not exist (expected a Hugging Face model folder)")
        unknown = sorted(set(kw) - {"tct_format", "query_max_length", "passage_max_length"})
        if unknown:
            raise UserError(f"unknown TCT student option(s) {', '.join(unknown)}; known: tct_format, "
                            "query_max_length, passage_max_length")
        saved = read_tct_config(path)  # a ColBERT teacher's own lengths (32 / 180) are not the student's
        opts = {k: saved[k] for k in ("tct_format", "query_max_length", "passage_max_length") if k in saved}
        opts.update({k: v for k, v in kw.items() if v is not None})
        return cls(load_hf_encoder(path), load_tokenizer(path), **opts)

    @classmethod
    def from_teacher(cls, teacher: FrozenColbertTeacher | torch.nn.Module, **kwargs: Any) -> TctBiEncoder:
        """A student whose encoder is a trainable copy of the teacher's transformer (the paper initialises
        stage 2 from the stage-1 ColBERT weights); the teacher's tokenizer is shared. The copy is float32."""
        colbert = teacher.colbert if isinstance(teacher, FrozenColbertTeacher) else teacher
        encoder = copy.deepcopy(colbert.encoder).float()
        for p in encoder.parameters():
            p.requires_grad_(True)
        return cls(encoder, colbert.tokenizer, **kwargs)

    def save_pretrained(self, out_dir: str) -> None:
        """An HF encoder folder (loadable by ``AutoModel`` and by pyserini's TCT encoders) plus the input
        format and max lengths in ``raykd_model.json`` (``kind: tct``, for the registry) and ``raykd_tct.json``
        (for :mod:`raykd.encoders`)."""
        self.encoder.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)
        options = {"tct_format": self.tct_format, "pooling": "mean", "pool_skip": self.pool_skip,
                   "query_max_length": self.query_max_length, "passage_max_length": self.passage_max_length}
        write_raykd_config(out_dir, self.kind, **options)
        with open(os.path.join(out_dir, TCT_CONFIG), "w") as f:  # what raykd.encoders (index/search) reads
            json.dump({"model": self.kind, **options}, f, indent=2, sort_keys=True)

    @property
    def query_prefix_length(self) -> int:
        """Leading tokens left out of the query's mean (``[CLS] [ q ]``: 4 with a BERT vocabulary)."""
        return self.pool_skip

    @property
    def passage_prefix_length(self) -> int:
        return self.pool_skip

    # ------------------------------------------------------------------------------------------ tokenising
    def tokenize_queries(self, queries: Sequence[str]) -> dict[str, torch.Tensor]:
        """Query ids and attention mask; in TCT format every query is exactly ``query_max_length`` tokens."""
        queries = [str(q) for q in queries]
        if self.tct_format:
            texts = ["[CLS] [Q] " + q + "[MASK]" * self.query_max_length for q in queries]
            return self._encode(texts, self.query_max_length, add_special_tokens=False)
        return self._encode(queries, self.query_max_length, add_special_tokens=True)

    def tokenize_passages(self, passages: Sequence[str]) -> dict[str, torch.Tensor]:
        """Passage ids and attention mask, padded to the longest in the batch."""
        passages = [str(p) for p in passages]
        if self.tct_format:
            return self._encode(["[CLS] [D] " + p for p in passages], self.passage_max_length, add_special_tokens=False)
        return self._encode(passages, self.passage_max_length, add_special_tokens=True)

    def _encode(self, texts: list[str], max_length: int, add_special_tokens: bool) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            texts, max_length=max_length, truncation=True, padding="longest",
            add_special_tokens=add_special_tokens, return_tensors="pt", return_token_type_ids=False,
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def tokenize(self, queries: Sequence[str], passages: Sequence[str]) -> dict[str, torch.Tensor]:
        group_size(len(queries), len(passages))
        q, p = self.tokenize_queries(queries), self.tokenize_passages(passages)
        return {"query_input_ids": q["input_ids"], "query_attention_mask": q["attention_mask"],
                "passage_input_ids": p["input_ids"], "passage_attention_mask": p["attention_mask"]}

    @torch.no_grad()
    def encode_query(self, queries: list[str]) -> torch.Tensor:
        t = self.tokenize_queries(queries)
        device = next(self.parameters()).device
        return self.embed(t["input_ids"].to(device), t["attention_mask"].to(device))

    @torch.no_grad()
    def encode_passage(self, passages: list[str]) -> torch.Tensor:
        t = self.tokenize_passages(passages)
        device = next(self.parameters()).device
        return self.embed(t["input_ids"].to(device), t["attention_mask"].to(device))


def read_tct_config(path: str) -> dict:
    """The TCT options saved with a student (``raykd_tct.json``, or ``raykd_model.json`` of kind ``tct``);
    empty for anything else (a published checkpoint, a ColBERT teacher)."""
    f = os.path.join(str(path), TCT_CONFIG)
    if os.path.isfile(f):
        with open(f) as fh:
            return json.load(fh)
    saved = read_raykd_config(path) or {}
    return saved if saved.get("kind") == "tct" else {}


def _prefix_length(tokenizer: Any, prefix: str) -> int:
    ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    if not ids or ids[0] != tokenizer.cls_token_id:
        raise UserError(f"the tokenizer does not render {prefix.strip()!r} starting with [CLS]: not a BERT vocabulary")
    return len(ids)


# ---------------------------------------------------------------------------------------------- teacher
def parameter_checksum(module: torch.nn.Module) -> str:
    """SHA-256 over every parameter and buffer (names, shapes, exact bytes): equal iff the weights are."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class FrozenColbertTeacher:
    """TCT's tightly-coupled teacher: a trained raykd :class:`~raykd.models.colbert.ColBERT`, frozen.

    Frozen means: ``eval()`` (no dropout), ``requires_grad=False`` on every parameter, scoring under
    ``torch.no_grad()``, and a SHA-256 checksum of the weights taken when wrapped that :meth:`assert_unchanged`
    re-checks (the train stage calls it after the run). Not an ``nn.Module`` on purpose: DDP and the optimizer
    never see it. ``bf16=True`` casts the weights to bfloat16 when the device is a GPU (ignored on CPU).

    :meth:`scores` gives the (B, N) MaxSim matrix of every query against every passage of the batch::

        teacher = FrozenColbertTeacher.from_pretrained("out/colbert-teacher/checkpoint")
        t = teacher.scores(queries, positives + negatives)     # (B, 2B)
    """

    def __init__(self, colbert: torch.nn.Module, device: str | torch.device = "cpu", bf16: bool = False):
        if not (hasattr(colbert, "embed") and hasattr(colbert, "similarity") and hasattr(colbert, "tokenize")):
            raise UserError(
                f"the TCT teacher must be a raykd ColBERT model (embed/similarity/tokenize); got {type(colbert).__name__}"
            )
        device = torch.device(device)
        self.colbert = colbert.to(device)
        self.bf16 = bool(bf16) and device.type == "cuda"
        if self.bf16:
            self.colbert.to(torch.bfloat16)
        self.colbert.eval()
        for p in self.colbert.parameters():
            p.requires_grad_(False)
        self.checksum = parameter_checksum(self.colbert)

    @classmethod
    def from_pretrained(cls, path: str, device: str | torch.device = "cpu", bf16: bool = False) -> FrozenColbertTeacher:
        """Load a ColBERT checkpoint written by raykd's train stage (``raykd_model.json`` kind ``colbert``)."""
        from raykd.models.colbert import ColBERT

        path = os.path.expanduser(str(path))
        if not os.path.isdir(path):
            raise UserError(f"TCT teacher {path} is not a folder: expected a raykd ColBERT checkpoint")
        saved = read_raykd_config(path)
        if not saved or saved.get("kind") != "colbert":
            kind = saved.get("kind") if saved else "none (no raykd_model.json)"
            raise UserError(
                f"TCT teacher {path} is not a raykd ColBERT checkpoint (raykd_model.json kind: {kind}); "
                "train one first: raykd train --student colbert ..."
            )
        return cls(ColBERT.from_pretrained(path), device=device, bf16=bf16)

    @property
    def device(self) -> torch.device:
        return next(self.colbert.parameters()).device

    def tokenize(self, queries: Sequence[str], passages: Sequence[str]) -> dict[str, torch.Tensor]:
        """ColBERT's own tokenisation of the batch (``query_*`` / ``passage_*`` tensors)."""
        return self.colbert.tokenize(list(queries), list(passages))

    @torch.no_grad()
    def token_vectors(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(q, q_mask, p, p_mask)``: ColBERT's normalised token vectors of the batch's queries and passages."""
        dev = self.device
        qm, pm = batch["query_attention_mask"].to(dev), batch["passage_attention_mask"].to(dev)
        q = self.colbert.embed(batch["query_input_ids"].to(dev), qm)
        p = self.colbert.embed(batch["passage_input_ids"].to(dev), pm)
        return q, qm, p, pm

    @torch.no_grad()
    def maxsim(self, q: torch.Tensor, q_mask: torch.Tensor, p: torch.Tensor, p_mask: torch.Tensor) -> torch.Tensor:
        """(Q, P) float32 MaxSim scores of every query against every passage."""
        return self.colbert.similarity(q, q_mask, p, p_mask, all_pairs=True).float()

    @torch.no_grad()
    def scores(self, queries: Sequence[str], passages: Sequence[str]) -> torch.Tensor:
        """(len(queries), len(passages)) teacher scores; ``len(passages)`` a multiple of ``len(queries)``."""
        return self.maxsim(*self.token_vectors(self.tokenize(queries, passages)))

    def assert_unchanged(self) -> None:
        """Raise if the teacher's weights differ in any bit from when it was wrapped."""
        now = parameter_checksum(self.colbert)
        if now != self.checksum:
            raise RuntimeError(f"the frozen TCT teacher's weights changed during training ({self.checksum[:12]} -> {now[:12]})")
        if self.colbert.training or any(p.requires_grad for p in self.colbert.parameters()):
            raise RuntimeError("the frozen TCT teacher was put back in training mode or had gradients re-enabled")


class TctDistiller:
    """One TCT training step's loss: the student and the frozen teacher score the batch's B queries against
    its 2B passages (or, with ``cross_device``, against the passages of every DDP worker), then
    :func:`raykd.losses.tct.tct_loss`.

    ``student`` is a :class:`TctBiEncoder`, possibly wrapped by DDP (it is called through ``forward`` so DDP's
    hooks run); ``teacher`` may be None only for ``mode="none"`` (labels only: no teacher pass at all).

    Batch layout (:meth:`collate`): the student's ``query_*`` (B rows) and ``passage_*`` (2B rows: the B
    positives, then the B negatives) tensors, and the same texts in the teacher's own tokenisation under
    ``teacher_*`` keys."""

    def __init__(
        self,
        student: torch.nn.Module,
        teacher: FrozenColbertTeacher | None,
        mode: str = "inbatch",
        tau: float = 0.25,
        gamma: float = 0.1,
        cross_device: bool = False,
    ):
        from raykd.losses.tct import MODES

        if mode not in MODES:
            raise UserError(f"unknown TCT mode {mode!r}; expected one of {', '.join(MODES)}")
        if mode != "none" and teacher is None:
            raise UserError(f"TCT mode {mode!r} distils from a teacher: give a ColBERT teacher checkpoint")
        self.student, self.teacher = student, teacher
        self.mode, self.tau, self.gamma, self.cross_device = mode, float(tau), float(gamma), bool(cross_device)

    @property
    def _student(self) -> TctBiEncoder:
        return getattr(self.student, "module", self.student)  # through a DDP wrapper

    def collate(self, queries: Sequence[str], positives: Sequence[str], negatives: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tensors of one batch of B triples (CPU; the train loop moves them)."""
        if not (len(queries) == len(positives) == len(negatives)) or not queries:
            raise ValueError(
                f"a TCT batch needs B >= 1 queries, positives and negatives, got {len(queries)}, "
                f"{len(positives)}, {len(negatives)}"
            )
        passages = list(positives) + list(negatives)
        batch = self._student.tokenize(list(queries), passages)
        if self.mode != "none":
            batch.update({f"teacher_{k}": v for k, v in self.teacher.tokenize(queries, passages).items()})
        return batch

    def teacher_scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, N) MaxSim of the local queries against the (gathered) passages, in the student's column order."""
        t = {k.removeprefix("teacher_"): v for k, v in batch.items() if k.startswith("teacher_")}
        q, qm, p, pm = self.teacher.token_vectors(t)
        if self.cross_device:
            from raykd.losses.gather import gather_token_vectors

            b = q.shape[0]
            pos, pos_m = gather_token_vectors(p[:b], pm[:b])
            neg, neg_m = gather_token_vectors(p[b:], pm[b:])
            p, pm = torch.cat([pos, neg]), torch.cat([pos_m, neg_m])
        return self.teacher.maxsim(q, qm, p, pm)

    def scores(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """``(student, teacher, positive_index, negative_index)``: (B, N) score matrices (teacher None in mode
        ``none``) of the local queries against the batch's (or, cross-device, the global batch's) passages."""
        from raykd.losses.gather import gather_rows

        device = next(self._student.parameters()).device
        keys = ("query_input_ids", "query_attention_mask", "passage_input_ids", "passage_attention_mask")
        q, p = self.student(**{k: batch[k].to(device) for k in keys}, return_embeddings=True)
        b = q.shape[0]
        if p.dim() != 2 or p.shape[0] != 2 * b:
            raise ValueError(f"a TCT batch has 2B pooled passage vectors for B queries; got {tuple(p.shape)} for {b}")
        rows = torch.arange(b, device=device)
        if self.cross_device:
            pos, offset = gather_rows(p[:b])
            neg, _ = gather_rows(p[b:])
            passages = torch.cat([pos, neg])
            pos_idx, neg_idx = offset + rows, pos.shape[0] + offset + rows
        else:
            passages, pos_idx, neg_idx = p, rows, b + rows
        student = q.float() @ passages.float().T
        teacher = None if self.mode == "none" else self.teacher_scores(batch).to(device)
        return student, teacher, pos_idx, neg_idx

    def loss_from_scores(self, student: torch.Tensor, teacher: torch.Tensor | None, positive_index: torch.Tensor,
                         negative_index: torch.Tensor | None = None) -> torch.Tensor:
        from raykd.losses.tct import tct_loss

        if negative_index is None:
            negative_index = positive_index + student.shape[1] // 2
        return tct_loss(student, teacher, positive_index, negative_index, mode=self.mode, tau=self.tau, gamma=self.gamma)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The scalar TCT loss of one batch (differentiable in the student only)."""
        student, teacher, pos_idx, neg_idx = self.scores(batch)
        return self.loss_from_scores(student, teacher, pos_idx, neg_idx)
