"""BERT_CAT, the cross-encoder: ``[CLS] q [SEP] p [SEP]`` -> transformer -> linear on CLS -> one score.

The teachers of Margin-MSE (Hofstätter et al. 2020) and a student architecture. A :class:`CrossEncoder` wraps a
Hugging Face ``AutoModelForSequenceClassification`` and its own tokenizer, so a checkpoint is an ordinary HF
folder (``config.json``, weights, tokenizer files) that any HF code can load, plus ``raykd_cross_encoder.json``
with the query/passage max lengths.

Query and passage are truncated separately (default 30 and 200 WordPiece tokens, as in the paper) and then
joined with the model's own special tokens (the tokenizer's post-processor: ``[CLS] q [SEP] p [SEP]`` for
BERT/ALBERT, ``<s> q </s></s> p </s>`` for RoBERTa-like models).

Which logit is the score:
  * ``num_labels == 1`` (BERT_CAT as trained by Hofstätter, raykd's students, ms-marco-MiniLM cross-encoders):
    the single logit;
  * ``num_labels == 2`` (hub cross-encoders trained as relevant/non-relevant classifiers, e.g. the Nogueira
    BERT re-rankers): ``logits[:, 1]``, the relevant-class logit;
  * a checkpoint without a classification head (a plain ``BertModel``, e.g. ``bert-base-uncased``) gets a new,
    randomly initialised one-logit head: the start of a student, not a teacher.

Tokenisation is split from the forward pass so Ray Data can tokenise on CPU tasks:
``tokenize_unpadded`` gives lists of ids per pair, ``collate`` pads a batch of them to the longest (a multiple
of 8), ``tokenize`` does both. On GPU the forward pass runs under bf16 autocast; attention is PyTorch SDPA.

Nothing here knows about Ray.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Sequence
from typing import Any

import torch

from raykd.errors import UserError
from raykd.models.base import RankingModel

DEFAULT_QUERY_MAX_LENGTH = 30
DEFAULT_PASSAGE_MAX_LENGTH = 200
RAYKD_CONFIG = "raykd_cross_encoder.json"


def _looks_like_path(name_or_path: str) -> bool:
    s = str(name_or_path)
    return (
        os.path.isabs(s)
        or s.startswith(("./", "../", "~", "file://"))
        or s.count("/") > 1  # hub ids are "name" or "org/name"
        or os.sep == "\\" and "\\" in s
    )


def _check_path(name_or_path: str) -> str:
    """``name_or_path`` as a local path or hub id; a local-looking path that does not exist is a UserError.
    An ``s3://`` folder is downloaded once to a local cache (:func:`raykd.storage.local_dir`)."""
    if str(name_or_path).startswith("s3://"):
        from raykd import storage  # here: bench/gpu.py imports this module without storage

        try:
            return storage.local_dir(str(name_or_path))
        except FileNotFoundError:
            raise UserError(f"cross-encoder {name_or_path} does not exist in object storage") from None
    path = os.path.expanduser(str(name_or_path).removeprefix("file://"))
    if _looks_like_path(path) and not os.path.exists(path):
        raise UserError(f"cross-encoder path {path} does not exist (expected a Hugging Face model folder)")
    if os.path.exists(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"cross-encoder folder {path} has no config.json: not a Hugging Face model folder")
    return path


def _max_lengths(path: str, query_max_length: int | None, passage_max_length: int | None) -> tuple[int, int]:
    """The arguments if given, else the lengths saved with the checkpoint, else 30 / 200."""
    saved = {}
    if os.path.isfile(os.path.join(path, RAYKD_CONFIG)):
        with open(os.path.join(path, RAYKD_CONFIG)) as f:
            saved = json.load(f)
    qlen = query_max_length or saved.get("query_max_length", DEFAULT_QUERY_MAX_LENGTH)
    plen = passage_max_length or saved.get("passage_max_length", DEFAULT_PASSAGE_MAX_LENGTH)
    return int(qlen), int(plen)


def _fit_positions(path: str, tokenizer: Any, qlen: int, plen: int) -> int:
    """``plen``, cut so that the longest pair (query ``qlen`` + passage + the special tokens) fits the model's
    absolute positions (``max_position_embeddings``; RoBERTa-style models lose ``pad_token_id + 1`` of them to
    their position offset): a longer pair would index past the position table. Models without absolute
    positions (DeBERTa-v2 without ``position_biased_input``) keep ``plen``."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError):
        return plen
    limit = getattr(config, "max_position_embeddings", None)
    if not limit or getattr(config, "position_biased_input", True) is False:
        return plen
    if config.model_type in ("roberta", "xlm-roberta", "camembert", "longformer"):
        limit -= (config.pad_token_id or 0) + 1
    room = limit - qlen - tokenizer.num_special_tokens_to_add(pair=True)
    if room < 1:
        raise UserError(f"cross-encoder {path}: a query of {qlen} tokens leaves no room for a passage within its "
                        f"{limit} positions; lower query_max_length")
    return min(plen, room)


def no_head_message(name_or_path: str, missing: list[str]) -> str:
    shown = ", ".join(missing[:6]) + (f" and {len(missing) - 6} more" if len(missing) > 6 else "")
    return (f"teacher {name_or_path} has no trained scoring head: its weights lack {shown}. A teacher's scores "
            "would come from a random layer; fine-tune it as a cross-encoder first (a student may start from it)")


def missing_teacher_weights(name_or_path: str) -> list[str]:
    """The weights a cross-encoder teacher at ``name_or_path`` would get freshly initialised (its scoring head,
    usually), read from the checkpoint's tensor names without loading the weights. A local or s3:// folder
    only; a hub name returns ``[]`` here (the scoring actor checks it when it loads it)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = _check_path(name_or_path)
    if not os.path.isdir(path):
        return []
    config = AutoConfig.from_pretrained(path)
    if not any(a.endswith("ForSequenceClassification") for a in (getattr(config, "architectures", None) or [])):
        config.num_labels = 1
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    stored = _checkpoint_keys(path)
    if stored is None:
        return []
    prefix = model.base_model_prefix
    missing = []
    for key in model.state_dict():
        bare = key.removeprefix(prefix + ".")
        if key not in stored and bare not in stored and f"{prefix}.{key}" not in stored:
            missing.append(key)
    return [k for k in missing if not k.endswith("position_ids")]


def _checkpoint_keys(path: str) -> set[str] | None:
    """Tensor names of a local HF checkpoint folder (safetensors, sharded or not, or a PyTorch .bin)."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return set(json.load(f)["weight_map"])
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        from safetensors import safe_open

        with safe_open(single, "pt") as f:
            return set(f.keys())
    binary = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(binary):
        return set(torch.load(binary, map_location="meta", weights_only=True, mmap=True))
    return None


def uses_segment_embeddings(config_or_path: Any) -> bool:
    """Whether a model has trained segment (token type) embeddings: ``type_vocab_size > 1`` in its config (BERT,
    ALBERT, ELECTRA); False for RoBERTa-like models (1), DeBERTa-v3 (0), DistilBERT (none)."""
    config = config_or_path
    if isinstance(config_or_path, str):
        path = os.path.join(config_or_path, "config.json")
        if not os.path.isfile(path):
            return False
        with open(path) as f:
            config = json.load(f)
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    return int(get("type_vocab_size", 0) or 0) > 1


class CrossEncoderTokenizer:
    """The pair tokenizer of a cross-encoder, usable without the model (Ray Data's CPU tokenising tasks).

    ``tokenize_unpadded`` cuts the query to ``query_max_length`` and the passage to ``passage_max_length``
    tokens and joins them with the model's special tokens; ``collate`` pads a batch."""

    def __init__(
        self,
        tokenizer: Any,
        query_max_length: int = DEFAULT_QUERY_MAX_LENGTH,
        passage_max_length: int = DEFAULT_PASSAGE_MAX_LENGTH,
        segment_ids: bool | None = None,
    ):
        if query_max_length < 1 or passage_max_length < 1:
            raise ValueError(
                f"query_max_length and passage_max_length must be >= 1, got {query_max_length}, {passage_max_length}"
            )
        self.tokenizer = tokenizer
        self.query_max_length = int(query_max_length)
        self.passage_max_length = int(passage_max_length)
        # segment ids: when the model has segment embeddings (``segment_ids``, from its config), else when the
        # tokenizer names them (transformers 5's ALBERT tokenizer no longer does; ALBERT models still use them)
        self.emits_token_type_ids = bool(segment_ids) or "token_type_ids" in getattr(tokenizer, "model_input_names", [])
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._backend = None
        if backend is not None:
            from tokenizers import Tokenizer

            # a private copy without truncation/padding: we truncate query and passage separately
            self._backend = Tokenizer.from_str(backend.to_str())
            self._backend.no_truncation()
            self._backend.no_padding()

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, query_max_length: int | None = None, passage_max_length: int | None = None
    ) -> CrossEncoderTokenizer:
        from transformers import AutoTokenizer

        path = _check_path(name_or_path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load the tokenizer of cross-encoder {path!r}: {e}") from None
        qlen, plen = _max_lengths(path, query_max_length, passage_max_length)
        plen = _fit_positions(path, tokenizer, qlen, plen)
        return cls(tokenizer, qlen, plen, uses_segment_embeddings(path))

    def tokenize_unpadded(self, queries: Sequence[str], passages: Sequence[str]) -> dict[str, list[list[int]]]:
        """Ids of ``[CLS] q [SEP] p [SEP]`` per pair, query cut to ``query_max_length`` tokens and passage to
        ``passage_max_length``; no padding. Keys: ``input_ids`` and, if the model uses them,
        ``token_type_ids``."""
        if len(queries) != len(passages):
            raise ValueError(f"tokenize needs as many queries as passages, got {len(queries)} and {len(passages)}")
        queries, passages = [str(q) for q in queries], [str(p) for p in passages]
        if self._backend is not None:
            eq = self._backend.encode_batch(queries, add_special_tokens=False)
            ep = self._backend.encode_batch(passages, add_special_tokens=False)
            ids, types = [], []
            for q, p in zip(eq, ep):
                q.truncate(self.query_max_length)
                p.truncate(self.passage_max_length)
                enc = self._backend.post_process(q, p, add_special_tokens=True)
                ids.append(enc.ids)
                types.append(enc.type_ids)
        else:  # a slow (pure python) tokenizer: cut each side by tokens, then join through the tokenizer
            q_ids = [self.tokenizer.encode(q, add_special_tokens=False)[: self.query_max_length] for q in queries]
            p_ids = [self.tokenizer.encode(p, add_special_tokens=False)[: self.passage_max_length] for p in passages]
            enc = self.tokenizer(
                [self.tokenizer.decode(x) for x in q_ids], [self.tokenizer.decode(x) for x in p_ids],
                return_token_type_ids=True,
            )
            ids, types = enc["input_ids"], enc["token_type_ids"]
        out = {"input_ids": ids}
        if self.emits_token_type_ids:
            out["token_type_ids"] = types
        return out

    def collate(self, features: dict[str, Sequence[Sequence[int]]], pad_to_multiple_of: int = 8) -> dict[str, torch.Tensor]:
        """Pad a batch of :meth:`tokenize_unpadded` output to its longest sequence (rounded up to a multiple of
        ``pad_to_multiple_of``) and add the attention mask."""
        from raykd.batching import collate

        return collate(features["input_ids"], features.get("token_type_ids"), self.tokenizer.pad_token_id or 0,
                       pad_to_multiple_of)

    def tokenize(self, queries: Sequence[str], passages: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.collate(self.tokenize_unpadded(queries, passages))



class CrossEncoder(RankingModel):
    """BERT_CAT: one relevance score per (query, passage) from a joint encoding.

    Example::

        model = CrossEncoder.from_pretrained("path/or/hub-name", query_max_length=30, passage_max_length=200)
        scores = model.score(["what is ray"], ["Ray is a framework ..."])   # tensor of shape (1,)
    """

    name = "bert_cat"

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        query_max_length: int = DEFAULT_QUERY_MAX_LENGTH,
        passage_max_length: int = DEFAULT_PASSAGE_MAX_LENGTH,
    ):
        super().__init__()
        self.model = model
        self.pair_tokenizer = CrossEncoderTokenizer(tokenizer, query_max_length, passage_max_length,
                                                    uses_segment_embeddings(model.config))
        self.num_labels = int(getattr(model.config, "num_labels", 1))
        if self.num_labels not in (1, 2):
            raise UserError(
                f"cross-encoder has {self.num_labels} labels; expected 1 (a score) or 2 (relevant-class logit)"
            )
        # DistilBERT-like models have no segment embeddings even when their tokenizer emits segment ids
        self.uses_token_type_ids = "token_type_ids" in inspect.signature(model.forward).parameters

    @property
    def tokenizer(self) -> Any:
        return self.pair_tokenizer.tokenizer

    @property
    def query_max_length(self) -> int:
        return self.pair_tokenizer.query_max_length

    @property
    def passage_max_length(self) -> int:
        return self.pair_tokenizer.passage_max_length

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        query_max_length: int | None = None,
        passage_max_length: int | None = None,
        attn_implementation: str = "sdpa",
        require_head: bool = False,
        **model_kwargs: Any,
    ) -> CrossEncoder:
        """Load a cross-encoder from a local HF folder or a hub name.

        Max lengths: the arguments if given, else the ones saved with the checkpoint, else 30 / 200. A local
        path that does not exist raises :class:`UserError` naming it. A checkpoint without a trained scoring
        head gets a fresh one (a student's start); ``require_head=True`` (a teacher) refuses it instead."""
        from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

        path = _check_path(name_or_path)
        try:
            config = AutoConfig.from_pretrained(path)
            archs = getattr(config, "architectures", None) or []
            if not any(a.endswith("ForSequenceClassification") for a in archs):
                config.num_labels = 1  # no head yet: BERT_CAT's single-logit linear layer on CLS
            try:
                model, info = AutoModelForSequenceClassification.from_pretrained(
                    path, config=config, attn_implementation=attn_implementation, output_loading_info=True,
                    **model_kwargs
                )
            except ValueError as e:  # an architecture without SDPA (DeBERTa-v2/v3): its default attention
                if "scaled_dot_product_attention" not in str(e):
                    raise
                model, info = AutoModelForSequenceClassification.from_pretrained(
                    path, config=config, output_loading_info=True, **model_kwargs
                )
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise UserError(
                f"cannot load cross-encoder {path!r}: not a local model folder and not loadable from the "
                f"Hugging Face hub (offline? misspelt?): {e}"
            ) from None
        if require_head and info.get("missing_keys"):
            raise UserError(no_head_message(name_or_path, sorted(info["missing_keys"])))
        qlen, plen = _max_lengths(path, query_max_length, passage_max_length)
        plen = _fit_positions(path, tokenizer, qlen, plen)
        out = cls(model, tokenizer, query_max_length=qlen, passage_max_length=plen)
        out.eval()
        return out

    def save_pretrained(self, out_dir: str) -> None:
        """Write an HF folder (``AutoModelForSequenceClassification`` + tokenizer) plus the max lengths."""
        os.makedirs(out_dir, exist_ok=True)
        self.model.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)
        with open(os.path.join(out_dir, RAYKD_CONFIG), "w") as f:
            json.dump(
                {"model": self.name, "query_max_length": self.query_max_length,
                 "passage_max_length": self.passage_max_length},
                f,
                indent=2,
            )

    # ------------------------------------------------------------------------------------------ tokenising
    def tokenize_unpadded(self, queries: Sequence[str], passages: Sequence[str]) -> dict[str, list[list[int]]]:
        """See :meth:`CrossEncoderTokenizer.tokenize_unpadded`."""
        return self.pair_tokenizer.tokenize_unpadded(queries, passages)

    def collate(self, features: dict[str, Sequence[Sequence[int]]], pad_to_multiple_of: int = 8) -> dict[str, torch.Tensor]:
        """See :meth:`CrossEncoderTokenizer.collate`."""
        return self.pair_tokenizer.collate(features, pad_to_multiple_of)

    def tokenize(self, queries: Sequence[str], passages: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.pair_tokenizer.collate(self.pair_tokenizer.tokenize_unpadded(queries, passages))

    # ------------------------------------------------------------------------------------------ scoring
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scores of shape (B,), float32. bf16 autocast when the model is on a CUDA device."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None and self.uses_token_type_ids:
            kwargs["token_type_ids"] = token_type_ids
        if input_ids.is_cuda:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits = self.model(**kwargs).logits
        else:
            logits = self.model(**kwargs).logits
        score = logits[:, 1] if self.num_labels == 2 else logits[:, 0]
        return score.float()
