"""Teachers of every kind (raykd.models.teachers): each scored through the score stage's batch function equals a
plain transformers forward pass, or the published model code's formula, on the same pairs (to 1e-4)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from raykd.errors import UserError
from raykd.models.teachers import TeacherSpec, load_teacher, parse_teacher

QUERIES = ["what is the capital of france", "ray distributed computing", "cat on the mat"]
PASSAGES = ["paris is the capital of france and a big city", "ray is a framework for distributed computing jobs",
            "the dog sat near the door"]
TEXTS = QUERIES + PASSAGES + ["yes", "no", "query passage relevant answer document"] * 5
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=128)


def test_parse_teacher_prefix_rule():
    assert parse_teacher("org/model") == TeacherSpec("cat", "org/model")
    assert parse_teacher("s3://bucket/m") == TeacherSpec("cat", "s3://bucket/m")
    assert parse_teacher("colbert:/m") == TeacherSpec("colbert", "/m")
    assert parse_teacher("llm:Qwen/Qwen3-Reranker-0.6B") == TeacherSpec("llm", "Qwen/Qwen3-Reranker-0.6B")
    assert parse_teacher("bm25") == parse_teacher("bm25:") == TeacherSpec("bm25", "")
    assert parse_teacher("file:///x/y") == TeacherSpec("cat", "file:///x/y")
    with pytest.raises(UserError, match="no model path"):
        parse_teacher("bm25:/x")
    with pytest.raises(UserError, match="needs a model"):
        parse_teacher("dot:")


# ------------------------------------------------------------------------------------------------ tokenizers
def _wordpiece(out: str, cls=None):
    from transformers import BertTokenizer

    from raykd.tiny import vocabulary

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "vocab.txt"), "w") as f:
        f.write("\n".join(vocabulary()) + "\n")
    return (cls or BertTokenizer)(os.path.join(out, "vocab.txt"))


def _trained(model, pre, trainer):
    from tokenizers import Tokenizer

    tk = Tokenizer(model)
    tk.pre_tokenizer = pre
    tk.train_from_iterator(TEXTS * 3, trainer)
    return json.loads(tk.to_str())["model"]


def _unigram(cls, specials):
    from tokenizers import models, pre_tokenizers, trainers

    m = _trained(models.Unigram(), pre_tokenizers.Metaspace(),
                 trainers.UnigramTrainer(vocab_size=150, special_tokens=specials, unk_token=specials[1]))
    return cls(vocab=[tuple(v) for v in m["vocab"]])


def _bpe(specials):
    from tokenizers import models, pre_tokenizers, trainers

    m = _trained(models.BPE(), pre_tokenizers.ByteLevel(add_prefix_space=False),
                 trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    merges = [tuple(x) if isinstance(x, list) else tuple(x.split(" ")) for x in m["merges"]]
    return m["vocab"], merges


def _cross_encoder(tmp_path, family: str, num_labels: int = 1) -> str:
    import transformers as tf

    out = str(tmp_path / family)
    if family in ("bert", "electra", "distilbert"):
        tok = _wordpiece(out, tf.DistilBertTokenizer if family == "distilbert" else None)
    elif family == "roberta":
        vocab, merges = _bpe(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
        tok = tf.RobertaTokenizer(vocab=vocab, merges=merges)
    elif family == "xlm-roberta":
        tok = _unigram(tf.XLMRobertaTokenizer, ["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    elif family == "albert":
        tok = _unigram(tf.AlbertTokenizer, ["<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"])
    else:  # deberta-v2 / v3
        tok = _unigram(tf.DebertaV2Tokenizer, ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    common = dict(vocab_size=len(tok), num_labels=num_labels, pad_token_id=tok.pad_token_id)
    cfg = {
        "bert": lambda: tf.BertConfig(**TINY, **common),
        "electra": lambda: tf.ElectraConfig(embedding_size=16, **TINY, **common),
        "distilbert": lambda: tf.DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, **common),
        # type_vocab_size 1, as in the released RoBERTa / XLM-R checkpoints (no segment embeddings to use)
        "roberta": lambda: tf.RobertaConfig(**{**TINY, "max_position_embeddings": 130}, **common, type_vocab_size=1),
        "xlm-roberta": lambda: tf.XLMRobertaConfig(**{**TINY, "max_position_embeddings": 130}, **common,
                                                   type_vocab_size=1),
        "albert": lambda: tf.AlbertConfig(embedding_size=16, **TINY, **common),
        "deberta-v2": lambda: tf.DebertaV2Config(**TINY, **common, type_vocab_size=0, relative_attention=True,
                                                 position_biased_input=False, pos_att_type=["p2c", "c2p"],
                                                 position_buckets=16, norm_rel_ebd="layer_norm", share_att_key=True),
    }[family]()
    torch.manual_seed(0)
    tf.AutoModelForSequenceClassification.from_config(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.parametrize("family,labels", [("bert", 1), ("distilbert", 1), ("albert", 1), ("electra", 2),
                                           ("roberta", 1), ("xlm-roberta", 2), ("deberta-v2", 1)])
def test_cross_encoder_families_equal_a_plain_forward(tmp_path, family, labels):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = _cross_encoder(tmp_path, family, labels)
    teacher = load_teacher(f"cat:{path}")
    feats = teacher.tokenize_unpadded(QUERIES, PASSAGES)
    segment_free = family in ("distilbert", "roberta", "xlm-roberta")
    assert ("token_type_ids" in feats) is not segment_free
    got = teacher.score_features(feats, batch_size=2).scores
    tok = AutoTokenizer.from_pretrained(path)
    ref_model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        # ALBERT was trained with segment ids; transformers 5's ALBERT tokenizer stops returning them unasked
        enc = tok(QUERIES, PASSAGES, padding=True, return_tensors="pt", return_token_type_ids=not segment_free)
        logits = ref_model(**enc).logits
    np.testing.assert_allclose(got, logits[:, labels - 1].numpy(), atol=1e-4)


def test_headless_cross_encoder_is_refused(tmp_path):
    from raykd.tiny import build_tiny_model

    path = build_tiny_model(str(tmp_path / "enc"), head="encoder", hidden=32, intermediate=64)
    with pytest.raises(UserError, match=r"enc has no trained scoring head: its weights lack classifier"):
        load_teacher(path)


# ------------------------------------------------------------------------------------------------ students
@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from raykd.tiny import build_tiny_model

    return build_tiny_model(str(tmp_path_factory.mktemp("init") / "bert"), hidden=32, intermediate=64, dropout=0.0)


@pytest.mark.parametrize("kind,student,opts", [("dot", "bert_dot", {}), ("dot", "tct", {}),
                                               ("colbert", "colbert", {"dim": 16}),
                                               ("prettr", "prettr", {"split_layer": 1}),
                                               ("tk", "tk", {"embedding_dim": None})])
def test_raykd_students_as_teachers_equal_their_own_score(tmp_path, tiny_bert, kind, student, opts):
    from raykd.models.registry import load_student

    torch.manual_seed(0)
    model = load_student(student, tiny_bert, **opts).eval()
    out = str(tmp_path / student)
    model.save_pretrained(out)
    teacher = load_teacher(f"{kind}:{out}")
    got = teacher.score_pairs(QUERIES, PASSAGES, batch_size=2)
    with torch.no_grad():
        ref = torch.stack([model.score([q], [p])[0] for q, p in zip(QUERIES, PASSAGES)]).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4)


def test_colbert_without_projection_is_refused(tmp_path, tiny_bert):
    from raykd.models.colbert import LINEAR_FILE
    from raykd.models.registry import load_student

    out = str(tmp_path / "cb")
    load_student("colbert", tiny_bert, dim=16).save_pretrained(out)
    os.remove(os.path.join(out, LINEAR_FILE))
    with pytest.raises(UserError, match=f"cb has no trained scoring head: its weights lack {LINEAR_FILE}"):
        load_teacher(f"colbert:{out}")


def test_sentence_transformers_bi_encoder_mean_pooling_normalised(tmp_path, tiny_bert):
    import shutil

    from transformers import AutoModel, AutoTokenizer

    out = str(tmp_path / "st")
    shutil.copytree(tiny_bert, out)
    os.makedirs(os.path.join(out, "1_Pooling"))
    with open(os.path.join(out, "1_Pooling", "config.json"), "w") as f:
        json.dump({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False}, f)
    with open(os.path.join(out, "modules.json"), "w") as f:
        json.dump([{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                   {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}], f)
    got = load_teacher(f"dot:{out}").score_pairs(QUERIES, PASSAGES)
    tok, enc = AutoTokenizer.from_pretrained(out), AutoModel.from_pretrained(out).eval()

    def embed(texts):
        t = tok(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            h = enc(**t).last_hidden_state
        m = t["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)

    np.testing.assert_allclose(got, (embed(QUERIES) * embed(PASSAGES)).sum(-1).numpy(), atol=1e-4)


# ------------------------------------------------------------------------------------------------ released
@pytest.fixture(scope="module")
def distilbert_base(tmp_path_factory):
    from transformers import DistilBertConfig, DistilBertModel, DistilBertTokenizer

    out = str(tmp_path_factory.mktemp("released") / "distilbert-base")
    tok = _wordpiece(out, DistilBertTokenizer)
    torch.manual_seed(0)
    enc = DistilBertModel(DistilBertConfig(vocab_size=len(tok), dim=32, n_layers=2, n_heads=2, hidden_dim=64)).eval()
    enc.save_pretrained(out)
    tok.save_pretrained(out)
    return out, enc, tok


def _released(tmp_path, name: str, config: dict, state: dict, binary: bool = False) -> str:
    out = str(tmp_path / name)
    os.makedirs(out)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f)
    state = {k: v.contiguous() for k, v in state.items()}
    if binary:
        torch.save(state, os.path.join(out, "pytorch_model.bin"))
    else:
        from safetensors.torch import save_file

        save_file(state, os.path.join(out, "model.safetensors"))
    return out


def _pairs(tok, masks=8):
    q = [tok(x)["input_ids"] + [tok.mask_token_id] * masks for x in QUERIES]
    return q, [tok(x)["input_ids"] for x in PASSAGES]


def test_released_bert_cat_scores_as_its_model_code(tmp_path, distilbert_base):
    base, enc, tok = distilbert_base
    head = torch.nn.Linear(32, 1)
    state = {"bert_model." + k: v for k, v in enc.state_dict().items()}
    state.update({"_classification_layer." + k: v for k, v in head.state_dict().items()})
    path = _released(tmp_path, "bert_cat", {"model_type": "BERT_Cat", "architectures": ["BERT_Cat"],
                                             "bert_model": base, "trainable": True}, state, binary=True)
    got = load_teacher(path).score_pairs(QUERIES, PASSAGES, batch_size=2)
    with torch.no_grad():  # DistilBERT: the last layer's CLS vector -> the linear layer
        t = tok(QUERIES, PASSAGES, padding=True, return_tensors="pt")
        ref = head(enc(**t)[0][:, 0]).squeeze(-1).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4)
    del state["_classification_layer.weight"], state["_classification_layer.bias"]
    headless = _released(tmp_path, "bert_cat_headless", {"model_type": "BERT_Cat", "bert_model": base}, state)
    with pytest.raises(UserError, match="bert_cat_headless has no trained scoring head.*_classification_layer.weight"):
        load_teacher(f"cat:{headless}")


def test_released_colbert_scores_as_its_model_code(tmp_path, distilbert_base):
    base, enc, tok = distilbert_base
    comp = torch.nn.Linear(32, 16)
    state = {"bert_model." + k: v for k, v in enc.state_dict().items()}
    state.update({"compressor." + k: v for k, v in comp.state_dict().items()})
    path = _released(tmp_path, "colbert", {"model_type": "ColBERT", "bert_model": base, "compression_dim": 16,
                                            "dropout": 0.0, "return_vecs": False, "trainable": True}, state)
    got = load_teacher(f"colbert:{path}").score_pairs(QUERIES, PASSAGES, batch_size=3)
    qs, ps = _pairs(tok)
    ref = []
    with torch.no_grad():  # the usage notebook: one pair at a time, 8 [MASK]s after the query, dot products
        for q, p in zip(qs, ps):
            qv, pv = comp(enc(torch.tensor([q]))[0])[0], comp(enc(torch.tensor([p]))[0])[0]
            ref.append((qv @ pv.T).max(-1).values.sum())
    np.testing.assert_allclose(got, torch.stack(ref).numpy(), atol=1e-4)
    with pytest.raises(UserError, match="give `colbert:"):
        load_teacher(f"cat:{path}")


def test_released_prettr_scores_as_its_model_code(tmp_path, distilbert_base):
    base, enc, tok = distilbert_base
    head = torch.nn.Linear(32, 1, bias=False)
    cfg = {**enc.config.to_dict(), "architectures": ["PreTTR"], "join_layer_idx": 1}
    state = {**enc.state_dict(), "_classification_layer.weight": head.weight}
    path = _released(tmp_path, "prettr", cfg, state)
    import shutil

    for f in os.listdir(base):
        if f.startswith(("tokenizer", "vocab", "special")):
            shutil.copy(os.path.join(base, f), path)
    got = load_teacher(f"prettr:{path}").score_pairs(QUERIES, PASSAGES, batch_size=2)
    qs, ps = _pairs(tok)
    layers, emb = enc.transformer.layer, enc.embeddings

    def run(layer, h):
        out = layer(h)
        return out[0] if isinstance(out, tuple) else out

    ref = []
    with torch.no_grad():  # one pair, no padding: q and p[1:] apart through layer 1, joined through layer 2
        for q, p in zip(qs, ps):
            q, d = torch.tensor([q]), torch.tensor([p[1:]])
            hq = emb.LayerNorm(emb.word_embeddings(q) + emb.position_embeddings(torch.arange(q.shape[1])))
            hd = emb.LayerNorm(emb.word_embeddings(d) + emb.position_embeddings(torch.arange(d.shape[1]) + q.shape[1]))
            h = run(layers[1], torch.cat([run(layers[0], hq), run(layers[0], hd)], 1))
            ref.append(head(h[:, 0])[0, 0])
    np.testing.assert_allclose(got, torch.stack(ref).numpy(), atol=1e-4)


# ------------------------------------------------------------------------------------------------ LLM
@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer

    out = str(tmp_path_factory.mktemp("llm") / "qwen2")
    vocab, merges = _bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=512, tie_word_embeddings=True)).eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out, model, tok


def test_llm_teacher_is_the_yes_no_log_odds(tiny_llm):
    path, model, tok = tiny_llm
    template = "Query: {query}\nPassage: {passage}\nRelevant (yes or no):\n"
    teacher = load_teacher(f"llm:{path}", template=template)
    yes, no = tok.encode("yes", add_special_tokens=False), tok.encode("no", add_special_tokens=False)
    assert len(yes) == len(no) == 1
    ref = []
    with torch.no_grad():  # by hand: pieces and texts tokenised apart, one pair, no padding
        for q, p in zip(QUERIES, PASSAGES):
            ids = (tok.encode("Query: ", add_special_tokens=False) + tok.encode(q, add_special_tokens=False)
                   + tok.encode("\nPassage: ", add_special_tokens=False) + tok.encode(p, add_special_tokens=False)
                   + tok.encode("\nRelevant (yes or no):\n", add_special_tokens=False))
            logits = model(torch.tensor([ids])).logits[0, -1]
            ref.append(float(logits[yes[0]] - logits[no[0]]))
    feats = teacher.tokenize_unpadded(QUERIES, PASSAGES)
    for bucket in (True, False):
        for bs in (1, 2, 3):
            got = teacher.score_features(feats, batch_size=bs, bucket=bucket).scores
            np.testing.assert_allclose(got, ref, atol=1e-4)


def test_llm_default_prompt_is_qwen3_reranker(tiny_llm):
    path, _, tok = tiny_llm
    teacher = load_teacher(f"llm:{path}")
    ids = teacher.tokenize_unpadded(QUERIES[:1], PASSAGES[:1])["input_ids"][0]
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\nJudge whether the Document") and "<Query>: " + QUERIES[0] in text
    assert np.isfinite(teacher.score_pairs(QUERIES, PASSAGES)).all()


# ------------------------------------------------------------------------------------------------ BM25 + ensemble
def test_bm25_teacher_equals_bm25_search_scores():
    from raykd.bm25 import BM25Index

    corpus = PASSAGES + ["france has many cities", "a framework is software"]
    ids, scores = BM25Index().index(corpus, np.arange(len(corpus))).search(QUERIES, k=len(corpus))
    teacher = load_teacher("bm25", corpus=corpus)
    for i, q in enumerate(QUERIES):
        got = teacher.score_pairs([q] * len(corpus), [corpus[j] for j in ids[i]])
        np.testing.assert_allclose(got, scores[i], atol=1e-5)


def test_mixed_ensemble_with_zscore(tmp_path, tiny_bert):
    from raykd.ensemble import ScoreStats, ensemble

    cat = load_teacher(_cross_encoder(tmp_path, "bert"))
    dot = load_teacher(f"dot:{tiny_bert}")
    bm25 = load_teacher("bm25", corpus=PASSAGES)
    scores = {t.kind: t.score_pairs(QUERIES, PASSAGES) for t in (cat, dot, bm25)}
    stats = {k: ScoreStats.of(v) for k, v in scores.items()}
    got = ensemble(scores, [1.0, 1.0, 2.0], "zscore", stats)
    z = {k: (v - v.mean()) / v.std() for k, v in ((k, v.astype(np.float64)) for k, v in scores.items())}
    np.testing.assert_allclose(got, (z["cat"] + z["dot"] + 2 * z["bm25"]) / 4, atol=1e-5)


# ------------------------------------------------------------------------------------------------ stage options
def test_teacher_options_go_to_the_kinds_that_take_them():
    from raykd.models.teachers import teacher_options

    specs = [parse_teacher(t) for t in ("/m/a", "llm:/m/q", "llm:/m/r", "dot:/m/d", "bm25")]
    names = ["a", "q", "r", "d", "bm25"]
    got = teacher_options(specs, names, {"template": "T {query} {passage}", "r.yes_token": "ja", "pooling": "mean"},
                          store="/s")
    assert got == [{}, {"template": "T {query} {passage}"}, {"template": "T {query} {passage}", "yes_token": "ja"},
                   {"pooling": "mean"}, {"store": "/s"}]
    with pytest.raises(UserError, match="unknown teacher option 'temperature'"):
        teacher_options(specs, names, {"temperature": 1})
    with pytest.raises(UserError, match="no teacher is named 'x'"):
        teacher_options(specs, names, {"x.template": "t"})
    with pytest.raises(UserError, match="applies to dot teachers, and teacher a is not one"):
        teacher_options(specs, names, {"a.pooling": "cls"})


def test_check_teacher_refuses_a_bad_llm_prompt_without_loading_it(tiny_llm):
    from raykd.models.teachers import check_teacher

    path = tiny_llm[0]
    check_teacher(f"llm:{path}", template="Q: {query} P: {passage} ?")
    with pytest.raises(UserError, match=r"needs \{query\} and \{passage\}"):
        check_teacher(f"llm:{path}", template="Q: {query}")
    with pytest.raises(UserError, match="must be a string"):
        check_teacher(f"llm:{path}", template={"Q": "{query}"})
    with pytest.raises(UserError, match="needs the text store"):
        check_teacher("bm25")
