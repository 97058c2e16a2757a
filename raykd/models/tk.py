"""TK, the Transformer-Kernel ranker (Hofstätter, Zlabinger & Hanbury 2020, "Interpretable & Time-Budget-
Constrained Contextualization for Re-Ranking"): the Margin-MSE paper's non-BERT student.

1. word embeddings E (initialised from a hub/path model's input embeddings, and its WordPiece tokenizer);
2. contextualisation by a small transformer (``layers`` layers, sinusoidal positions), mixed with the raw
   embeddings by a learned scalar: ``ĥ = α·E + (1-α)·Transformer(E)``;
3. cosine match matrix ``M_ij = cos(ĥ_q_i, ĥ_p_j)``;
4. RBF kernels ``K_k(M_ij) = exp(-(M_ij - μ_k)² / (2σ²))`` with μ = 1, 0.9, 0.7, …, -0.9 and σ = 0.1;
5. log-sum pooling: per query term ``log(Σ_j K_k(M_ij))`` (padding masked; clamped at 1e-10, scaled 0.01 as
   in TK), summed over query terms, one value per kernel; likewise with the passage-length-normalised sum;
6. ``s = w_log · φ_log + w_len · φ_len`` (two learned linear layers over the kernels, mixed by a learned pair).

Saved as: tokenizer + ``tk.safetensors`` (all weights) + ``raykd_model.json`` (dimensions and kernels).
"""

from __future__ import annotations

import os

import torch

from raykd.models.base import RankingModel, group_size, read_raykd_config, write_raykd_config

WEIGHTS_FILE = "tk.safetensors"
DEFAULT_MUS = (1.0, 0.9, 0.7, 0.5, 0.3, 0.1, -0.1, -0.3, -0.5, -0.7, -0.9)


def _sinusoid(length: int, dim: int) -> torch.Tensor:
    pos = torch.arange(length, dtype=torch.float32)[:, None]
    i = torch.arange(0, dim, 2, dtype=torch.float32)
    angle = pos / torch.pow(10000.0, i / dim)
    pe = torch.zeros(length, dim)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle[:, : dim // 2])
    return pe


class TK(RankingModel):
    grouped_passages = True
    name = "tk"

    def __init__(self, tokenizer, vocab_size: int, embedding_dim: int, layers: int = 2, heads: int = 2,
                 ff_dim: int | None = None, mus: tuple[float, ...] = DEFAULT_MUS, sigma: float = 0.1,
                 query_max_length: int = 32, passage_max_length: int = 180, dropout: float = 0.0):
        super().__init__()
        if embedding_dim % heads:
            raise ValueError(f"TK: embedding dim {embedding_dim} is not divisible by heads={heads}")
        self.tokenizer = tokenizer
        self.vocab_size, self.embedding_dim, self.n_layers, self.heads = vocab_size, embedding_dim, layers, heads
        self.ff_dim = int(ff_dim or 2 * embedding_dim)
        self.mus, self.sigma = tuple(float(m) for m in mus), float(sigma)
        self.query_max_length, self.passage_max_length = int(query_max_length), int(passage_max_length)
        self.embeddings = torch.nn.Embedding(vocab_size, embedding_dim, padding_idx=tokenizer.pad_token_id)
        layer = torch.nn.TransformerEncoderLayer(embedding_dim, heads, self.ff_dim, dropout=dropout, batch_first=True)
        self.contextualizer = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.mixer = torch.nn.Parameter(torch.tensor(0.5))
        self.register_buffer("mu", torch.tensor(self.mus).view(1, 1, 1, -1), persistent=False)
        self.register_buffer("positions", _sinusoid(512, embedding_dim), persistent=False)
        n_k = len(self.mus)
        self.dense_log = torch.nn.Linear(n_k, 1, bias=False)
        self.dense_len = torch.nn.Linear(n_k, 1, bias=False)
        self.dense_comb = torch.nn.Linear(2, 1, bias=False)
        for lin in (self.dense_log, self.dense_len):
            torch.nn.init.uniform_(lin.weight, -0.014, 0.014)  # TK's initialisation
        torch.nn.init.constant_(self.dense_comb.weight, 0.5)

    # -- construction ------------------------------------------------------------------------------------
    @classmethod
    def from_init(cls, name_or_path: str, **kw) -> TK:
        """A new TK whose word embeddings (and tokenizer) come from a hub/path transformers model."""
        from transformers import AutoModel, AutoTokenizer

        src = AutoModel.from_pretrained(name_or_path)
        weights = src.get_input_embeddings().weight.detach().clone()
        model = cls(AutoTokenizer.from_pretrained(name_or_path), weights.shape[0], weights.shape[1], **kw)
        model.embeddings.weight.data.copy_(weights)
        return model

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kw) -> TK:
        saved = read_raykd_config(name_or_path)
        if not saved or saved.get("kind") != cls.name:
            return cls.from_init(name_or_path, **kw)
        from safetensors.torch import load_file
        from transformers import AutoTokenizer

        opts = {k: saved[k] for k in ("vocab_size", "embedding_dim", "layers", "heads", "ff_dim", "mus", "sigma",
                                      "query_max_length", "passage_max_length")}
        opts.update({k: v for k, v in kw.items() if v is not None})
        model = cls(AutoTokenizer.from_pretrained(name_or_path), **opts)
        model.load_state_dict(load_file(os.path.join(name_or_path, WEIGHTS_FILE)))
        return model

    def save_pretrained(self, out_dir: str) -> None:
        from safetensors.torch import save_file

        os.makedirs(out_dir, exist_ok=True)
        self.tokenizer.save_pretrained(out_dir)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  os.path.join(out_dir, WEIGHTS_FILE))
        write_raykd_config(out_dir, self.name, vocab_size=self.vocab_size, embedding_dim=self.embedding_dim,
                           layers=self.n_layers, heads=self.heads, ff_dim=self.ff_dim, mus=list(self.mus),
                           sigma=self.sigma, query_max_length=self.query_max_length,
                           passage_max_length=self.passage_max_length)

    # -- scoring -----------------------------------------------------------------------------------------
    def tokenize(self, queries: list[str], passages: list[str]) -> dict[str, torch.Tensor]:
        group_size(len(queries), len(passages))

        def tok(texts, n):
            t = self.tokenizer(list(texts), padding=True, truncation=True, max_length=n, add_special_tokens=False,
                               return_tensors="pt")
            return t["input_ids"], t["attention_mask"]

        qi, qm = tok(queries, self.query_max_length)
        pi, pm = tok(passages, self.passage_max_length)
        return {"query_input_ids": qi, "query_attention_mask": qm, "passage_input_ids": pi, "passage_attention_mask": pm}

    def contextualize(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        e = self.embeddings(input_ids)
        length = e.shape[1]
        if length > self.positions.shape[0]:
            raise ValueError(f"TK supports sequences up to {self.positions.shape[0]} tokens, got {length}")
        c = self.contextualizer(e + self.positions[:length].to(e.dtype), src_key_padding_mask=mask == 0)
        return (self.mixer * e + (1 - self.mixer) * c) * mask.unsqueeze(-1).to(e.dtype)

    def forward(self, query_input_ids, query_attention_mask, passage_input_ids, passage_attention_mask):
        q = self.contextualize(query_input_ids, query_attention_mask)
        p = self.contextualize(passage_input_ids, passage_attention_mask)
        k = group_size(q.shape[0], p.shape[0])
        qm, pm = query_attention_mask.to(q.dtype), passage_attention_mask.to(q.dtype)
        if k > 1:
            q, qm = q.repeat_interleave(k, 0), qm.repeat_interleave(k, 0)
        cos = torch.nn.functional.normalize(q, dim=-1, eps=1e-9) @ torch.nn.functional.normalize(p, dim=-1, eps=1e-9).transpose(1, 2)
        kern = torch.exp(-((cos.unsqueeze(-1) - self.mu) ** 2) / (2 * self.sigma**2))  # (N, Lq, Lp, K)
        kern = kern * pm[:, None, :, None]
        per_term = kern.sum(2)  # (N, Lq, K)
        log_pool = (torch.log(per_term.clamp(min=1e-10)) * 0.01 * qm.unsqueeze(-1)).sum(1)
        p_len = pm.sum(1).clamp(min=1.0).view(-1, 1, 1)
        len_pool = (torch.log((per_term / p_len).clamp(min=1e-10)) * 0.01 * qm.unsqueeze(-1)).sum(1)
        both = torch.cat([self.dense_log(log_pool), self.dense_len(len_pool)], -1)
        return self.dense_comb(both).squeeze(-1)

