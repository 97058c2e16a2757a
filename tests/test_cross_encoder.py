"""BERT_CAT cross-encoder: tokenisation contract, scoring, HF round trip, loading errors (no Ray)."""

from __future__ import annotations

import pytest
import torch

from raykd.errors import UserError
from raykd.models.cross_encoder import CrossEncoder, CrossEncoderTokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def bert_cat(tiny_models):
    return tiny_models("bert", "cross_encoder", seed=3)


def test_tokenize_cuts_query_and_passage_separately(bert_cat):
    m = CrossEncoder.from_pretrained(bert_cat, query_max_length=3, passage_max_length=5)
    tok = m.tokenizer
    q, p = "a b c d e f", "g h i j k l m n"
    enc = m.tokenize_unpadded([q], [p])
    ids = enc["input_ids"][0]
    q_ids = tok(q, add_special_tokens=False)["input_ids"][:3]
    p_ids = tok(p, add_special_tokens=False)["input_ids"][:5]
    assert ids == [tok.cls_token_id, *q_ids, tok.sep_token_id, *p_ids, tok.sep_token_id]
    assert enc["token_type_ids"][0] == [0] * 5 + [1] * 6


def test_collate_pads_to_longest_multiple_of_8(bert_cat):
    m = CrossEncoder.from_pretrained(bert_cat)
    b = m.tokenize(["a", "a b c"], ["x", "x y z w v"])
    assert b["input_ids"].shape[1] % 8 == 0
    assert b["attention_mask"].sum(1).tolist() == [5, 11]


def test_scores_are_independent_of_batch_padding(bert_cat):
    m = CrossEncoder.from_pretrained(bert_cat)
    qs, ps = ["a b", "c d e f g"], ["h i j", "k l m n o p q r s t u v"]
    together = m.score(qs, ps)
    alone = torch.cat([m.score([q], [p]) for q, p in zip(qs, ps)])
    assert together.shape == (2,) and together.dtype == torch.float32
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


def test_save_load_round_trip_is_an_hf_sequence_classifier(bert_cat, tmp_path):
    from transformers import AutoModelForSequenceClassification

    m = CrossEncoder.from_pretrained(bert_cat, query_max_length=7, passage_max_length=9)
    m.save_pretrained(str(tmp_path / "ce"))
    m2 = CrossEncoder.from_pretrained(str(tmp_path / "ce"))
    assert (m2.query_max_length, m2.passage_max_length) == (7, 9)
    torch.testing.assert_close(m.score(["a b"], ["c d"]), m2.score(["a b"], ["c d"]))
    hf = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "ce"))
    assert hf.config.num_labels == 1
    assert m2.model.config._attn_implementation == "sdpa"
    assert CrossEncoderTokenizer.from_pretrained(str(tmp_path / "ce")).passage_max_length == 9


def test_two_label_checkpoint_scores_with_relevant_class_logit(tiny_models, tmp_path):
    from transformers import AutoModelForSequenceClassification

    path = tiny_models("bert", "cross_encoder", seed=4)
    hf = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, ignore_mismatched_sizes=True)
    hf.config.architectures = ["BertForSequenceClassification"]
    hf.save_pretrained(str(tmp_path / "two"))
    CrossEncoder.from_pretrained(path).tokenizer.save_pretrained(str(tmp_path / "two"))
    m = CrossEncoder.from_pretrained(str(tmp_path / "two"))
    assert m.num_labels == 2
    batch = m.tokenize(["a b"], ["c d"])
    with torch.no_grad():
        logits = hf(**batch).logits
    torch.testing.assert_close(m(**batch), logits[:, 1])


def test_distilbert_ignores_segment_ids(tiny_models):
    m = CrossEncoder.from_pretrained(tiny_models("distilbert", "cross_encoder"))
    assert not m.uses_token_type_ids
    assert m.score(["a"], ["b c"]).shape == (1,)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match=r"does not exist"):
        CrossEncoder.from_pretrained(str(tmp_path / "no-such-teacher"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        CrossEncoder.from_pretrained(str(tmp_path / "empty"))


def test_a_teacher_without_a_trained_head_is_refused_naming_folder_and_weights(tiny_models):
    from raykd.models.cross_encoder import missing_teacher_weights

    headless = tiny_models("bert", "encoder", seed=3)
    assert missing_teacher_weights(headless) == ["classifier.weight", "classifier.bias"]
    assert missing_teacher_weights(tiny_models("bert", "cross_encoder", seed=1)) == []
    assert missing_teacher_weights(tiny_models("albert", "cross_encoder", seed=2)) == []
    with pytest.raises(UserError, match=rf"teacher {headless} has no trained scoring head: its weights lack "
                                        r"classifier\.bias, classifier\.weight"):
        CrossEncoder.from_pretrained(headless, require_head=True)
    # a student may start from the same folder: a fresh head, no error
    assert CrossEncoder.from_pretrained(headless).num_labels == 1
