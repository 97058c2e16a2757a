"""PreTTR (MacAvaney et al. 2020) as the Margin-MSE paper's student: the query ``[CLS] q [SEP]`` and the passage
``p [SEP]`` each run through the first ``split_layer`` transformer layers ALONE (so passage representations can
be precomputed at indexing time), then the two sequences are concatenated and run through the remaining layers
with full attention; a linear layer on the joined ``[CLS]`` gives the score.

    h_q = L_{1..k}(E(q)),  h_p = L_{1..k}(E(p)),  s(q, p) = w · L_{k+1..n}([h_q ; h_p])[CLS] + b

Token types: 0 for the query, 1 for the passage (BERT); positions restart at 0 in the passage (its lower
layers never see the query). Supports BERT- and DistilBERT-shaped encoders (a list of layers).

Saved as: encoder (HF) + tokenizer, ``prettr_head.safetensors``, ``raykd_model.json``
(``{"kind": "prettr", "split_layer": k, ...}``).
"""

from __future__ import annotations

import torch

from raykd.models.base import EncoderFolder, RankingModel, group_size

HEAD_FILE = "prettr_head.safetensors"


def _layers(encoder) -> torch.nn.ModuleList:
    if hasattr(encoder, "encoder") and hasattr(encoder.encoder, "layer"):
        return encoder.encoder.layer  # BERT, RoBERTa, ELECTRA, MiniLM
    if hasattr(encoder, "transformer") and hasattr(encoder.transformer, "layer"):
        return encoder.transformer.layer  # DistilBERT
    raise ValueError(
        f"PreTTR needs an encoder with a plain list of layers (BERT- or DistilBERT-shaped); "
        f"{type(encoder).__name__} has none (ALBERT shares its layers)"
    )


class PreTTR(EncoderFolder, RankingModel):
    grouped_passages = True
    name = "prettr"
    OPTIONS = ("split_layer", "query_max_length", "passage_max_length")
    HEAD_ATTR, HEAD_FILE = "head", HEAD_FILE

    def __init__(self, encoder, tokenizer, split_layer: int = 1, query_max_length: int = 32,
                 passage_max_length: int = 180):
        super().__init__()
        self.encoder = encoder
        self.tokenizer = tokenizer
        n = len(_layers(encoder))
        if not 0 < int(split_layer) < n:
            raise ValueError(f"split_layer must be between 1 and {n - 1} for this {n}-layer encoder, got {split_layer}")
        self.split_layer = int(split_layer)
        self.query_max_length = int(query_max_length)
        self.passage_max_length = int(passage_max_length)
        self.head = torch.nn.Linear(encoder.config.hidden_size, 1)
        self._token_types = "token_type_ids" in encoder.embeddings.forward.__code__.co_varnames

    def tokenize(self, queries: list[str], passages: list[str]) -> dict[str, torch.Tensor]:
        group_size(len(queries), len(passages))
        q = self.tokenizer(list(queries), padding=True, truncation=True, max_length=self.query_max_length,
                           return_tensors="pt")
        p = self.tokenizer(list(passages), padding=True, truncation=True, max_length=self.passage_max_length + 1,
                           return_tensors="pt")
        # right padding: column 0 is the passage's own [CLS]; the joined sequence keeps only the query's
        return {
            "query_input_ids": q["input_ids"],
            "query_attention_mask": q["attention_mask"],
            "passage_input_ids": p["input_ids"][:, 1:].contiguous(),
            "passage_attention_mask": p["attention_mask"][:, 1:].contiguous(),
        }

    def _embed(self, input_ids: torch.Tensor, token_type: int) -> torch.Tensor:
        if self._token_types:
            return self.encoder.embeddings(input_ids=input_ids, token_type_ids=torch.full_like(input_ids, token_type))
        return self.encoder.embeddings(input_ids)

    def _run(self, h: torch.Tensor, mask: torch.Tensor, layers) -> torch.Tensor:
        return run_layers(self.encoder.config, h, mask, layers)

    def encode_passage_lower(self, passage_input_ids: torch.Tensor, passage_attention_mask: torch.Tensor) -> torch.Tensor:
        """The passage through the first ``split_layer`` layers alone: what PreTTR precomputes and stores."""
        return self._run(self._embed(passage_input_ids, 1), passage_attention_mask, _layers(self.encoder)[: self.split_layer])

    def forward(self, query_input_ids, query_attention_mask, passage_input_ids, passage_attention_mask):
        layers = _layers(self.encoder)
        hq = self._run(self._embed(query_input_ids, 0), query_attention_mask, layers[: self.split_layer])
        hp = self.encode_passage_lower(passage_input_ids, passage_attention_mask)
        k = group_size(hq.shape[0], hp.shape[0])
        q_mask = query_attention_mask
        if k > 1:
            hq, q_mask = hq.repeat_interleave(k, 0), q_mask.repeat_interleave(k, 0)
        h = self._run(torch.cat([hq, hp], 1), torch.cat([q_mask, passage_attention_mask], 1), layers[self.split_layer :])
        return self.head(h[:, 0]).squeeze(-1)


def run_layers(config, h: torch.Tensor, mask: torch.Tensor, layers) -> torch.Tensor:
    """Hidden states ``h`` through a slice of an encoder's ``layers`` (PreTTR's split: the lower layers on the
    passage alone, the upper ones on query + passage), with the encoder's own bidirectional attention mask."""
    from transformers.masking_utils import create_bidirectional_mask

    attn = create_bidirectional_mask(config=config, inputs_embeds=h, attention_mask=mask)
    for layer in layers:
        h = layer(h, attn)
        h = h[0] if isinstance(h, tuple) else h
    return h
