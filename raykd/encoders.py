"""Dense text encoders for indexing and search: any Hugging Face encoder, or a raykd bi-encoder checkpoint.

What a vector is, for a passage or a query ``x``::

    v(x) = normalize?( pool( Encoder(prefix + x)[:max_length] ) )       pool = CLS vector | mean of tokens

Settings come from (lowest to highest): defaults (``cls``, no normalisation, 512/64 tokens), the checkpoint's
own file, and the flags given. Checkpoint files read:

- ``raykd_model.json`` (raykd BERT_DOT students, :mod:`raykd.models.bi_encoder`): ``pooling``, ``normalize``,
  ``pool_skip`` (leading tokens left out of mean pooling), ``query_max_length``, ``passage_max_length``;
- ``raykd_tct.json`` (raykd/castorini TCT-ColBERT students, :mod:`raykd.models.tct`): encoded with the model's
  own TCT input format (``[CLS] [Q] q [MASK]*`` to 36 tokens, mean after the prefix).

Passages are encoded in length-sorted micro-batches (longest first, like sentence-transformers), so a batch
pads to similar lengths; the output keeps the input order. The transformer runs under bf16 autocast where the
hardware multiplies bf16 natively (``precision="auto"``: CUDA, or a CPU with AVX512-BF16/AMX), float32 elsewhere
or with ``precision="fp32"``; on all-MiniLM-L6-v2 the bf16 vectors keep cosine >= 0.9999 to the float32 ones and
scifact-mini nDCG@10 stays 0.7769 (tests/test_index.py). Nothing here knows about Ray.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np
import torch

from raykd.errors import UserError

POOLINGS = ("cls", "mean")
PRECISIONS = ("auto", "fp32", "bf16")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX). Without either, oneDNN emulates bf16
    and it is slower than float32; with AVX512-BF16 (2 EPYC cores), MiniLM encodes ~1.8x faster in bf16."""
    import torch.cpu

    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        f = getattr(torch.cpu, probe, None)
        try:
            if f is not None and f():
                return True
        except Exception:  # noqa: BLE001 - a private probe; absent or failing means "not known to be native"
            pass
    return False


def compute_dtype(device: torch.device, precision: str) -> torch.dtype:
    """The dtype the encoder's forward pass runs in (autocast); pooling and normalisation stay float32.

    ``auto``: bf16 on CUDA and on CPUs with native bf16 (:func:`cpu_has_native_bf16`), else fp32."""
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}; expected one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return torch.float32
    if precision == "bf16" or device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
        return torch.bfloat16
    return torch.float32


@dataclass
class EncoderSpec:
    """How to turn text into vectors; what an index's manifest records so search encodes queries the same way."""

    name_or_path: str
    pooling: str | None = None  # cls | mean; None: from the checkpoint, else cls
    normalize: bool | None = None  # L2-normalise; None: from the checkpoint, else False
    max_length: int | None = None  # passage tokens; None: from the checkpoint, else 512
    query_max_length: int | None = None  # None: from the checkpoint, else 64
    query_prefix: str = ""
    passage_prefix: str = ""
    pool_skip: int | None = None  # leading tokens left out of mean pooling; None: from the checkpoint, else 0
    precision: str = "auto"  # auto | fp32 | bf16 (compute_dtype); resolved on the device that encodes
    kind: str | None = None  # "hf" | "bert_dot" | "tct", filled by resolve()

    def to_dict(self) -> dict:
        return asdict(self)


def _checkpoint_file(path: str, name: str) -> dict | None:
    import json

    f = os.path.join(os.path.expanduser(str(path)), name)
    if os.path.isfile(f):
        with open(f) as fh:
            return json.load(fh)
    return None


def resolve(spec: EncoderSpec) -> EncoderSpec:
    """``spec`` with every None filled from the checkpoint's raykd file or the defaults."""
    tct = _checkpoint_file(spec.name_or_path, "raykd_tct.json")
    saved = _checkpoint_file(spec.name_or_path, "raykd_model.json") or {}
    if tct is not None:
        kind, saved = "tct", {"pooling": "mean", "normalize": False, **tct}
    elif saved:
        kind = "bert_dot"
        if saved.get("kind") not in (None, "bert_dot"):
            raise UserError(
                f"{spec.name_or_path}: raykd_model.json says kind {saved.get('kind')!r}; only bi-encoders "
                f"(bert_dot, tct) give one vector per passage for a dense index"
            )
    else:
        kind = "hf"

    def pick(value, key, default):
        return value if value is not None else saved.get(key, default)

    out = EncoderSpec(
        name_or_path=spec.name_or_path,
        pooling=pick(spec.pooling, "pooling", "cls"),
        normalize=bool(pick(spec.normalize, "normalize", False)),
        max_length=int(pick(spec.max_length, "passage_max_length", 512)),
        query_max_length=int(pick(spec.query_max_length, "query_max_length", 64)),
        query_prefix=spec.query_prefix,
        passage_prefix=spec.passage_prefix,
        pool_skip=int(pick(spec.pool_skip, "pool_skip", 0)),
        precision=spec.precision,
        kind=kind,
    )
    if out.pooling not in POOLINGS:
        raise UserError(f"unknown pooling {out.pooling!r}; expected one of {', '.join(POOLINGS)}")
    if out.precision not in PRECISIONS:
        raise UserError(f"unknown precision {out.precision!r}; expected one of {', '.join(PRECISIONS)}")
    return out


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str, skip: int = 0) -> torch.Tensor:
    """CLS vector (position 0) or the mean of the attended token vectors from position ``skip`` on."""
    if pooling == "cls":
        return hidden[:, 0]
    m = mask[:, skip:].unsqueeze(-1).to(hidden.dtype)
    return (hidden[:, skip:] * m).sum(1) / m.sum(1).clamp(min=1.0)


class DenseEncoder:
    """Loads the encoder once; ``encode_passages`` / ``encode_queries`` give float32 numpy arrays."""

    def __init__(self, spec: EncoderSpec, device: str | None = None):
        self.spec = resolve(spec)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        path = os.path.expanduser(str(self.spec.name_or_path))
        try:
            if self.spec.kind == "tct":
                from raykd.models.tct import TctBiEncoder

                self._tct = TctBiEncoder.from_pretrained(path)
                self.model = self._tct.encoder
                self.tokenizer = self._tct.tokenizer
            else:
                from transformers import AutoModel, AutoTokenizer

                self.tokenizer = AutoTokenizer.from_pretrained(path)
                self.model = AutoModel.from_pretrained(path)
        except OSError as e:
            raise UserError(f"cannot load encoder {self.spec.name_or_path!r}: {e}") from None
        self.model.to(self.device).eval()
        self.dtype = compute_dtype(self.device, self.spec.precision)
        self.bf16 = self.dtype == torch.bfloat16
        self.forward_passes = 0
        self.tokens = 0
        self.padded_tokens = 0

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def _embed(self, batch: dict, skip: int) -> torch.Tensor:
        batch = {k: v.to(self.device) for k, v in batch.items()}
        self.forward_passes += 1
        self.tokens += int(batch["attention_mask"].sum())
        self.padded_tokens += int(batch["attention_mask"].numel())
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            hidden = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        v = pool(hidden.float(), batch["attention_mask"], self.spec.pooling, skip)
        if self.spec.normalize:
            v = torch.nn.functional.normalize(v, dim=-1)
        return v

    def _tokenize(self, texts: list[str], query: bool) -> dict:
        if self.spec.kind == "tct":
            return self._tct.tokenize_queries(texts) if query else self._tct.tokenize_passages(texts)
        prefix = self.spec.query_prefix if query else self.spec.passage_prefix
        enc = self.tokenizer(
            [prefix + t for t in texts],
            padding=True,
            truncation=True,
            max_length=self.spec.query_max_length if query else self.spec.max_length,
            return_tensors="pt",
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def _skip(self, query: bool) -> int:
        if self.spec.kind == "tct":
            return self._tct.query_prefix_length if query else self._tct.passage_prefix_length
        return self.spec.pool_skip or 0

    def encode(self, texts: list[str], query: bool = False, batch_size: int = 32) -> np.ndarray:
        """Vectors of ``texts`` in input order, computed in micro-batches of similar length."""
        texts = [str(t) for t in texts]
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        order = np.argsort([-len(t) for t in texts], kind="stable")
        for i in range(0, len(texts), batch_size):
            idx = order[i : i + batch_size]
            batch = self._tokenize([texts[j] for j in idx], query)
            out[idx] = self._embed(batch, self._skip(query)).cpu().numpy()
        return out

    def encode_passages(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        return self.encode(texts, query=False, batch_size=batch_size)

    def encode_queries(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        return self.encode(texts, query=True, batch_size=batch_size)
