"""GPU figures of raykd's hot paths, in one short run without Ray (issue 18).

    python bench/gpu.py                                  # on a CUDA machine: bf16, SDPA, real model sizes
    python bench/gpu.py --device cpu --tiny              # the same code paths on a CPU in < 2 minutes
    python bench/gpu.py --only peak,score --out f.json   # a subset

Sections (``--only``):

- ``peak``: an 8192^3 bf16 matmul (CPU: 1024^3 float32): the measured peak that every fraction refers to.
- ``score``: the teacher forward exactly as the score stage's actor runs it (:func:`raykd.batching.score_block`:
  length-sorted blocks of ``--bucket-pairs``, micro-batches padded to a multiple of 8, bf16 autocast) for
  BERT-Base, BERT-Large and ALBERT-Large shaped BERT_CAT (:class:`raykd.models.cross_encoder.CrossEncoder`
  with random weights), with and without length bucketing, at ``--batch-sizes``: pairs/s, TFLOP/s on the
  real (unpadded) tokens, fraction of the measured peak.
- ``train``: one Margin-MSE training step (bf16 autocast, AdamW, gradient clipping, as the train loop) of
  BERT_DOT, ColBERT, PreTTR and TK on a DistilBERT-sized encoder, and TCT (student + frozen ColBERT teacher,
  in-batch KL): triples/s and fraction of peak (forward + backward = 3x forward FLOPs, real tokens).
- ``encode``: passages through a DistilBERT-sized BERT_DOT's ``embed`` (<= 200 tokens, length-sorted): passages/s.
- ``search``: brute-force top-k of 6,980 queries against 8.8M 768-dim vectors (synthetic; fp16 matmul + top-k
  in torch, in chunks), and the same with Faiss when it is importable: seconds.
- ``profile``: torch.profiler's top kernels of one scoring block (BERT-Base) and one BERT_DOT step.

Inputs are synthetic token ids with MS MARCO's WordPiece lengths (queries ~9.5 tokens, 4-30; passages ~76,
20-200; a pair capped at 30 + 200 as the score stage cuts it): nothing is downloaded. Prints a table per
section, writes every figure with its settings to one JSON file, and ends with
``gpu: score_frac_peak=X train_frac_peak=Y search_s=Z``. Imports raykd's Ray-free modules only (batching,
models, losses): no Ray, no storage, no stages.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from raykd.batching import Ragged, batch_order, pad_rows, score_block  # noqa: E402

SECTIONS = ("peak", "score", "train", "encode", "search", "profile")
DEV_QUERIES, MSMARCO_PASSAGES = 6_980, 8_841_823
SPEC_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1}  # dense, the data sheets
UNIQUE_PAIRS_T2 = 40_200_000  # unique (query, passage) pairs of MS MARCO's 39.8M training triples


# ---------------------------------------------------------------------------------------------------------
# settings


@dataclass
class Sizes:
    """Model and workload sizes: the real ones (GPU) or tiny ones (``--tiny``)."""

    teachers: dict  # name -> (arch, hidden, layers, heads, intermediate, embedding)
    student: tuple  # (hidden, layers, heads, intermediate)
    tk_layers: int
    peak_n: int
    score_pairs: int
    bucket_pairs: int
    batch_sizes: tuple
    train_batch: int
    train_steps: int
    encode_passages: int
    encode_batch: int
    search_queries: int
    search_vectors: int
    search_dim: int
    search_chunk: int
    search_k: int
    search_query_batch: int


REAL = Sizes(
    teachers={"bert-base": ("bert", 768, 12, 12, 3072, 768), "bert-large": ("bert", 1024, 24, 16, 4096, 1024),
              "albert-large": ("albert", 1024, 24, 16, 4096, 128)},
    student=(768, 6, 12, 3072), tk_layers=2, peak_n=8192, score_pairs=8192, bucket_pairs=2048,
    batch_sizes=(64, 256, 1024), train_batch=64, train_steps=10, encode_passages=65_536, encode_batch=512,
    search_queries=DEV_QUERIES, search_vectors=MSMARCO_PASSAGES, search_dim=768, search_chunk=1 << 20,
    search_k=1000, search_query_batch=1024,
)
TINY = Sizes(
    teachers={"bert-base": ("bert", 64, 2, 2, 128, 64), "bert-large": ("bert", 96, 2, 2, 192, 96),
              "albert-large": ("albert", 96, 2, 2, 192, 32)},
    student=(64, 2, 2, 128), tk_layers=1, peak_n=1024, score_pairs=256, bucket_pairs=128,
    batch_sizes=(16, 64), train_batch=8, train_steps=3, encode_passages=256, encode_batch=64,
    search_queries=70, search_vectors=88_418, search_dim=768, search_chunk=32_768, search_k=100,
    search_query_batch=64,
)
VOCAB = {"bert": 30522, "albert": 30000}
QUERY_MAX, PASSAGE_MAX = 30, 200  # the score stage's cut (tokens, without special tokens)
STUDENT_QUERY_MAX, STUDENT_PASSAGE_MAX = 32, 180  # the students' defaults (with special tokens)


# ---------------------------------------------------------------------------------------------------------
# synthetic MS MARCO-shaped inputs


def query_lengths(rng: np.random.Generator, n: int) -> np.ndarray:
    """WordPiece tokens of MS MARCO queries (no special tokens): mean ~9.5, 4..30."""
    return np.clip(np.round(rng.lognormal(np.log(9.5) - 0.35**2 / 2, 0.35, n)), 4, 30).astype(np.int64)


def passage_lengths(rng: np.random.Generator, n: int) -> np.ndarray:
    """WordPiece tokens of MS MARCO passages (no special tokens): mean ~76, 20..200."""
    return np.clip(np.round(rng.lognormal(np.log(76.0) - 0.42**2 / 2, 0.42, n)), 20, 200).astype(np.int64)


def random_ids(rng: np.random.Generator, n: int, vocab: int) -> np.ndarray:
    return rng.integers(1000, vocab, n, dtype=np.int64)  # above the special and unused tokens


def cat_pairs(rng: np.random.Generator, n: int, vocab: int, cls: int = 101, sep: int = 102) -> tuple[Ragged, Ragged]:
    """``[CLS] q [SEP] p [SEP]`` ids and token types of ``n`` pairs, as the score stage tokenises them."""
    q = np.minimum(query_lengths(rng, n), QUERY_MAX)
    p = np.minimum(passage_lengths(rng, n), PASSAGE_MAX)
    lengths = q + p + 3
    ids = random_ids(rng, int(lengths.sum()), vocab)
    types = np.zeros(int(lengths.sum()), dtype=np.int64)
    ragged = Ragged.from_lengths(ids, lengths)
    starts = ragged.offsets[:-1]
    ids[starts] = cls
    ids[starts + q + 1] = sep
    ids[starts + lengths - 1] = sep
    pos = np.arange(len(ids)) - np.repeat(starts, lengths)
    types[pos >= np.repeat(q + 2, lengths)] = 1
    return ragged, Ragged.from_lengths(types, lengths)


def padded_batch(rng: np.random.Generator, lengths: np.ndarray, vocab: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, longest) random ids and attention mask, padded like a tokenizer's ``padding=True`` (right, with 0)."""
    rows = Ragged.from_lengths(random_ids(rng, int(lengths.sum()), vocab), lengths)
    x, mask = pad_rows(rows, np.arange(len(lengths)), 0, 0)
    return torch.from_numpy(x).to(device), torch.from_numpy(mask).to(device)


# ---------------------------------------------------------------------------------------------------------
# FLOPs (multiply-add = 2 FLOPs; embedding lookups, norms, softmax and activations not counted)


@dataclass
class Shape:
    layers: int
    hidden: int
    intermediate: int
    embedding: int = 0  # ALBERT's factorised embedding: a projection embedding -> hidden per token

    def flops(self, tokens: np.ndarray) -> float:
        """Forward FLOPs of sequences of ``tokens`` tokens: 2 x matmul parameters x tokens + attention
        (QK^T and AV: 4 x d x n^2 per layer)."""
        n = np.asarray(tokens, dtype=np.float64)
        d, layer_params = self.hidden, 4 * self.hidden**2 + 2 * self.hidden * self.intermediate
        proj = self.embedding * d if self.embedding and self.embedding != d else 0
        return float((2 * (self.layers * layer_params + proj) * n + 4 * self.layers * d * n**2).sum())


def shape_of(config) -> Shape:
    """The :class:`Shape` of a Hugging Face BERT / ALBERT / DistilBERT config."""
    layers = getattr(config, "num_hidden_layers", None) or config.n_layers
    hidden = getattr(config, "hidden_size", None) or config.dim
    inter = getattr(config, "intermediate_size", None) or config.hidden_dim
    return Shape(layers, hidden, inter, getattr(config, "embedding_size", 0))


# ---------------------------------------------------------------------------------------------------------
# models with random weights, built from configs


def synthetic_tokenizer(workdir: str):
    """A BERT WordPiece tokenizer over a made-up 30,522-token vocabulary (the models need its special ids)."""
    import string

    from transformers import BertTokenizer

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    words = special + chars + ["##" + c for c in chars]
    words += [f"w{i}" for i in range(VOCAB["bert"] - len(words))]
    path = os.path.join(workdir, "vocab.txt")
    with open(path, "w") as f:
        f.write("\n".join(words) + "\n")
    return BertTokenizer(path, do_lower_case=True)


def hf_config(arch: str, hidden: int, layers: int, heads: int, intermediate: int, embedding: int):
    from transformers import AlbertConfig, BertConfig, DistilBertConfig

    if arch == "bert":
        return BertConfig(vocab_size=VOCAB["bert"], hidden_size=hidden, num_hidden_layers=layers,
                          num_attention_heads=heads, intermediate_size=intermediate)
    if arch == "albert":
        return AlbertConfig(vocab_size=VOCAB["albert"], embedding_size=embedding, hidden_size=hidden,
                            num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=intermediate)
    return DistilBertConfig(vocab_size=VOCAB["bert"], dim=hidden, n_layers=layers, n_heads=heads,
                            hidden_dim=intermediate)


def build_teacher(spec: tuple, tokenizer, device):
    """A BERT_CAT teacher (raykd's CrossEncoder, one logit, SDPA attention) with random weights, fp32 as the
    actor loads it."""
    from transformers import AutoModelForSequenceClassification

    from raykd.models.cross_encoder import CrossEncoder

    config = hf_config(*spec)
    config.num_labels = 1
    with torch.device(device):
        model = AutoModelForSequenceClassification.from_config(config, attn_implementation="sdpa")
    return CrossEncoder(model, tokenizer, QUERY_MAX, PASSAGE_MAX).to(device).eval(), shape_of(config)


def build_encoder(sizes: Sizes, device):
    """A DistilBERT-sized encoder (no pooler), SDPA attention."""
    from transformers import AutoModel

    hidden, layers, heads, inter = sizes.student
    config = hf_config("distilbert", hidden, layers, heads, inter, hidden)
    with torch.device(device):
        model = AutoModel.from_config(config, attn_implementation="sdpa")
    return model, shape_of(config)


# ---------------------------------------------------------------------------------------------------------
# timing


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, iters: int, warmup: int = 1) -> float:
    """Seconds per call of ``fn`` (after ``warmup`` calls), the device synchronised around the timed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / max(1, iters)


# ---------------------------------------------------------------------------------------------------------
# sections


def run_peak(args, sizes: Sizes, device) -> dict:
    n = sizes.peak_n
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    iters = 20 if device.type == "cuda" else 3
    s = timed(lambda: a @ b, device, iters, warmup=3 if device.type == "cuda" else 1)
    out = {"n": n, "dtype": str(dtype).removeprefix("torch."), "iters": iters, "s_per_matmul": s,
           "tflops": 2 * n**3 / s / 1e12, "settings": f"--peak-n {n}"}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        spec = next((v for k, v in SPEC_BF16_TFLOPS.items() if k in name), None)
        out.update(spec_tflops=spec, measured_over_spec=out["tflops"] / spec if spec else None)
    return out


def run_score(args, sizes: Sizes, device, tokenizer, peak: float, errors: dict) -> dict:
    rng = np.random.default_rng(0)
    rows = []
    for name, spec in sizes.teachers.items():
        if not args.only_teachers or name in args.only_teachers:
            with _isolated(f"score:{name}", errors, device):
                rows += _score_teacher(name, spec, sizes, device, tokenizer, peak, rng)
    return {"rows": rows, "t2": _t2_estimate(rows, peak)}


def _score_teacher(name: str, spec: tuple, sizes: Sizes, device, tokenizer, peak: float, rng) -> list:
    """One teacher at every batch size, with and without bucketing, over the same ``bucket_pairs`` blocks."""
    model, shape = build_teacher(spec, tokenizer, device)
    ids, types = cat_pairs(rng, sizes.score_pairs, VOCAB[spec[0]])
    blocks = [np.arange(a, min(a + sizes.bucket_pairs, len(ids))) for a in range(0, len(ids), sizes.bucket_pairs)]
    block_rows = [(_take(ids, i), _take(types, i)) for i in blocks]
    real_flops = shape.flops(ids.lengths)
    rows = []
    for bs in sizes.batch_sizes:
        for bucket in (True, False):
            out: list = []

            def score_all(bs=bs, bucket=bucket, out=out):
                out.clear()
                for bi, bt in block_rows:
                    out.append(score_block(model, bi, bt, batch_size=bs, pad_id=tokenizer.pad_token_id,
                                           device=device, bucket=bucket))

            s = timed(score_all, device, 1, warmup=1)
            padded = np.concatenate([o.padded_lengths for o in out])
            rows.append({
                "teacher": name, "batch_size": bs, "bucketing": bucket, "pairs": len(ids), "seconds": s,
                "pairs_per_s": len(ids) / s, "real_tokens": int(ids.lengths.sum()),
                "padded_tokens": int(padded.sum()), "padded_over_real": float(padded.sum() / ids.lengths.sum()),
                "gflop_per_pair_real": real_flops / len(ids) / 1e9,
                "tflops_real": real_flops / s / 1e12, "tflops_padded": shape.flops(padded) / s / 1e12,
                "frac_peak": real_flops / s / 1e12 / peak if peak else None,
                "settings": f"--only score --teachers {name} --batch-sizes {bs} --bucket-pairs {sizes.bucket_pairs}"
                            f" --score-pairs {sizes.score_pairs}" + ("" if bucket else " (bucketing off)"),
            })
            _print_row("score", rows[-1])
    return rows


def _take(r: Ragged, index: np.ndarray) -> Ragged:
    """Rows ``index`` (consecutive) of a ragged array as their own ragged array (a Ray Data block)."""
    a, b = int(r.offsets[index[0]]), int(r.offsets[index[-1] + 1])
    return Ragged(r.values[a:b], r.offsets[index[0] : index[-1] + 2] - a)


def _t2_estimate(rows: list, peak: float) -> dict:
    """The T2 ensemble (three teachers) over MS MARCO's unique pairs from the best bucketed rate per teacher."""
    best = {}
    for r in rows:
        if r["bucketing"] and r["pairs_per_s"] > best.get(r["teacher"], {}).get("pairs_per_s", 0):
            best[r["teacher"]] = r
    if not best:
        return {}
    s_per_pair = sum(1 / r["pairs_per_s"] for r in best.values())  # one pair through every teacher
    flops = sum(r["gflop_per_pair_real"] for r in best.values()) * 1e9
    return {
        "teachers": {t: {"batch_size": r["batch_size"], "pairs_per_s": r["pairs_per_s"]} for t, r in best.items()},
        "ensemble_pairs_per_s": 1 / s_per_pair,
        "ensemble_frac_peak": flops / s_per_pair / 1e12 / peak if peak else None,
        "gpu_hours_t2": UNIQUE_PAIRS_T2 * s_per_pair / 3600,
        "hours_on_8_gpus": UNIQUE_PAIRS_T2 * s_per_pair / 3600 / 8,
    }


def train_inputs(rng, sizes: Sizes, device, vocab: int) -> dict:
    """One batch of B triples for the grouped students: B queries and 2B passages [pos_0, neg_0, pos_1, ...]."""
    b = sizes.train_batch
    q = np.minimum(query_lengths(rng, b) + 2, STUDENT_QUERY_MAX)
    p = np.minimum(passage_lengths(rng, 2 * b) + 2, STUDENT_PASSAGE_MAX)
    qi, qm = padded_batch(rng, q, vocab, device)
    pi, pm = padded_batch(rng, p, vocab, device)
    return {"features": {"query_input_ids": qi, "query_attention_mask": qm, "passage_input_ids": pi,
                         "passage_attention_mask": pm},
            "teacher": torch.randn(b, 2, device=device) * 3, "q": q, "p": p, "q_pad": qi.shape[1], "p_pad": pi.shape[1]}


def student_flops(kind: str, shape: Shape, q: np.ndarray, p: np.ndarray, extra: dict) -> float:
    """Forward FLOPs of one batch (queries ``q`` once, passages ``p``: 2 per query) for a student kind."""
    k = len(p) // len(q)
    q_rep = np.repeat(q, k)
    if kind == "bert_dot":
        return shape.flops(q) + shape.flops(p)
    if kind == "colbert":  # + projection to 128 and MaxSim
        dim = extra["dim"]
        return shape.flops(q) + shape.flops(p) + 2 * shape.hidden * dim * (q.sum() + p.sum()) + 2 * dim * (q_rep * p).sum()
    if kind == "prettr":  # lower layers alone, upper layers on the joined pair
        lo = Shape(extra["split"], shape.hidden, shape.intermediate)
        hi = Shape(shape.layers - extra["split"], shape.hidden, shape.intermediate)
        return lo.flops(q) + lo.flops(p) + hi.flops(q_rep + p)
    if kind == "tk":  # small contextualiser + cosine match matrix
        return shape.flops(q) + shape.flops(p) + 2 * shape.hidden * (q_rep * p).sum()
    raise ValueError(kind)


def _margin_mse_step(model, optimizer, batch, autocast: bool, device) -> float:
    """What the train loop does per step with Margin-MSE: forward (B triples in one pass), loss, backward,
    clip, AdamW step."""
    from raykd.losses.margin_mse import margin_mse

    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        s = model(**batch["features"]).float().view(-1, 2)
        loss = margin_mse(s[:, 0], s[:, 1], batch["teacher"][:, 0], batch["teacher"][:, 1])
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())  # the loop reads the loss every step (finite check, logging)


def _train_student(kind: str, sizes: Sizes, device, tokenizer, rng, autocast: bool) -> dict:
    """Margin-MSE steps of one student (random weights) on three pre-made batches on the device."""
    from raykd.models.bi_encoder import BertDot
    from raykd.models.colbert import ColBERT
    from raykd.models.prettr import PreTTR
    from raykd.models.tk import TK

    hidden, layers, heads, _ = sizes.student
    encoder, shape = build_encoder(sizes, device) if kind != "tk" else (None, None)
    extra: dict = {}
    if kind == "bert_dot":
        model = BertDot(encoder, tokenizer)
    elif kind == "colbert":
        model, extra = ColBERT(encoder, tokenizer), {"dim": 128}
    elif kind == "prettr":
        extra = {"split": max(1, layers // 2)}
        model = PreTTR(encoder, tokenizer, split_layer=extra["split"])
    else:  # TK: word embeddings of the encoder's size, its own small contextualiser
        model = TK(tokenizer, VOCAB["bert"], hidden, layers=sizes.tk_layers, heads=heads)
        shape = Shape(sizes.tk_layers, hidden, model.ff_dim)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=7e-6, weight_decay=0.01, fused=device.type == "cuda")
    batches = [train_inputs(rng, sizes, device, VOCAB["bert"]) for _ in range(3)]
    it = iter(range(1 << 30))
    s = timed(lambda: _margin_mse_step(model, optimizer, batches[next(it) % 3], autocast, device), device,
              sizes.train_steps, warmup=2)
    real = np.mean([3 * student_flops(kind, shape, b["q"], b["p"], extra) for b in batches])
    padded = np.mean([3 * student_flops(kind, shape, np.full_like(b["q"], b["q_pad"]),
                                        np.full_like(b["p"], b["p_pad"]), extra) for b in batches])
    return {"student": kind, "s_per_step": s, "flops_real": real, "flops_padded": padded,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def run_train(args, sizes: Sizes, device, tokenizer, peak: float, errors: dict) -> dict:
    rng = np.random.default_rng(1)
    autocast = device.type == "cuda"
    rows = []
    for kind in ("bert_dot", "colbert", "prettr", "tk", "tct"):
        if args.only_students and kind not in args.only_students:
            continue
        row = None
        with _isolated(f"train:{kind}", errors, device):
            row = tct_step(sizes, device, tokenizer, rng, autocast) if kind == "tct" else \
                _train_student(kind, sizes, device, tokenizer, rng, autocast)
        if row is None:
            continue
        b = sizes.train_batch
        row.update({"batch": b, "triples_per_s": b / row["s_per_step"],
                    "tflops_real": row["flops_real"] / row["s_per_step"] / 1e12,
                    "frac_peak": row["flops_real"] / row["s_per_step"] / 1e12 / peak if peak else None,
                    "settings": f"--only train --students {kind} --train-batch {b} --train-steps {sizes.train_steps}"})
        rows.append(row)
        _print_row("train", row)
        _free(device)
    return {"rows": rows}


def tct_step(sizes: Sizes, device, tokenizer, rng, autocast: bool) -> dict:
    """One TCT-ColBERT step: the student (mean-pooled BERT_DOT in TCT's input format, initialised from the
    teacher's encoder) against every passage of the batch, the frozen ColBERT teacher's in-batch MaxSim
    (bf16 weights on GPU, no gradient), the TCT loss (gamma CE + (1 - gamma) KL). Kept in one function: the
    TCT model/loss API is being reshaped (TCT as an ordinary student, the loss a pure function)."""
    from raykd.losses.tct import tct_loss
    from raykd.models.colbert import ColBERT
    from raykd.models.tct import TCT_QUERY_LENGTH, TctBiEncoder

    encoder, shape = build_encoder(sizes, device)
    teacher = ColBERT(encoder, tokenizer).to(device).eval()
    student = TctBiEncoder.from_teacher(teacher).to(device).train()
    if device.type == "cuda":
        teacher.to(torch.bfloat16)
    for p in teacher.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=7e-6, weight_decay=0.01, fused=device.type == "cuda")
    b, vocab = sizes.train_batch, VOCAB["bert"]

    def batch():
        q = np.full(b, TCT_QUERY_LENGTH)  # TCT queries: [CLS] [ q ] q [MASK]... exactly 36 tokens, all attended
        tq = np.minimum(query_lengths(rng, b) + 2, STUDENT_QUERY_MAX)
        p = np.minimum(passage_lengths(rng, 2 * b) + 4, student.passage_max_length)  # positives, then negatives
        tp = np.minimum(p - 2, STUDENT_PASSAGE_MAX)
        return {"s": (*padded_batch(rng, q, vocab, device), *padded_batch(rng, p, vocab, device)),
                "t": (*padded_batch(rng, tq, vocab, device), *padded_batch(rng, tp, vocab, device)),
                "lengths": (q, p, tq, tp)}

    batches = [batch() for _ in range(3)]
    it = iter(range(1 << 30))

    def step():
        bt = batches[next(it) % 3]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            qi, qm, pi, pm = bt["s"]
            qv, pv = student(qi, qm, pi, pm, return_embeddings=True)
            scores = qv.float() @ pv.float().T
            with torch.no_grad():
                tqi, tqm, tpi, tpm = bt["t"]
                t = teacher.similarity(teacher.embed(tqi, tqm), tqm, teacher.embed(tpi, tpm), tpm, all_pairs=True)
            loss = tct_loss(scores, t.float(), mode="inbatch", tau=0.25, gamma=0.1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    s = timed(step, device, sizes.train_steps, warmup=2)
    flops = []
    for bt in batches:
        q, p, tq, tp = bt["lengths"]
        student_fwd = shape.flops(q) + shape.flops(p) + 2 * shape.hidden * len(q) * len(p)
        teacher_fwd = (shape.flops(tq) + shape.flops(tp) + 2 * shape.hidden * 128 * (tq.sum() + tp.sum())
                       + 2 * 128 * tq.sum() * tp.sum())
        flops.append(3 * student_fwd + teacher_fwd)
    return {"student": "tct", "s_per_step": s, "flops_real": float(np.mean(flops)), "flops_padded": None,
            "params_m": sum(p.numel() for p in student.parameters()) / 1e6}


def run_encode(args, sizes: Sizes, device, tokenizer, peak: float) -> dict:
    """Passages through a BERT_DOT's ``embed`` (what the index stage computes per passage), length-sorted
    micro-batches, bf16 autocast on GPU."""
    from raykd.models.bi_encoder import BertDot

    encoder, shape = build_encoder(sizes, device)
    model = BertDot(encoder, tokenizer).to(device).eval()
    rng = np.random.default_rng(2)
    lengths = np.minimum(passage_lengths(rng, sizes.encode_passages) + 2, PASSAGE_MAX)
    rows = Ragged.from_lengths(random_ids(rng, int(lengths.sum()), VOCAB["bert"]), lengths)
    order = batch_order(-lengths)  # longest first, as raykd.encoders does
    padded = np.zeros(len(lengths))

    def encode_all():
        out = []
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            for a in range(0, len(order), sizes.encode_batch):
                idx = order[a : a + sizes.encode_batch]
                x, mask = pad_rows(rows, idx, 0, 8)
                padded[idx] = x.shape[1]
                out.append(model.embed(torch.from_numpy(x).to(device), torch.from_numpy(mask).to(device)).float())
        return torch.cat(out).cpu()

    s = timed(encode_all, device, 1, warmup=1)
    real = shape.flops(lengths)
    row = {"passages": len(lengths), "batch": sizes.encode_batch, "seconds": s, "passages_per_s": len(lengths) / s,
           "mean_tokens": float(lengths.mean()), "padded_over_real": float(padded.sum() / lengths.sum()),
           "tflops_real": real / s / 1e12, "frac_peak": real / s / 1e12 / peak if peak else None,
           "msmarco_hours": MSMARCO_PASSAGES / (len(lengths) / s) / 3600,
           "settings": f"--only encode --encode-passages {len(lengths)} --encode-batch {sizes.encode_batch}"}
    _print_row("encode", row)
    return row


def run_search(args, sizes: Sizes, device) -> dict:
    """Exact top-k by inner product over chunks of the collection: fp16 matmul + top-k per chunk, merged."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(3)
    n, d, k = sizes.search_vectors, sizes.search_dim, sizes.search_k

    def unit(rows: int) -> torch.Tensor:
        x = torch.randn(rows, d, device=device, generator=gen, dtype=torch.float32)
        return torch.nn.functional.normalize(x, dim=-1).to(dtype)

    chunks = [unit(min(sizes.search_chunk, n - a)) for a in range(0, n, sizes.search_chunk)]
    queries = unit(sizes.search_queries)
    sync(device)

    found = []

    def search():
        all_s, all_i = [], []
        with torch.inference_mode():
            for a in range(0, len(queries), sizes.search_query_batch):
                q = queries[a : a + sizes.search_query_batch]
                best_s = best_i = None
                offset = 0
                for c in chunks:
                    s, i = torch.topk(q @ c.T, min(k, len(c)), dim=1)
                    i = i + offset
                    offset += len(c)
                    if best_s is not None:
                        s, i = torch.cat([best_s, s], 1), torch.cat([best_i, i], 1)
                        s, j = torch.topk(s, min(k, s.shape[1]), dim=1)
                        i = torch.gather(i, 1, j)
                    best_s, best_i = s, i
                all_s.append(best_s.float())
                all_i.append(best_i)
        found[:] = [torch.cat(all_i).cpu()]
        return torch.cat(all_s).cpu()

    s = timed(search, device, 1, warmup=1 if device.type == "cuda" else 0)
    torch_ids = found[0]
    row = {"queries": len(queries), "vectors": n, "dim": d, "k": k, "dtype": str(dtype).removeprefix("torch."),
           "chunk": sizes.search_chunk, "torch_s": s, "qps": len(queries) / s,
           "settings": f"--only search --search-vectors {n} --search-chunk {sizes.search_chunk} --search-k {k}"}
    row["faiss"] = _faiss_search(chunks, queries, k, device, torch_ids)
    chunks.clear()
    _free(device)
    _print_row("search", row)
    return row


def _faiss_search(chunks, queries, k: int, device, torch_ids) -> dict:
    """The same search with Faiss (flat inner product: GPU index on CUDA, fp16 storage; CPU index otherwise)."""
    try:
        import faiss
    except ImportError:
        return {"skipped": "faiss is not installed"}
    d = queries.shape[1]
    if device.type == "cuda":
        if faiss.get_num_gpus() < 1:
            return {"skipped": "faiss without GPU support (faiss-cpu); install faiss-gpu-cu12"}
        import faiss.contrib.torch_utils  # noqa: F401 - lets a GPU index take torch CUDA tensors

        res = faiss.StandardGpuResources()
        cfg = faiss.GpuIndexFlatConfig()
        cfg.useFloat16 = True
        cfg.device = torch.cuda.current_device()
        index = faiss.GpuIndexFlatIP(res, d, cfg)
        for c in chunks:
            index.add(c.float())
        q = queries.float()
    else:
        index = faiss.IndexFlatIP(d)
        for c in chunks:
            index.add(c.float().numpy())
        q = queries.float().numpy()
    t0 = time.perf_counter()
    _, ids = index.search(q, k)
    sync(device)
    out = {"seconds": time.perf_counter() - t0, "index": type(index).__name__, "threads": faiss.omp_get_max_threads()}
    if torch_ids is not None:  # the two exact searches should find the same top 10
        ids = np.asarray(ids)
        same = [len(set(a[:10]) & set(b[:10])) / 10 for a, b in zip(ids, torch_ids.numpy())]
        out["top10_agreement_with_torch"] = float(np.mean(same))
    return out


def run_profile(args, sizes: Sizes, device, tokenizer) -> dict:
    """The top kernels (device time on GPU, CPU time otherwise) of one scoring block and one BERT_DOT step."""
    from torch.profiler import ProfilerActivity, profile

    from raykd.models.bi_encoder import BertDot

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    rng = np.random.default_rng(4)
    spec = sizes.teachers["bert-base"]
    teacher, _ = build_teacher(spec, tokenizer, device)
    ids, types = cat_pairs(rng, sizes.bucket_pairs, VOCAB["bert"])
    bs = sizes.batch_sizes[-1] if device.type == "cuda" else sizes.batch_sizes[0]
    score_block(teacher, ids, types, batch_size=bs, device=device)
    out = {}
    with profile(activities=acts) as prof:
        score_block(teacher, ids, types, batch_size=bs, device=device)
        sync(device)
    out["score_block"] = {"settings": f"bert-base, {len(ids)} pairs, batch {bs}", "top": _top(prof, device)}
    del teacher
    encoder, _ = build_encoder(sizes, device)
    model = BertDot(encoder, tokenizer).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=7e-6, fused=device.type == "cuda")
    batch = train_inputs(rng, sizes, device, VOCAB["bert"])
    _margin_mse_step(model, opt, batch, device.type == "cuda", device)
    with profile(activities=acts) as prof:
        _margin_mse_step(model, opt, batch, device.type == "cuda", device)
        sync(device)
    out["bert_dot_step"] = {"settings": f"batch {sizes.train_batch}", "top": _top(prof, device)}
    for name, p in out.items():
        print(f"\nprofile {name} ({p['settings']}): top kernels by self {'device' if device.type == 'cuda' else 'CPU'} time")
        for r in p["top"]:
            print(f"  {r['self_ms']:9.3f} ms {r['share']:6.1%}  x{r['calls']:<5d} {r['name'][:90]}")
    _free(device)
    return out


def _top(prof, device, n: int = 12) -> list:
    events = prof.key_averages()
    cuda = device.type == "cuda"

    def self_us(e) -> float:
        if cuda:
            return float(getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0) or 0)
        return float(e.self_cpu_time_total)

    total = sum(self_us(e) for e in events) or 1.0
    top = sorted(events, key=self_us, reverse=True)[:n]
    return [{"name": e.key, "self_ms": self_us(e) / 1e3, "share": self_us(e) / total, "calls": int(e.count)} for e in top]


# ---------------------------------------------------------------------------------------------------------
# output


@contextlib.contextmanager
def _isolated(what: str, errors: dict, device):
    """Run one model's figures; a failure is recorded under ``errors[what]`` and the others still run."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - one failing model must not lose the others' figures
        traceback.print_exc()
        errors[what] = f"{type(e).__name__}: {e}"
    finally:
        _free(device)


def _free(device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _print_row(section: str, row: dict) -> None:
    keys = [k for k in row if k not in ("settings", "faiss")]
    print(f"[{section}] " + "  ".join(f"{k}={_fmt(row[k])}" for k in keys), flush=True)


def print_tables(result: dict) -> None:
    peak = result.get("peak", {})
    if "tflops" in peak:
        spec = f" ({peak['measured_over_spec']:.1%} of the data sheet's {peak['spec_tflops']})" \
            if peak.get("spec_tflops") else ""
        print(f"\n## peak: {peak['n']}^3 {peak['dtype']} matmul {peak['tflops']:.3g} TFLOP/s{spec}; fractions below "
              "are of this measured peak")
    score = result.get("score", {})
    if score.get("rows"):
        print("\n## score (teacher forward via raykd.batching.score_block)\n")
        print("| teacher | batch | bucketing | pairs/s | padded/real | TFLOP/s (real) | frac. of peak |")
        print("|---|---|---|---|---|---|---|")
        for r in score["rows"]:
            print(f"| {r['teacher']} | {r['batch_size']} | {'yes' if r['bucketing'] else 'no'} | {r['pairs_per_s']:,.0f} | "
                  f"{r['padded_over_real']:.2f} | {r['tflops_real']:.3g} | {_pct(r['frac_peak'])} |")
        t2 = score.get("t2") or {}
        if t2:
            print(f"\nT2 ensemble (best bucketed rate per teacher): {t2['ensemble_pairs_per_s']:,.0f} pairs/s through all "
                  f"three, {_pct(t2['ensemble_frac_peak'])} of peak; {UNIQUE_PAIRS_T2 / 1e6:.1f}M unique pairs = "
                  f"{t2['gpu_hours_t2']:.2f} GPU-hours = {t2['hours_on_8_gpus'] * 60:.1f} min on 8 GPUs")
    train = result.get("train", {})
    if train.get("rows"):
        print("\n## train (one Margin-MSE step; TCT: in-batch KL with its frozen teacher)\n")
        print("| student | batch | ms/step | triples/s | TFLOP/s (real) | frac. of peak |")
        print("|---|---|---|---|---|---|")
        for r in train["rows"]:
            print(f"| {r['student']} | {r['batch']} | {r['s_per_step'] * 1e3:.1f} | {r['triples_per_s']:,.0f} | "
                  f"{r['tflops_real']:.3g} | {_pct(r['frac_peak'])} |")
    enc = result.get("encode", {})
    if "passages_per_s" in enc:
        print(f"\n## encode: {enc['passages_per_s']:,.0f} passages/s ({enc['mean_tokens']:.0f} tokens on average, "
              f"batch {enc['batch']}, {_pct(enc['frac_peak'])} of peak); MS MARCO's 8.8M: {enc['msmarco_hours']:.2f} h")
    se = result.get("search", {})
    if "torch_s" in se:
        f = se.get("faiss", {})
        fs = f"{f['seconds']:.2f} s ({f['index']})" if "seconds" in f else f.get("skipped", f.get("error", "?"))
        print(f"\n## search: {se['queries']} queries x {se['vectors']:,} x {se['dim']} ({se['dtype']}), top {se['k']}: "
              f"torch {se['torch_s']:.2f} s; faiss: {fs}")


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def summary_line(result: dict) -> str:
    t2 = (result.get("score") or {}).get("t2") or {}
    rows = (result.get("train") or {}).get("rows") or []
    bert_dot = next((r for r in rows if r["student"] == "bert_dot"), None)
    search = result.get("search") or {}

    def f(x, spec):
        return "n/a" if x is None else format(x, spec)

    return (f"gpu: score_frac_peak={f(t2.get('ensemble_frac_peak'), '.3f')} "
            f"train_frac_peak={f(bert_dot and bert_dot['frac_peak'], '.3f')} "
            f"search_s={f(search.get('torch_s'), '.2f')}")


def device_info(device) -> dict:
    import transformers

    info = {"device": device.type, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "host": platform.node()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    else:
        flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
        info.update(gpu=None, cpu=platform.processor() or platform.machine(), cpu_threads=torch.get_num_threads(),
                    avx512_bf16="avx512_bf16" in flags)
    return info


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="Tiny models and workloads (CPU check of the code paths).")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"Comma-separated sections of {','.join(SECTIONS)}.")
    ap.add_argument("--out", default="gpu_bench.json", help="JSON file of every figure.")
    ap.add_argument("--teachers", dest="only_teachers", default="", help="Teachers to score (default: all of bert-base,bert-large,albert-large).")
    ap.add_argument("--students", dest="only_students", default="", help="Students to train (default: bert_dot,colbert,prettr,tk,tct).")
    ap.add_argument("--batch-sizes", dest="batch_sizes_arg", default="", help="Scoring batch sizes (default: 64,256,1024; tiny: 16,64).")
    for name in ("score_pairs", "bucket_pairs", "train_batch", "train_steps", "encode_passages", "encode_batch",
                 "search_queries", "search_vectors", "search_chunk", "search_k", "peak_n"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=None, help=f"Override {name}.")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0: 1 with --tiny on a CPU, steadier on a shared machine; else torch's).")
    args = ap.parse_args(argv)
    args.only = [s for s in args.only.split(",") if s]
    unknown = set(args.only) - set(SECTIONS)
    if unknown:
        ap.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    args.only_teachers = [t for t in args.only_teachers.split(",") if t]
    args.only_students = [s for s in args.only_students.split(",") if s]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads or (args.tiny and device.type == "cpu"):
        torch.set_num_threads(args.threads or 1)
    base = TINY if args.tiny else REAL
    overrides = {k: getattr(args, k) for k in Sizes.__dataclass_fields__ if getattr(args, k, None) is not None}
    if args.batch_sizes_arg:
        overrides["batch_sizes"] = tuple(int(x) for x in args.batch_sizes_arg.split(","))
    sizes = Sizes(**{**base.__dict__, **overrides})
    t_start = time.perf_counter()
    result: dict = {"info": device_info(device), "command": " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
                    "tiny": args.tiny, "sizes": {k: v for k, v in sizes.__dict__.items()}, "errors": {}}
    print(json.dumps(result["info"]), flush=True)
    with tempfile.TemporaryDirectory() as work:
        tokenizer = synthetic_tokenizer(work)
        peak = None
        for section in SECTIONS:
            if section not in args.only and not (section == "peak" and {"score", "train", "encode"} & set(args.only)):
                continue
            t0 = time.perf_counter()
            try:
                if section == "peak":
                    result["peak"] = run_peak(args, sizes, device)
                    peak = result["peak"]["tflops"]
                    _print_row("peak", result["peak"])
                elif section == "score":
                    result["score"] = run_score(args, sizes, device, tokenizer, peak, result["errors"])
                elif section == "train":
                    result["train"] = run_train(args, sizes, device, tokenizer, peak, result["errors"])
                elif section == "encode":
                    result["encode"] = run_encode(args, sizes, device, tokenizer, peak)
                elif section == "search":
                    result["search"] = run_search(args, sizes, device)
                elif section == "profile":
                    result["profile"] = run_profile(args, sizes, device, tokenizer)
            except Exception as e:  # noqa: BLE001 - one failing section must not lose the others' figures
                traceback.print_exc()
                result["errors"][section] = f"{type(e).__name__}: {e}"
                _free(device)
            result.setdefault("section_s", {})[section] = round(time.perf_counter() - t0, 2)
            print(f"[{section}] done in {time.perf_counter() - t0:.1f} s", flush=True)
    result["total_s"] = round(time.perf_counter() - t_start, 2)
    result["summary"] = summary_line(result)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2, default=float)
    print_tables(result)
    print(f"\n{len(result['errors'])} section error(s); wrote {args.out}; total {result['total_s']:.1f} s")
    print(result["summary"], flush=True)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
