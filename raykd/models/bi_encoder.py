"""BERT_DOT: one shared transformer encodes the query and the passage separately; the score is the dot product
of their pooled vectors (CLS vector, or the mean of the token vectors for TCT's student).

    s(q, p) = pool(BERT(q)) · pool(BERT(p))

Saved in Hugging Face format: the folder is a plain ``AutoModel`` + ``AutoTokenizer`` (the encoder, without
pooler), plus ``raykd_model.json`` saying ``{"kind": "bert_dot", "pooling": "cls"|"mean", "normalize": ...,
"query_max_length": ..., "passage_max_length": ...}``, so the index stage and any user can encode with it.
"""

from __future__ import annotations

import torch

from raykd.models.base import EncoderFolder, RankingModel, group_size

POOLINGS = ("cls", "mean")


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str, skip: int = 0) -> torch.Tensor:
    """One vector per text from the encoder's last hidden states (N, L, H), in float32 whatever the encoder ran
    in: the CLS vector (position 0), or the mean of the attended token vectors from position ``skip`` on.
    The one pooling definition of raykd: training, validation, index and search all pool here."""
    hidden = hidden.float()
    if pooling == "cls":
        return hidden[:, 0]
    if pooling != "mean":
        raise ValueError(f"unknown pooling {pooling!r}; expected one of {', '.join(POOLINGS)}")
    m = attention_mask[:, skip:].unsqueeze(-1).to(hidden.dtype)
    return (hidden[:, skip:] * m).sum(1) / m.sum(1).clamp(min=1.0)


class DualEncoder(RankingModel):
    """What BERT_DOT and ColBERT share: one encoder and tokenizer, separate query and passage inputs.

    ``tokenize(queries, passages)`` returns ``query_*`` and ``passage_*`` tensors; ``forward`` scores them.
    ``len(passages)`` may be ``k * len(queries)`` (passages of query i at rows ``i*k .. i*k+k-1``): each query is
    then encoded once, which is how a triple batch is scored in one pass (see ``interleave_triples``).
    ``forward(..., all_pairs=True)`` scores every query against every passage of the batch (shape (Q, P)), and
    ``return_embeddings=True`` returns the encodings themselves: the hooks in-batch losses (TCT) use."""

    name = "dual_encoder"
    grouped_passages = True

    def __init__(self, encoder, tokenizer, query_max_length: int = 32, passage_max_length: int = 180):
        super().__init__()
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.query_max_length = int(query_max_length)
        self.passage_max_length = int(passage_max_length)

    # -- tokenisation (CPU, in the collate step) --------------------------------------------------------
    def _tok(self, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt",
            return_token_type_ids=False,
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def tokenize_queries(self, queries: list[str]) -> dict[str, torch.Tensor]:
        """``input_ids`` / ``attention_mask`` of the queries (what :meth:`embed` takes)."""
        return self._tok(queries, self.query_max_length)

    def tokenize_passages(self, passages: list[str]) -> dict[str, torch.Tensor]:
        return self._tok(passages, self.passage_max_length)

    def tokenize(self, queries: list[str], passages: list[str]) -> dict[str, torch.Tensor]:
        group_size(len(queries), len(passages))
        q = self.tokenize_queries(queries)
        p = self.tokenize_passages(passages)
        return {
            "query_input_ids": q["input_ids"],
            "query_attention_mask": q["attention_mask"],
            "passage_input_ids": p["input_ids"],
            "passage_attention_mask": p["attention_mask"],
        }

    # -- encoding -------------------------------------------------------------------------------------------
    def token_vectors(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def similarity(self, q: torch.Tensor, q_mask: torch.Tensor, p: torch.Tensor, p_mask: torch.Tensor,
                   all_pairs: bool) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self,
        query_input_ids: torch.Tensor,
        query_attention_mask: torch.Tensor,
        passage_input_ids: torch.Tensor,
        passage_attention_mask: torch.Tensor,
        all_pairs: bool = False,
        return_embeddings: bool = False,
    ):
        q = self.embed(query_input_ids, query_attention_mask)
        p = self.embed(passage_input_ids, passage_attention_mask)
        if return_embeddings:
            return q, p
        q_mask, p_mask = query_attention_mask, passage_attention_mask
        if not all_pairs:
            k = group_size(q.shape[0], p.shape[0])
            if k > 1:
                q, q_mask = q.repeat_interleave(k, 0), q_mask.repeat_interleave(k, 0)
        return self.similarity(q, q_mask, p, p_mask, all_pairs)

    @torch.no_grad()
    def encode_query(self, queries: list[str]) -> torch.Tensor:
        return self._encode(self.tokenize_queries(queries))

    @torch.no_grad()
    def encode_passage(self, passages: list[str]) -> torch.Tensor:
        return self._encode(self.tokenize_passages(passages))

    def _encode(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        device = next(self.parameters()).device
        return self.embed(t["input_ids"].to(device), t["attention_mask"].to(device))


class BertDot(EncoderFolder, DualEncoder):
    """BERT_DOT (Hofstätter et al. 2020, Sec. 3): ``s(q, p) = pool(q) · pool(p)`` with a shared encoder.

    ``pooling``: ``cls`` (the paper's BERT_DOT) or ``mean`` over non-padding tokens (TCT-ColBERT's student;
    set ``pool_skip`` to skip leading marker tokens, e.g. 4 for TCT's ``[CLS] [Q] ...`` format).
    ``normalize``: L2-normalise the vectors (cosine similarity)."""

    name = "bert_dot"
    #: the constructor options ``raykd_model.json`` records
    OPTIONS = ("pooling", "normalize", "pool_skip", "query_max_length", "passage_max_length")

    def __init__(self, encoder, tokenizer, pooling: str = "cls", normalize: bool = False, pool_skip: int = 0,
                 query_max_length: int = 32, passage_max_length: int = 180):
        super().__init__(encoder, tokenizer, query_max_length, passage_max_length)
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; expected one of {', '.join(POOLINGS)}")
        self.pooling = pooling
        self.normalize = bool(normalize)
        self.pool_skip = int(pool_skip)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """One float32 vector per text (what training, validation and ``raykd index`` all compute)."""
        v = pool(self.token_vectors(input_ids, attention_mask), attention_mask, self.pooling, self.pool_skip)
        if self.normalize:
            v = torch.nn.functional.normalize(v, dim=-1)
        return v

    def similarity(self, q, q_mask, p, p_mask, all_pairs):
        return q @ p.T if all_pairs else (q * p).sum(-1)
