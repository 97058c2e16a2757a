"""One dense encoder: the vectors a trained student's validation computes are the vectors `raykd index` writes
and `raykd search` encodes queries into, for BERT_DOT and for the TCT student (its own input format).

The student is saved and reopened the way training does it (``save_pretrained`` into the checkpoint's
``model/`` folder, ``load_scorer`` to reopen), validation's candidates come from the train stage's
``validation_set``, and validation's vectors from the student's own forward pass as ``mrr_at_10`` calls it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raykd import dense_index as dx
from raykd.encoders import DenseEncoder, EncoderSpec
from raykd.models.registry import load_scorer, load_student
from raykd.stages.index import IndexConfig, index
from raykd.stages.train import TrainConfig, mrr_at_10, validation_set

torch.set_num_threads(1)


@pytest.mark.slow
@pytest.mark.parametrize("kind, options", [("bert_dot", {}), ("bert_dot", {"pooling": "mean", "normalize": True}),
                                           ("tct", {})], ids=["bert_dot-cls", "bert_dot-mean-norm", "tct"])
def test_validation_and_index_vectors_are_identical(ray_cluster, sample_store, tiny_models, tmp_path, kind, options):
    torch.manual_seed(0)
    student = load_student(kind, tiny_models("bert", "encoder", seed=3), **options)
    with torch.no_grad():  # not the init's weights: a "trained" student
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    student.save_pretrained(str(tmp_path / "model"))
    student = load_scorer(str(tmp_path / "model")).eval()

    val = validation_set(TrainConfig(data=sample_store, val_queries=5, val_negatives=9, seed=1))
    assert len(val) == 5
    out = str(tmp_path / "index")
    index(IndexConfig(data=sample_store, encoder=str(tmp_path / "model"), shards=2, precision="fp32", out=out))
    di = dx.DenseIndex(out)
    assert di.encoder["kind"] == kind
    pids = di.ids()["pid"].to_numpy()
    vectors = np.concatenate([np.asarray(di.shard_vectors(s)) for s in di.shards])
    row_of = {int(p): i for i, p in enumerate(pids)}
    queries = DenseEncoder(EncoderSpec(**di.encoder), device="cpu")  # what `raykd search` encodes with

    from raykd.formats.store import TextStore

    store = TextStore(sample_store)
    corpus = store.corpus(columns=["pid"])["pid"].to_numpy()
    text_pid = dict(zip(store.passages(corpus), corpus.tolist()))
    for item in val:
        feats = student.tokenize([item["query"]], item["passages"])  # as mrr_at_10 does
        with torch.no_grad():
            q, p = student(**feats, return_embeddings=True)
            scores = student(**feats)
        indexed = vectors[[row_of[text_pid[t]] for t in item["passages"]]]
        np.testing.assert_allclose(indexed, p.numpy(), atol=1e-6, rtol=0)
        searched = queries.encode_queries([item["query"]])
        np.testing.assert_allclose(searched, q.numpy(), atol=1e-6, rtol=0)
        np.testing.assert_allclose(searched @ indexed.T, scores.numpy()[None], atol=1e-5, rtol=1e-6)
    assert 0.0 <= mrr_at_10(student, val) <= 1.0
