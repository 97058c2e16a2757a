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
