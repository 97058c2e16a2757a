"""The students: shapes, score semantics, one-pass triple scoring, save/load round trips, the registry."""

from __future__ import annotations

import pytest
import torch

from raykd.errors import UserError
from raykd.models.base import interleave_triples, tokenize_triples
from raykd.models.registry import load_scorer, load_student

torch.set_num_threads(1)

Q = ["bafa kela", "nopo rika suta"]
POS = ["bafa kela zuzu mumu", "nopo rika suta tata tata kiki"]
NEG = ["mumu", "tata kiki bafa"]

STUDENTS = [
    ("bert_dot", "bert", {}),
    ("bert_dot", "distilbert", {"pooling": "mean"}),
    ("colbert", "bert", {"dim": 16}),
    ("prettr", "bert", {"split_layer": 1}),
    ("prettr", "distilbert", {"split_layer": 1}),
    ("tk", "bert", {}),
    ("bert_cat", "bert", {}),
]


@pytest.fixture(params=STUDENTS, ids=[f"{k}-{a}" for k, a, _ in STUDENTS])
def student(request, tiny_models):
    kind, arch, opts = request.param
    torch.manual_seed(0)
    model = load_student(kind, tiny_models(arch, "encoder"), **opts)
    model.eval()
    return kind, model


def test_triples_in_one_pass_match_pairwise_scores(student):
    kind, model = student
    with torch.no_grad():
        scores = model(**tokenize_triples(model, Q, POS, NEG))
        assert scores.shape == (2 * len(Q),)
        both = scores.view(len(Q), 2)
        pos = model.score(Q, POS)
        neg = model.score(Q, NEG)
    assert pos.shape == (len(Q),)
    torch.testing.assert_close(both[:, 0], pos, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(both[:, 1], neg, atol=1e-4, rtol=1e-4)


def test_save_load_round_trip(student, tmp_path):
    kind, model = student
    model.save_pretrained(str(tmp_path))
    again = load_scorer(str(tmp_path))
    again.eval()
    assert type(again) is type(model)
    torch.testing.assert_close(again.score(Q, NEG), model.score(Q, NEG))


def test_scores_do_not_depend_on_batch_padding(student):
    """A pair scores the same alone and next to a much longer passage (padding is masked)."""
    kind, model = student
    alone = model.score([Q[0]], [NEG[0]])
    padded = model.score([Q[0], Q[0]], [NEG[0], " ".join(["tata kiki"] * 30)])
    torch.testing.assert_close(padded[:1], alone, atol=1e-4, rtol=1e-4)


def test_bert_dot_is_a_dot_product_of_cls_vectors_and_a_plain_hf_encoder(tiny_models, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    model = load_student("bert_dot", tiny_models("bert", "encoder"))
    model.eval()
    q, p = model.encode_query(Q), model.encode_passage(POS)
    assert q.shape == p.shape == (2, 64)
    torch.testing.assert_close(model.score(Q, POS), (q * p).sum(-1))
    model.save_pretrained(str(tmp_path))
    # what a user does with the folder, knowing nothing of raykd
    hf, tok = AutoModel.from_pretrained(str(tmp_path)), AutoTokenizer.from_pretrained(str(tmp_path))
    hf.eval()
    with torch.no_grad():
        cls = hf(**tok(Q, padding=True, return_tensors="pt")).last_hidden_state[:, 0]
    torch.testing.assert_close(cls, q, atol=1e-5, rtol=1e-5)
    assert not any("pooler" in n for n, _ in model.named_parameters())  # nothing DDP would find unused


def test_in_batch_scores_for_tct_style_losses(tiny_models):
    model = load_student("bert_dot", tiny_models("bert", "encoder"), pooling="mean")
    q, p = interleave_triples(Q, POS, NEG)
    feats = model.tokenize(q, p)
    with torch.no_grad():
        all_pairs = model(**feats, all_pairs=True)
        qe, pe = model(**feats, return_embeddings=True)
    assert all_pairs.shape == (2, 4)
    torch.testing.assert_close(all_pairs, qe @ pe.T)


def test_colbert_is_maxsim_over_normalised_128_dim_token_vectors(tiny_models):
    model = load_student("colbert", tiny_models("bert", "encoder"))
    model.eval()
    t = model.tokenize(["bafa kela"], ["bafa kela zuzu"])
    with torch.no_grad():
        qv = model.embed(t["query_input_ids"], t["query_attention_mask"])[0]
        pv = model.embed(t["passage_input_ids"], t["passage_attention_mask"])[0]
        score = model(**t)
    assert qv.shape[-1] == 128
    torch.testing.assert_close(qv.norm(dim=-1), torch.ones(qv.shape[0]))
    torch.testing.assert_close(score, (qv @ pv.T).max(1).values.sum()[None])


def test_prettr_passage_lower_layers_do_not_see_the_query(tiny_models):
    model = load_student("prettr", tiny_models("bert", "encoder", layers=3), split_layer=2)
    model.eval()
    a = model.tokenize([Q[0]], [POS[0]])
    b = model.tokenize([Q[1]], [POS[0]])
    with torch.no_grad():
        la = model.encode_passage_lower(a["passage_input_ids"], a["passage_attention_mask"])
        lb = model.encode_passage_lower(b["passage_input_ids"], b["passage_attention_mask"])
        assert not torch.allclose(model(**a), model(**b))
    torch.testing.assert_close(la, lb)
    with pytest.raises(ValueError, match="split_layer must be between 1 and 2"):
        load_student("prettr", tiny_models("bert", "encoder", layers=3), split_layer=3)


def test_tk_starts_from_the_init_models_word_embeddings(tiny_models):
    from transformers import AutoModel

    path = tiny_models("bert", "encoder")
    tk = load_student("tk", path)
    torch.testing.assert_close(tk.embeddings.weight, AutoModel.from_pretrained(path).get_input_embeddings().weight)
    # the score is TK's kernel pooling, computed here by hand from the contextualised vectors
    tk.eval()
    t = tk.tokenize(["bafa kela"], ["bafa zuzu kela mumu"])
    with torch.no_grad():
        q = tk.contextualize(t["query_input_ids"], t["query_attention_mask"])[0]
        p = tk.contextualize(t["passage_input_ids"], t["passage_attention_mask"])[0]
        score = tk(**t)
    cos = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(p, dim=-1).T
    mus = torch.tensor(tk.mus)
    k = torch.exp(-((cos[..., None] - mus) ** 2) / (2 * 0.1**2)).sum(1)  # (query terms, kernels)
    log_pool = (torch.log(k.clamp(min=1e-10)) * 0.01).sum(0)
    len_pool = (torch.log((k / p.shape[0]).clamp(min=1e-10)) * 0.01).sum(0)
    w = tk.dense_comb.weight[0]
    expected = w[0] * (tk.dense_log.weight[0] @ log_pool) + w[1] * (tk.dense_len.weight[0] @ len_pool)
    torch.testing.assert_close(score, expected[None].detach(), atol=1e-5, rtol=1e-5)


def test_unknown_student_and_missing_init_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="unknown student 'bert_dott'; known students: bert_cat, bert_dot, colbert, prettr, .*tk"):
        load_student("bert_dott", "x")
    with pytest.raises(UserError, match="does not exist"):
        load_student("bert_dot", str(tmp_path / "nope"))
    with pytest.raises(UserError, match="not a raykd model"):
        (tmp_path / "empty").mkdir()
        load_scorer(str(tmp_path / "empty"))


def test_load_scorer_opens_a_plain_hf_cross_encoder_as_bert_cat(tiny_models):
    from raykd.models.cross_encoder import CrossEncoder

    assert isinstance(load_scorer(tiny_models("bert", "cross_encoder")), CrossEncoder)
