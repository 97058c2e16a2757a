"""Teachers of every kind behind one interface, :class:`PairScorer`: what ``raykd score --teacher KIND:PATH``
loads (docs/teachers.md).

    spec = parse_teacher("colbert:/models/colbert-distilbert-margin_mse-T2-msmarco")   # TeacherSpec(kind, path)
    teacher = load_teacher(spec)                      # the checkpoint's own tokenizer and lengths
    feats = teacher.tokenize_unpadded(queries, passages)          # CPU: per-pair id lists, no padding
    out = teacher.score_features(feats, batch_size=64)            # raykd.batching.score_block: BlockScores
    teacher.score_pairs(queries, passages)                        # both, np.ndarray (n,)

Kinds (``KIND:`` counts as a prefix only when it is one of these; ``s3://...`` and hub names stay as they are;
a bare name or path is ``cat``):

``cat``     cross-encoders: any ``AutoModelForSequenceClassification`` folder (BERT, DistilBERT, ALBERT, ELECTRA,
            RoBERTa/XLM-RoBERTa, DeBERTa-v2/v3; one logit, or the relevant-class logit of two), or a released
            ``BERT_Cat`` checkpoint (:mod:`raykd.models.released`).
``dot``     bi-encoders: a raykd BERT_DOT / TCT student, or a plain HF encoder (``pooling`` / ``normalize``
            options; a sentence-transformers folder's own pooling and normalisation are read).
``colbert`` a raykd ColBERT student or a released ``ColBERT`` checkpoint.
``prettr``  a raykd PreTTR student or a released ``PreTTR`` checkpoint.
``tk``      a raykd TK student.
``bm25``    BM25 (raykd's, :mod:`raykd.bm25`, search's parameters) with the corpus statistics of a text store
            (``load_teacher(spec, store=URI)``); no path.
``llm``     a causal LM reranker scored pointwise: ``logit(yes) - logit(no)`` at the last position after a
            prompt (:class:`LLMReranker`).

A teacher must be a teacher: a checkpoint whose scoring weights are missing (a cross-encoder without its
classification head, a ColBERT without its projection, a PreTTR without its scoring layer, a released folder
without its head) is refused with a :class:`~raykd.errors.UserError` naming the folder and the missing weights.

Nothing here knows about Ray.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from raykd.batching import BlockScores, score_block
from raykd.errors import UserError

KINDS = ("cat", "dot", "colbert", "prettr", "tk", "bm25", "llm")
LLM_CONFIG = "raykd_llm.json"  # optional, beside an LLM teacher: {"template", "yes_token", "no_token"}

#: Qwen3-Reranker's prompt (its model card's reference code), with its default instruction
QWEN3_RERANKER_TEMPLATE = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
    "<Instruct>: Given a web search query, retrieve relevant passages that answer the query\n"
    "<Query>: {query}\n<Document>: {passage}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
)
DEFAULT_YES, DEFAULT_NO = "yes", "no"


@dataclass(frozen=True)
class TeacherSpec:
    """One ``--teacher`` value: its kind and its model (a folder, an ``s3://`` URI or a hub name; "" for bm25)."""

    kind: str
    path: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.path}"


def parse_teacher(spec: str) -> TeacherSpec:
    """``KIND:NAME_OR_PATH`` -> TeacherSpec. The prefix counts only when it is one of :data:`KINDS`
    (``s3://b/m`` and ``org/name`` stay whole, kind ``cat``); ``bm25`` takes no path (``bm25`` or ``bm25:``)."""
    spec = str(spec).strip()
    head, sep, rest = spec.partition(":")
    if sep and head in KINDS:
        kind, path = head, rest.strip()
    elif spec == "bm25":
        kind, path = "bm25", ""
    else:
        kind, path = "cat", spec
    if kind == "bm25" and path:
        raise UserError(f"teacher {spec!r}: bm25 takes no model path (give `bm25`); it scores with the text "
                        f"store's corpus statistics")
    if kind != "bm25" and not path:
        raise UserError(f"teacher {spec!r}: {kind} needs a model folder or name after `{kind}:`")
    return TeacherSpec(kind, path)


# ---------------------------------------------------------------------------------------------------------
# the interface


class PairScorer:
    """One teacher: tokenise pairs (CPU, no padding), score them (:func:`raykd.batching.score_block`).

    ``model`` is the torch module ``score_block`` calls with padded features; ``pad_id`` and ``padding_side``
    are how its sequences are padded. ``kind`` and ``path`` say what was loaded."""

    padding_side = "right"

    def __init__(self, kind: str, path: str, model: torch.nn.Module | None, pad_id: int = 0):
        self.kind, self.path, self.model, self.pad_id = kind, path, model, int(pad_id)

    def tokenize_unpadded(self, queries: Sequence[str], passages: Sequence[str]) -> dict[str, list]:
        raise NotImplementedError

    def score_features(self, features: dict[str, Any], *, batch_size: int = 64, device: str | None = None,
                       bucket: bool = True, autocast: bool | None = None) -> BlockScores:
        """Scores of :meth:`tokenize_unpadded`'s features (columns may be Arrow list arrays), block order."""
        return score_block(self.model, features=features, batch_size=batch_size, pad_id=self.pad_id, device=device,
                           bucket=bucket, autocast=autocast, padding_side=self.padding_side)

    def score_pairs(self, queries: Sequence[str], passages: Sequence[str], batch_size: int = 64,
                    bucket: bool = True) -> np.ndarray:
        """float32 scores of (queries[i], passages[i])."""
        if len(queries) != len(passages):
            raise ValueError(f"score_pairs needs as many queries as passages, got {len(queries)} and {len(passages)}")
        return self.score_features(self.tokenize_unpadded(queries, passages), batch_size=batch_size,
                                   bucket=bucket).scores

    def to(self, device: str | torch.device) -> PairScorer:
        if self.model is not None:
            self.model.to(device)
        return self


class TokenizerScorer(PairScorer):
    """A model that tokenises pairs itself (``model.tokenize_unpadded``): cross-encoders, released layouts."""

    def tokenize_unpadded(self, queries, passages):
        return self.model.tokenize_unpadded(queries, passages)


class StudentScorer(PairScorer):
    """A raykd student (BERT_DOT, TCT, ColBERT, PreTTR, TK) through its own ``tokenize``: the padded tensors it
    builds in training are cut back to each row's tokens (``attention_mask``), so the teacher sees exactly the
    ids the student saw; ``score_block`` pads them again."""

    CHUNK = 256

    def tokenize_unpadded(self, queries, passages):
        if len(queries) != len(passages):
            raise ValueError(f"tokenize needs as many queries as passages, got {len(queries)} and {len(passages)}")
        out: dict[str, list] = {"query_input_ids": [], "passage_input_ids": []}
        for a in range(0, len(queries), self.CHUNK):
            t = self.model.tokenize([str(x) for x in queries[a:a + self.CHUNK]],
                                    [str(x) for x in passages[a:a + self.CHUNK]])
            for side in ("query", "passage"):
                ids, mask = t[f"{side}_input_ids"], t[f"{side}_attention_mask"].bool()
                out[f"{side}_input_ids"] += [row[m].tolist() for row, m in zip(ids, mask)]
        return out


# ---------------------------------------------------------------------------------------------------------
# LLM rerankers


class LLMReranker(torch.nn.Module):
    """A causal LM as a pointwise reranker: ``s(q, p) = logit(yes) - logit(no)`` at the last position of the
    prompt ``template`` (``{query}`` and ``{passage}`` filled in), i.e. the log-odds of "yes" between the two
    answers (``log P(yes) - log P(no)``: the same order as Qwen3-Reranker's ``P(yes)`` over {yes, no}).

    The template's literal pieces, the query and the passage are tokenised separately (no special tokens added)
    and concatenated, so the query is cut to ``query_max_length`` and the passage to ``passage_max_length``
    tokens while the instructions stay whole (Qwen3-Reranker's reference code likewise tokenises its prefix and
    suffix apart from the body). Pairs are padded on the LEFT; position ids follow the attention mask, so a
    pair's score does not depend on the padding of its batch."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, template: str = QWEN3_RERANKER_TEMPLATE,
                 yes_token: str = DEFAULT_YES, no_token: str = DEFAULT_NO, query_max_length: int = 30,
                 passage_max_length: int = 200):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.template = template
        self.query_max_length, self.passage_max_length = int(query_max_length), int(passage_max_length)
        self.yes_id, self.no_id = self._token_id(yes_token), self._token_id(no_token)
        self._pieces = self._split(template)
        self._keep_last = "logits_to_keep" in inspect.signature(model.forward).parameters

    @staticmethod
    def _split(template: str) -> list[str]:
        """[literal, field, literal, field, literal] with fields ``query`` and ``passage`` in template order."""
        if template.count("{query}") != 1 or template.count("{passage}") != 1:
            raise UserError("the LLM prompt template needs {query} and {passage} exactly once each, got "
                            f"{template!r}")
        first, second = ("query", "passage") if template.index("{query}") < template.index("{passage}") else ("passage", "query")
        a, rest = template.split("{" + first + "}")
        b, c = rest.split("{" + second + "}")
        return [a, first, b, second, c]

    def _token_id(self, token: str) -> int:
        return answer_token_id(self.tokenizer, token)

    def tokenize_unpadded(self, queries: Sequence[str], passages: Sequence[str]) -> dict[str, list[list[int]]]:
        if len(queries) != len(passages):
            raise ValueError(f"tokenize needs as many queries as passages, got {len(queries)} and {len(passages)}")
        enc = self.tokenizer
        lit = [enc.encode(self._pieces[i], add_special_tokens=False) if self._pieces[i] else [] for i in (0, 2, 4)]
        q = enc([str(x) for x in queries], add_special_tokens=False)["input_ids"]
        p = enc([str(x) for x in passages], add_special_tokens=False)["input_ids"]
        field = {"query": [x[: self.query_max_length] for x in q], "passage": [x[: self.passage_max_length] for x in p]}
        f1, f2 = field[self._pieces[1]], field[self._pieces[3]]
        return {"input_ids": [lit[0] + list(x) + lit[1] + list(y) + lit[2] for x, y in zip(f1, f2)]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        kw = {"logits_to_keep": 1} if self._keep_last else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=False, **kw)
        last = out.logits[:, -1].float()
        return last[:, self.yes_id] - last[:, self.no_id]


def answer_token_id(tokenizer: Any, token: str) -> int:
    """The id of an LLM teacher's answer ``token``, which must be one token of ``tokenizer``."""
    ids = tokenizer.encode(token, add_special_tokens=False)
    if len(ids) == 1:
        return int(ids[0])
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or tid == tokenizer.unk_token_id:
        raise UserError(f"LLM teacher: {token!r} is not one token of its tokenizer (it encodes to {ids}); give "
                        f"answer tokens that are single tokens")
    return int(tid)


class LLMScorer(TokenizerScorer):
    padding_side = "left"


def _llm_settings(path: str, qlen: int | None, plen: int | None, template: str | None, yes_token: str | None,
                  no_token: str | None) -> dict:
    """An LLM teacher's prompt and lengths: the arguments, else its ``raykd_llm.json``, else the defaults."""
    saved = {}
    if os.path.isfile(os.path.join(path, LLM_CONFIG)):
        with open(os.path.join(path, LLM_CONFIG)) as f:
            saved = json.load(f)
    for name, value in (("template", template), ("yes_token", yes_token), ("no_token", no_token)):
        if value is not None and not isinstance(value, str):
            raise UserError(f"LLM teacher {path}: {name} must be a string, got {value!r} (on the command line, "
                            f"quote a value that YAML would read otherwise: {name}='\"...\"')")
    return {"template": template or saved.get("template", QWEN3_RERANKER_TEMPLATE),
            "yes_token": yes_token or saved.get("yes_token", DEFAULT_YES),
            "no_token": no_token or saved.get("no_token", DEFAULT_NO),
            "query_max_length": qlen or saved.get("query_max_length", 30),
            "passage_max_length": plen or saved.get("passage_max_length", 200)}


def _llm_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the tokenizer of LLM teacher {path!r}: {e}") from None


def _load_llm(path: str, qlen: int | None, plen: int | None, template: str | None, yes_token: str | None,
              no_token: str | None) -> LLMScorer:
    from transformers import AutoModelForCausalLM

    settings = _llm_settings(path, qlen, plen, template, yes_token, no_token)
    tokenizer = _llm_tokenizer(path)
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32  # bf16 on GPU
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load LLM teacher {path!r} as AutoModelForCausalLM: {e}") from None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    reranker = LLMReranker(model, tokenizer, **settings)
    return LLMScorer("llm", path, reranker.eval(), pad or 0)


# ---------------------------------------------------------------------------------------------------------
# BM25


class BM25Scorer(PairScorer):
    """BM25 of each pair's texts with a corpus's statistics (:class:`raykd.bm25.BM25PairScorer`); features are
    the texts themselves."""

    def tokenize_unpadded(self, queries, passages):
        return {"query": [str(q) for q in queries], "passage": [str(p) for p in passages]}

    def score_features(self, features, *, batch_size: int = 64, device=None, bucket: bool = True,
                       autocast=None) -> BlockScores:
        q, p = features["query"], features["passage"]
        q = q.to_pylist() if hasattr(q, "to_pylist") else list(q)
        p = p.to_pylist() if hasattr(p, "to_pylist") else list(p)
        scores = self.bm25.score(q, p)
        zeros = np.zeros(len(scores), dtype=np.int32)
        return BlockScores(scores, zeros, zeros, 0)


def _load_bm25(store: str | None, corpus: Sequence[str] | None, params: Any = None) -> BM25Scorer:
    from raykd.bm25 import BM25PairScorer

    if corpus is None:
        if not store:
            raise UserError("a bm25 teacher needs the text store whose corpus statistics it scores with")
        from raykd.formats.store import TextStore, passage_text

        t = TextStore(store).corpus(["title", "text"])
        corpus = passage_text(t["title"], t["text"]).to_pylist()
    out = BM25Scorer("bm25", "", None)
    out.bm25 = BM25PairScorer(corpus, params)
    return out


# ---------------------------------------------------------------------------------------------------------
# loading


def _local(path: str) -> str:
    from raykd.models.registry import local_path

    return local_path(path)


def _st_pooling(path: str) -> dict:
    """Pooling and normalisation of a sentence-transformers folder (``modules.json``), else {}."""
    modules = os.path.join(path, "modules.json")
    if not os.path.isfile(modules):
        return {}
    with open(modules) as f:
        mods = json.load(f)
    out: dict[str, Any] = {"normalize": any(m.get("type", "").endswith("Normalize") for m in mods)}
    for m in mods:
        if m.get("type", "").endswith("Pooling"):
            with open(os.path.join(path, m.get("path", ""), "config.json")) as f:
                pc = json.load(f)
            if pc.get("pooling_mode_cls_token"):
                out["pooling"] = "cls"
            elif pc.get("pooling_mode_mean_tokens"):
                out["pooling"] = "mean"
            else:
                raise UserError(f"{path}: sentence-transformers pooling {pc} is not one raykd has (cls, mean)")
    return out


def _require_head_file(path: str, filename: str, what: str) -> None:
    if not os.path.isfile(os.path.join(path, filename)):
        raise UserError(f"teacher {path} has no trained scoring head: its weights lack {filename} ({what}). A "
                        f"teacher's scores would come from a random layer; train it first (a student may start "
                        f"from it)")


#: a saved raykd model's kind (``raykd.models.registry.saved_kind``) -> the teacher kind that scores it
SAVED_KINDS = {"bert_cat": "cat", "bert_dot": "dot", "tct": "dot", "colbert": "colbert", "prettr": "prettr",
               "tk": "tk"}


def scorer_spec(scorer: str) -> TeacherSpec:
    """A re-ranker as a :class:`TeacherSpec`: ``KIND:PATH`` as :func:`parse_teacher` reads it, or a bare model that
    :func:`raykd.models.registry.load_scorer` loads (a raykd student of any kind, a cross-encoder folder or hub
    name), its kind read from the folder."""
    from raykd.models import registry

    scorer = str(scorer).strip()
    head, sep, _ = scorer.partition(":")
    if (sep and head in KINDS) or scorer == "bm25":
        return parse_teacher(scorer)
    path = _local(scorer)
    if not os.path.isdir(path):
        return TeacherSpec("cat", scorer)  # a hub name: a cross-encoder, as load_scorer takes it
    saved = registry.saved_kind(path)
    if saved is None:
        raise UserError(f"{scorer}: not a raykd model (no raykd_model.json) and not a Hugging Face "
                        f"sequence-classification checkpoint; give a folder written by `raykd train`, a "
                        f"cross-encoder, or KIND:PATH ({', '.join(KINDS)})")
    if saved not in SAVED_KINDS:
        raise UserError(f"{scorer}: saved model kind {saved!r} is unknown; known: {', '.join(sorted(SAVED_KINDS))}")
    return TeacherSpec(SAVED_KINDS[saved], scorer)


def load_pair_tokenizer(spec: TeacherSpec | str, query_max_length: int | None = None,
                        passage_max_length: int | None = None, **options: Any) -> Any:
    """What CPU tokenising needs of ``spec``: an object with the ``tokenize_unpadded`` of
    :func:`load_teacher`'s scorer. A cross-encoder's tokenizer alone and BM25's (the texts) load no weights;
    the other kinds tokenise through their model, so the scorer itself is loaded (on the CPU)."""
    from raykd.models.cross_encoder import CrossEncoderTokenizer
    from raykd.models.released import released_layout

    spec = parse_teacher(spec) if isinstance(spec, str) else spec
    if spec.kind == "bm25":
        return BM25Scorer("bm25", "", None)
    if spec.kind == "cat" and released_layout(_local(spec.path)) is None:
        return CrossEncoderTokenizer.from_pretrained(_local(spec.path), query_max_length, passage_max_length)
    return load_teacher(spec, query_max_length, passage_max_length, **options)


def load_teacher(spec: TeacherSpec | str, query_max_length: int | None = None, passage_max_length: int | None = None,
                 *, store: str | None = None, corpus: Sequence[str] | None = None, pooling: str | None = None,
                 normalize: bool | None = None, template: str | None = None, yes_token: str | None = None,
                 no_token: str | None = None, bm25_params: Any = None) -> PairScorer:
    """The teacher ``spec`` (a :class:`TeacherSpec` or its string) as a :class:`PairScorer` in eval mode on the
    CPU. Max lengths: the arguments, else the checkpoint's own, else its kind's defaults. ``store``/``corpus``:
    the corpus whose statistics a bm25 teacher uses. ``pooling``/``normalize``: a plain HF bi-encoder's.
    ``template``/``yes_token``/``no_token``: an LLM's (else its ``raykd_llm.json``, else Qwen3-Reranker's)."""
    from raykd.models import registry
    from raykd.models.released import load_released

    spec = parse_teacher(spec) if isinstance(spec, str) else spec
    qlen, plen = query_max_length, passage_max_length
    if spec.kind == "bm25":
        return _load_bm25(store, corpus, bm25_params)
    path = _local(spec.path)
    if spec.kind == "llm":
        return _load_llm(path, qlen, plen, template, yes_token, no_token)
    layout, saved = _folder_kind(spec, path)
    if layout is not None:
        model = load_released(path, qlen, plen, require_head=True)
        return TokenizerScorer(spec.kind, path, model, model.tokenizer.pad_token_id or 0)
    if spec.kind == "cat":
        from raykd.models.cross_encoder import CrossEncoder

        model = CrossEncoder.from_pretrained(path, qlen, plen, attn_implementation="sdpa", require_head=True)
        return TokenizerScorer("cat", path, model.eval(), model.tokenizer.pad_token_id or 0)
    opts = {"query_max_length": qlen, "passage_max_length": plen}
    if spec.kind == "dot" and saved is None:
        st = _st_pooling(path) if os.path.isdir(path) else {}
        opts.update(pooling=pooling or st.get("pooling"),
                    normalize=normalize if normalize is not None else st.get("normalize"))
    model = registry.load_encoder(path, **opts) if spec.kind == "dot" else registry.load_scorer(path, **opts)
    return StudentScorer(spec.kind, path, model.eval(), model.tokenizer.pad_token_id or 0)


def _folder_kind(spec: TeacherSpec, path: str) -> tuple[str | None, str | None]:
    """(released layout, raykd saved kind) of the folder of a non-bm25, non-llm teacher, refusing a folder of
    another kind and a raykd student whose scoring head's file is missing (no weights are read)."""
    from raykd.models import registry
    from raykd.models.released import released_layout

    layout = released_layout(path)
    want = {"cat": "bert_cat", "colbert": "colbert", "prettr": "prettr"}.get(spec.kind)
    if layout is not None:
        if layout != want:
            raise UserError(f"teacher {spec}: the folder holds a released {layout} checkpoint; give "
                            f"`{ {'bert_cat': 'cat'}.get(layout, layout)}:{spec.path}`")
        return layout, None
    saved = registry.saved_kind(path) if os.path.isdir(path) else None
    if spec.kind == "cat":
        return None, saved
    if spec.kind == "dot":
        if saved not in (None, "bert_dot", "tct"):
            raise UserError(f"teacher {spec}: the folder holds a raykd {saved!r} model, not a bi-encoder")
        return None, saved
    if saved != spec.kind:
        raise UserError(f"teacher {spec}: not a trained raykd {spec.kind} model (its folder says "
                        f"{saved or 'no raykd kind'}){' nor a released checkpoint' if want else ''}")
    if spec.kind == "colbert":
        from raykd.models.colbert import LINEAR_FILE

        _require_head_file(path, LINEAR_FILE, "ColBERT's projection")
    elif spec.kind == "prettr":
        from raykd.models.prettr import HEAD_FILE

        _require_head_file(path, HEAD_FILE, "PreTTR's scoring layer")
    return None, saved


def check_teacher(spec: TeacherSpec | str, query_max_length: int | None = None,
                  passage_max_length: int | None = None, *, store: str | None = None,
                  corpus: Sequence[str] | None = None, template: str | None = None, yes_token: str | None = None,
                  no_token: str | None = None, **_: Any) -> None:
    """Refuse, without loading any weights, what :func:`load_teacher` would refuse: a missing folder, a folder of
    another kind, a checkpoint whose scoring weights are missing (a teacher must be a teacher; the message names
    the folder and the weights), a bm25 teacher without a corpus, an LLM prompt without ``{query}``/``{passage}``
    or answers that are not single tokens. What a hub name holds is checked when it is loaded."""
    from raykd.models.cross_encoder import (
        CrossEncoderTokenizer,
        _checkpoint_keys,
        missing_teacher_weights,
        no_head_message,
    )
    from raykd.models.released import HEADS

    spec = parse_teacher(spec) if isinstance(spec, str) else spec
    if spec.kind == "bm25":
        if not store and corpus is None:
            raise UserError("a bm25 teacher needs the text store whose corpus statistics it scores with")
        return
    path = _local(spec.path)
    if spec.kind == "llm":
        settings = _llm_settings(path, query_max_length, passage_max_length, template, yes_token, no_token)
        LLMReranker._split(settings["template"])
        tokenizer = _llm_tokenizer(path)
        for answer in ("yes_token", "no_token"):
            answer_token_id(tokenizer, settings[answer])
        return
    layout, _ = _folder_kind(spec, path)
    if layout is not None:
        missing = [k for k in HEADS[layout] if k not in (_checkpoint_keys(path) or ())]
        if missing:
            raise UserError(f"teacher {path} has no trained scoring head: its weights lack {', '.join(missing)}. "
                            f"A teacher's scores would come from a random layer")
    elif spec.kind == "cat":
        CrossEncoderTokenizer.from_pretrained(path, query_max_length, passage_max_length)
        missing = missing_teacher_weights(path)
        if missing:
            raise UserError(no_head_message(spec.path, missing))


#: the load options (:func:`load_teacher`'s keyword arguments) each kind takes from ``--teacher-option``
KIND_OPTIONS = {"dot": ("pooling", "normalize"), "llm": ("template", "yes_token", "no_token")}


def teacher_options(specs: Sequence[TeacherSpec], names: Sequence[str], options: dict[str, Any],
                    store: str | None = None) -> list[dict[str, Any]]:
    """Each teacher's :func:`load_teacher` options from ``KEY=VALUE`` options given once for the ensemble: a
    ``KEY`` goes to every teacher whose kind takes it (:data:`KIND_OPTIONS`), ``NAME.KEY`` to the teacher
    ``NAME`` only; a bm25 teacher gets ``store``. A key no teacher takes is refused."""
    out: list[dict[str, Any]] = [{"store": store} if s.kind == "bm25" else {} for s in specs]
    known = sorted({k for ks in KIND_OPTIONS.values() for k in ks})
    for key, value in (options or {}).items():
        who, dot, opt = str(key).rpartition(".")
        if opt not in known:
            raise UserError(f"unknown teacher option {key!r}; known: {', '.join(known)} (as KEY or TEACHER.KEY)")
        if dot and who not in names:
            raise UserError(f"teacher option {key!r}: no teacher is named {who!r}; teachers: {', '.join(names)}")
        took = [i for i, (s, n) in enumerate(zip(specs, names)) if (not dot or n == who)
                and opt in KIND_OPTIONS.get(s.kind, ())]
        if not took:
            kinds = [k for k, ks in KIND_OPTIONS.items() if opt in ks]
            raise UserError(f"teacher option {key!r} applies to {' / '.join(kinds)} teachers, and "
                            f"{'teacher ' + who + ' is not one' if dot else 'none is given'}")
        want = bool if opt == "normalize" else str
        if not isinstance(value, want):
            raise UserError(f"teacher option {key!r} must be a {want.__name__}, got {value!r} (a command-line VALUE "
                            f"is read as YAML, where yes/no/on/off are booleans and 'a: b' a mapping: quote it, "
                            f"{key}='\"...\"')")
        for i in took:
            out[i][opt] = value
    return out
