"""The Margin-MSE paper's released checkpoints (neural-ranking-kd, Hofstätter et al. 2020), loaded from their
folders without their custom code, scoring as their published model code defines.

The released folders (``sebastian-hofstaetter/distilbert-cat-margin_mse-T2-msmarco``,
``colbert-distilbert-margin_mse-T2-msmarco``, ``prettr-distilbert-split_at_3-margin_mse-T2-msmarco``) hold a
``config.json`` and the weights of custom ``PreTrainedModel`` classes that ``transformers`` cannot build by
itself. Their layouts, and the formula each one scores with (read from matchmaker's ``models/bert_cat.py``,
``models/colbert.py``, ``models/prettr.py`` and the repository's usage notebooks; the code here is raykd's own):

``BERT_Cat`` (config ``model_type: "BERT_Cat"``, ``bert_model``: the base model's name)
    weights ``bert_model.*`` (the base encoder) + ``_classification_layer.{weight,bias}`` (Linear(hidden, 1)).
    ``s(q, p) = w · v + b`` with v the base model's CLS vector of ``[CLS] q [SEP] p [SEP]`` for DistilBERT and
    ELECTRA, else its pooler output (the tanh dense layer on CLS): the model code takes ``[0][:, 0]`` for those
    two and the pooled output for every other base model.
``ColBERT`` (config ``model_type: "ColBERT"``, ``bert_model``, ``compression_dim``)
    weights ``bert_model.*`` + ``compressor.{weight,bias}`` (Linear(hidden, compression_dim)).
    ``E = compressor(encoder(x))`` (no normalisation: the released model scores with dot products);
    ``s(q, p) = Σ_{i ∈ q} max_{j ∈ p} E_q[i] · E_p[j]`` over non-padding tokens.
``PreTTR`` (a DistilBERT config, ``architectures: ["PreTTR"]``, ``join_layer_idx``, default 3)
    weights of a DistilBERT model (``embeddings.*``, ``transformer.layer.*``) + ``_classification_layer.weight``
    (Linear(dim, 1), no bias). The query ``[CLS] q [SEP]`` and the passage ``p [SEP]`` (its ``[CLS]`` dropped)
    run through layers ``1..join_layer_idx`` alone, then joined through the rest; ``s = w · h[CLS]``. The
    passage's position ids continue after the query's (offset = the query's length).

Queries of ColBERT and PreTTR are augmented with 8 ``[MASK]`` tokens after ``[SEP]``, as the released
checkpoints were trained and as their usage notebooks feed them (``query_augment_masks``; 0 turns it off).

PreTTR's position offset: the published code offsets the passage by the query's *padded* width in the batch,
so its scores depend on which queries share a batch. raykd uses each pair's own query length: the published
code's score for that pair in a batch of one (or of queries of one length), independent of batching.

The base model (tokenizer, and for BERT_Cat/ColBERT the encoder's config) comes from the folder when it holds
tokenizer files and an ``encoder_config.json``; otherwise from ``bert_model`` in ``config.json`` (a hub name
such as ``distilbert-base-uncased``, which must then be in the local Hugging Face cache when offline, or a
local path; a relative path is taken relative to the folder).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import torch

from raykd.errors import UserError

LAYOUTS = ("bert_cat", "colbert", "prettr")
ENCODER_CONFIG = "encoder_config.json"  # optional: the base encoder's config beside the released weights
DEFAULT_QUERY_MASKS = 8
DEFAULT_JOIN_LAYER = 3
#: each layout's scoring head: the weights a teacher must have
HEADS = {"bert_cat": ["_classification_layer.weight", "_classification_layer.bias"],
         "colbert": ["compressor.weight", "compressor.bias"], "prettr": ["_classification_layer.weight"]}


def _read_config(path: str) -> dict:
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        return {}
    with open(cfg) as f:
        return json.load(f)


def released_layout(path: str) -> str | None:
    """``bert_cat``, ``colbert`` or ``prettr`` when the local folder ``path`` holds a released neural-ranking-kd
    checkpoint; None otherwise (a plain HF model, a raykd model, a hub name)."""
    if not os.path.isdir(str(path)):
        return None
    cfg = _read_config(path)
    model_type = str(cfg.get("model_type", "")).lower()
    archs = [str(a).lower() for a in cfg.get("architectures") or []]
    if model_type == "bert_cat" or "bert_cat" in archs:
        return "bert_cat"
    if model_type == "colbert" or "colbert" in archs:
        return "colbert"
    if "prettr" in archs or "join_layer_idx" in cfg:
        return "prettr"
    return None


def checkpoint_state(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a local checkpoint folder (``model.safetensors`` or ``pytorch_model.bin``)."""
    st = os.path.join(path, "model.safetensors")
    if os.path.isfile(st):
        from safetensors.torch import load_file

        return load_file(st)
    binary = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(binary):
        return torch.load(binary, map_location="cpu", weights_only=True)
    raise UserError(f"{path}: no model.safetensors or pytorch_model.bin: not a released checkpoint folder")


def _base_model_ref(path: str, cfg: dict) -> str:
    ref = str(cfg.get("bert_model") or "distilbert-base-uncased")
    local = os.path.join(path, ref)
    return local if not os.path.isabs(ref) and os.path.exists(local) else ref


def _tokenizer(path: str, cfg: dict):
    from transformers import AutoTokenizer

    has_own = any(os.path.isfile(os.path.join(path, f)) for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"))
    src = path if has_own else _base_model_ref(path, cfg)
    try:
        return AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise UserError(f"released checkpoint {path}: cannot load its tokenizer from {src!r} (offline? put the "
                        f"tokenizer files in the folder): {e}") from None


def _encoder_config(path: str, cfg: dict):
    from transformers import AutoConfig

    own = os.path.join(path, ENCODER_CONFIG)
    try:
        if os.path.isfile(own):
            with open(own) as f:
                d = json.load(f)
            return AutoConfig.for_model(d.pop("model_type"), **d)
        return AutoConfig.from_pretrained(_base_model_ref(path, cfg))
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"released checkpoint {path}: cannot read the base encoder's config (bert_model="
                        f"{cfg.get('bert_model')!r}; offline? add {ENCODER_CONFIG}): {e}") from None


def _load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], path: str, require_head: bool,
               head_keys: Sequence[str]) -> None:
    """Load ``state`` into ``module``; weights it lacks are refused when they are the scoring head of a teacher
    (``require_head``) or the encoder itself (always)."""
    expected = {k for k in module.state_dict() if not k.endswith("position_ids")}
    missing = sorted(expected - set(state))
    head_missing = [k for k in missing if k in head_keys]
    other_missing = [k for k in missing if k not in head_keys]
    if other_missing:
        shown = ", ".join(other_missing[:6]) + (f" and {len(other_missing) - 6} more" if len(other_missing) > 6 else "")
        raise UserError(f"released checkpoint {path}: its weights lack {shown}: not the layout its config.json names")
    if require_head and head_missing:
        raise UserError(f"teacher {path} has no trained scoring head: its weights lack {', '.join(head_missing)}. "
                        f"A teacher's scores would come from a random layer")
    module.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)


class _ReleasedBase(torch.nn.Module):
    def __init__(self, tokenizer: Any, query_max_length: int, passage_max_length: int,
                 query_augment_masks: int = DEFAULT_QUERY_MASKS):
        super().__init__()
        self.tokenizer = tokenizer
        self.query_max_length = int(query_max_length)
        self.passage_max_length = int(passage_max_length)
        self.query_augment_masks = int(query_augment_masks)

    def tokenize_unpadded(self, queries: Sequence[str], passages: Sequence[str]) -> dict[str, list[list[int]]]:
        """``query_input_ids``: ``[CLS] q [SEP]`` (q cut to ``query_max_length`` tokens) + the ``[MASK]``
        augmentation; ``passage_input_ids``: ``[CLS] p [SEP]`` (p cut to ``passage_max_length`` tokens)."""
        if len(queries) != len(passages):
            raise ValueError(f"tokenize needs as many queries as passages, got {len(queries)} and {len(passages)}")
        tok = self.tokenizer
        q = tok([str(x) for x in queries], truncation=True, max_length=self.query_max_length + 2)["input_ids"]
        p = tok([str(x) for x in passages], truncation=True, max_length=self.passage_max_length + 2)["input_ids"]
        masks = [tok.mask_token_id] * self.query_augment_masks
        return {"query_input_ids": [list(x) + masks for x in q], "passage_input_ids": [list(x) for x in p]}


class ReleasedBertCat(_ReleasedBase):
    """A released ``BERT_Cat`` checkpoint. ``forward(input_ids, attention_mask[, token_type_ids])`` -> (B,)."""

    layout = "bert_cat"

    def __init__(self, encoder: torch.nn.Module, tokenizer: Any, query_max_length: int, passage_max_length: int):
        super().__init__(tokenizer, query_max_length, passage_max_length, 0)
        from raykd.models.cross_encoder import CrossEncoderTokenizer, uses_segment_embeddings

        self.bert_model = encoder
        self._classification_layer = torch.nn.Linear(encoder.config.hidden_size, 1)
        self.pair_tokenizer = CrossEncoderTokenizer(tokenizer, query_max_length, passage_max_length,
                                                    uses_segment_embeddings(encoder.config))
        # the model code's rule: CLS of the last layer for DistilBERT and ELECTRA, the pooler output otherwise
        self.cls_vector = encoder.base_model_prefix in ("distilbert", "electra")
        import inspect

        self.uses_token_type_ids = "token_type_ids" in inspect.signature(encoder.forward).parameters

    def tokenize_unpadded(self, queries: Sequence[str], passages: Sequence[str]) -> dict[str, list[list[int]]]:
        return self.pair_tokenizer.tokenize_unpadded(queries, passages)

    def forward(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        kw = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None and self.uses_token_type_ids:
            kw["token_type_ids"] = token_type_ids
        out = self.bert_model(**kw)
        v = out.last_hidden_state[:, 0] if self.cls_vector else out.pooler_output
        return self._classification_layer(v).squeeze(-1).float()


class ReleasedColBERT(_ReleasedBase):
    """A released ``ColBERT`` checkpoint: dot-product MaxSim over ``compressor`` vectors (no normalisation)."""

    layout = "colbert"

    def __init__(self, encoder: torch.nn.Module, tokenizer: Any, compression_dim: int, query_max_length: int,
                 passage_max_length: int, query_augment_masks: int = DEFAULT_QUERY_MASKS):
        super().__init__(tokenizer, query_max_length, passage_max_length, query_augment_masks)
        self.bert_model = encoder
        self.compressor = torch.nn.Linear(encoder.config.hidden_size, int(compression_dim))

    def vectors(self, input_ids, attention_mask) -> torch.Tensor:
        return self.compressor(self.bert_model(input_ids=input_ids, attention_mask=attention_mask)[0])

    def forward(self, query_input_ids, query_attention_mask, passage_input_ids, passage_attention_mask) -> torch.Tensor:
        q = self.vectors(query_input_ids, query_attention_mask).float()
        p = self.vectors(passage_input_ids, passage_attention_mask).float()
        sim = torch.bmm(q, p.transpose(1, 2)).masked_fill(passage_attention_mask[:, None, :] == 0, float("-inf"))
        best = sim.max(-1).values.masked_fill(query_attention_mask == 0, 0.0)
        return best.sum(-1)


class ReleasedPreTTR(_ReleasedBase):
    """A released ``PreTTR`` checkpoint (DistilBERT split at ``join_layer_idx``)."""

    layout = "prettr"

    def __init__(self, encoder: torch.nn.Module, tokenizer: Any, join_layer_idx: int, query_max_length: int,
                 passage_max_length: int, query_augment_masks: int = DEFAULT_QUERY_MASKS):
        super().__init__(tokenizer, query_max_length, passage_max_length, query_augment_masks)
        n = len(encoder.transformer.layer)
        if not 0 <= int(join_layer_idx) <= n:
            raise UserError(f"PreTTR join_layer_idx {join_layer_idx} is outside 0..{n}")
        self.encoder = encoder
        self.join_layer_idx = int(join_layer_idx)
        self._classification_layer = torch.nn.Linear(encoder.config.dim, 1, bias=False)

    def _embed(self, input_ids: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :] + offset[:, None]
        pos = pos.clamp(max=self.encoder.config.max_position_embeddings - 1)  # only padding can run past
        return self.encoder.embeddings(input_ids, position_ids=pos)

    def _run(self, h: torch.Tensor, mask: torch.Tensor, layers) -> torch.Tensor:
        from raykd.models.prettr import run_layers

        return run_layers(self.encoder.config, h, mask, layers)

    def forward(self, query_input_ids, query_attention_mask, passage_input_ids, passage_attention_mask) -> torch.Tensor:
        layers = self.encoder.transformer.layer
        d_ids, d_mask = passage_input_ids[:, 1:], passage_attention_mask[:, 1:]  # the passage's [CLS] dropped
        q_len = query_attention_mask.sum(1)
        hq = self._run(self._embed(query_input_ids, torch.zeros_like(q_len)), query_attention_mask,
                       layers[: self.join_layer_idx])
        hd = self._run(self._embed(d_ids, q_len), d_mask, layers[: self.join_layer_idx])
        h = self._run(torch.cat([hq, hd], 1), torch.cat([query_attention_mask, d_mask], 1), layers[self.join_layer_idx :])
        return self._classification_layer(h[:, 0]).squeeze(-1).float()


def load_released(path: str, query_max_length: int | None = None, passage_max_length: int | None = None,
                  require_head: bool = True, query_augment_masks: int | None = None) -> _ReleasedBase:
    """The released checkpoint in the local folder ``path`` as a raykd module (eval mode). Max lengths default
    to the paper's 30 / 200. ``require_head``: refuse a checkpoint whose scoring layer is missing (a teacher)."""
    from transformers import AutoModel, DistilBertConfig, DistilBertModel

    layout = released_layout(path)
    if layout is None:
        raise UserError(f"{path}: not a released neural-ranking-kd checkpoint (config.json names none of "
                        f"BERT_Cat, ColBERT, PreTTR)")
    cfg = _read_config(path)
    qlen, plen = int(query_max_length or 30), int(passage_max_length or 200)
    masks = DEFAULT_QUERY_MASKS if query_augment_masks is None else int(query_augment_masks)
    tokenizer = _tokenizer(path, cfg)
    state = checkpoint_state(path)
    if layout == "prettr":
        fields = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "join_layer_idx")}
        model = ReleasedPreTTR(DistilBertModel(DistilBertConfig(**fields)), tokenizer,
                               cfg.get("join_layer_idx", DEFAULT_JOIN_LAYER), qlen, plen, masks)
        state = {("encoder." + k if not k.startswith("_classification_layer") else k): v for k, v in state.items()}
        _load_into(model, state, path, require_head, HEADS["prettr"])
    else:
        encoder = AutoModel.from_config(_encoder_config(path, cfg))
        if layout == "bert_cat":
            model = ReleasedBertCat(encoder, tokenizer, qlen, plen)
        else:
            model = ReleasedColBERT(encoder, tokenizer, cfg.get("compression_dim", 768), qlen, plen, masks)
        head = HEADS[layout]
        state = dict(state)
        if not (layout == "bert_cat" and not model.cls_vector):
            # a pooler the model code never uses may be absent from the weights
            for k in [k for k in model.state_dict() if k.startswith("bert_model.pooler.")]:
                state.setdefault(k, model.state_dict()[k])
        _load_into(model, state, path, require_head, head)
    return model.eval()
