"""ColBERT (Khattab & Zaharia 2020) as the Margin-MSE paper's student: every token of q and p through a shared
encoder, a linear layer down to ``dim`` (128), L2-normalised; the score is MaxSim summed over query tokens

    s(q, p) = Σ_{i ∈ q, not padding}  max_{j ∈ p, not padding}  E_q[i] · E_p[j]

Padding tokens of q contribute nothing and padding tokens of p are never the max. (Simplification: no query
augmentation with [MASK] tokens and no punctuation filter.)

Saved as: the encoder in HF format + tokenizer, ``colbert_linear.safetensors`` (the projection) and
``raykd_model.json`` (``{"kind": "colbert", "dim": 128, ...}``).
"""

from __future__ import annotations

import torch

from raykd.models.base import EncoderFolder
from raykd.models.bi_encoder import DualEncoder

LINEAR_FILE = "colbert_linear.safetensors"


class ColBERT(EncoderFolder, DualEncoder):
    name = "colbert"
    OPTIONS = ("dim", "query_max_length", "passage_max_length")
    HEAD_ATTR, HEAD_FILE = "linear", LINEAR_FILE

    def __init__(self, encoder, tokenizer, dim: int = 128, query_max_length: int = 32, passage_max_length: int = 180):
        super().__init__(encoder, tokenizer, query_max_length, passage_max_length)
        self.dim = int(dim)
        self.linear = torch.nn.Linear(encoder.config.hidden_size, self.dim, bias=False)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token vectors (N, L, dim), L2-normalised, zero at padding positions."""
        v = torch.nn.functional.normalize(self.linear(self.token_vectors(input_ids, attention_mask)), dim=-1)
        return v * attention_mask.unsqueeze(-1).to(v.dtype)

    def similarity(self, q, q_mask, p, p_mask, all_pairs):
        p_pad = (p_mask == 0)
        if all_pairs:  # (Q, P, Lq, Lp)
            sim = torch.einsum("qid,pjd->qpij", q, p)
            sim = sim.masked_fill(p_pad[None, :, None, :], float("-inf"))
            best = sim.max(-1).values * q_mask[:, None, :].to(sim.dtype)
            return best.sum(-1)
        sim = torch.einsum("nid,njd->nij", q, p).masked_fill(p_pad[:, None, :], float("-inf"))
        return (sim.max(-1).values * q_mask.to(sim.dtype)).sum(-1)
