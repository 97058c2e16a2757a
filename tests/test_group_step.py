"""The group training step (listwise losses) on a tiny real student: triples as groups of 1+1, mined groups of
1+k, teacher score matrices, InfoNCE with in-batch negatives; the calls the training loop makes."""

from __future__ import annotations

import pytest
import torch

from raykd.errors import UserError
from raykd.losses import get_loss, infonce, listwise_kl
from raykd.models.registry import load_student
from raykd.stages.train_steps import BatchContext, GroupStep, train_step

QUERIES = ["what is a cell", "how do proteins fold"]
POSITIVES = ["a cell is the unit of life", "proteins fold into shapes"]
NEGATIVES = [["the sky is blue", "rivers flow"], ["cats sleep a lot", "a cell phone"]]


@pytest.fixture(scope="module")
def student(tiny_models):
    torch.manual_seed(0)
    return load_student("bert_dot", tiny_models("bert", "encoder"))


def _run(step, model, negatives, **batch):
    ctx = BatchContext(device=torch.device("cpu"), options=batch.pop("options", {}))
    step.setup(ctx)
    features = step.features(model, QUERIES, POSITIVES, negatives)
    return step.loss(model, {"features": features, "size": len(QUERIES), **batch}, ctx)


def test_group_step_scores_groups_in_one_pass_and_calls_the_loss(student):
    step = train_step(get_loss("listwise_kl"))
    assert isinstance(step, GroupStep)
    teacher = torch.tensor([[3.0, 0.0, 1.0], [2.0, 1.0, 0.5]])
    loss, stats = _run(step, student, NEGATIVES, teacher_scores=teacher, options={"temperature": 2.0})
    features = step.features(student, QUERIES, POSITIVES, NEGATIVES)
    with torch.no_grad():
        own = student(**features).view(2, 3)
    assert loss.item() == pytest.approx(listwise_kl(own, teacher, temperature=2.0).item(), rel=1e-5)
    assert 0.0 <= stats["pair_accuracy"] <= 1.0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    student.zero_grad()


def test_triples_are_groups_of_one_plus_one(student):
    step = train_step(get_loss("nway_margin_mse"))
    loss, _ = _run(step, student, ["the sky is blue", "cats sleep a lot"],
                   teacher_pos=torch.tensor([2.0, 1.0]), teacher_neg=torch.tensor([0.0, 0.5]))
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="same number of negatives"):
        step.features(student, QUERIES, POSITIVES, [["a"], ["b", "c"]])


def test_infonce_in_batch_and_hard_negatives_only(student):
    step = train_step(get_loss("infonce"))
    with_batch, _ = _run(step, student, NEGATIVES)
    own_only, _ = _run(step, student, NEGATIVES, options={"in_batch": False})
    q, p = student(**step.features(student, QUERIES, POSITIVES, NEGATIVES), return_embeddings=True)
    scores = q @ p.T  # (2, 6): each query against all six passages, positives at columns 0 and 3
    assert with_batch.item() == pytest.approx(infonce(scores, torch.tensor([0, 3])).item(), rel=1e-5)
    assert with_batch.item() >= own_only.item() - 1e-6  # more negatives, never an easier task


def test_infonce_in_batch_needs_a_bi_encoder(tiny_models):
    colbert = load_student("colbert", tiny_models("bert", "encoder"))
    with pytest.raises(UserError, match="single-vector bi-encoder"):
        _run(train_step(get_loss("infonce")), colbert, NEGATIVES)
