"""The listwise (group) losses against values computed by hand, KL against torch's kl_div, temperature,
shape errors, gradients, and their registry entries."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from raykd.errors import UserError
from raykd.losses import (
    get_loss,
    in_batch_scores,
    infonce,
    listnet,
    listwise_kl,
    margin_mse,
    nway_margin_mse,
)

# two queries, each with its positive (column 0) and two negatives
S = torch.tensor([[2.0, 0.0, 1.0], [0.5, 1.5, -1.0]])
T = torch.tensor([[4.0, 1.0, 3.0], [3.0, 2.0, 0.0]])


def _softmax(row):
    e = [math.exp(x) for x in row]
    return [x / sum(e) for x in e]


def test_listwise_kl_by_hand():
    expected = 0.0
    for s, t in zip(S.tolist(), T.tolist()):
        p, q = _softmax(t), _softmax(s)
        expected += sum(pj * (math.log(pj) - math.log(qj)) for pj, qj in zip(p, q))
    assert listwise_kl(S, T).item() == pytest.approx(expected / 2, rel=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.5, 3.0])
def test_listwise_kl_equals_torch_kl_div_times_t_squared(temperature):
    ref = F.kl_div(F.log_softmax(S / temperature, -1), F.softmax(T / temperature, -1), reduction="batchmean")
    assert listwise_kl(S, T, temperature=temperature).item() == pytest.approx(temperature**2 * ref.item(), rel=1e-6)


def test_listwise_kl_temperature_behaviour():
    # only differences within a row count: a shifted teacher (another score range) costs nothing more
    assert listwise_kl(S, T + 100).item() == pytest.approx(listwise_kl(S, T).item(), rel=1e-5)
    # zero exactly when the student's softmax is the teacher's
    assert listwise_kl(T - 7, T).item() == pytest.approx(0.0, abs=1e-6)
    # a very high temperature flattens both distributions: the KL (before T²) goes to 0
    hot = listwise_kl(S, T, temperature=1000.0).item() / 1000.0**2
    assert hot < 1e-6 < listwise_kl(S, T).item()
    with pytest.raises(ValueError, match="temperature must be > 0"):
        listwise_kl(S, T, temperature=0.0)


def test_listnet_by_hand_and_its_relation_to_kl():
    expected = 0.0
    for s, t in zip(S.tolist(), T.tolist()):
        p, q = _softmax(t), _softmax(s)
        expected -= sum(pj * math.log(qj) for pj, qj in zip(p, q))
    assert listnet(S, T).item() == pytest.approx(expected / 2, rel=1e-6)
    # ListNet = KL + the teacher's entropy (a constant)
    p = F.softmax(T, -1)
    entropy = float(-(p * p.log()).sum(-1).mean())
    assert listnet(S, T).item() == pytest.approx(listwise_kl(S, T).item() + entropy, rel=1e-6)


def test_nway_margin_mse_by_hand_and_reduces_to_margin_mse():
    # query 1: student margins (2, 1), teacher (3, 1) -> errors 1, 0; query 2: (-1, 1.5) vs (1, 3) -> 4, 2.25
    assert nway_margin_mse(S, T).item() == pytest.approx((1 + 0 + 4 + 2.25) / 4)
    pairwise = margin_mse(S[:, 0], S[:, 1], T[:, 0], T[:, 1]).item()
    assert nway_margin_mse(S[:, :2], T[:, :2]).item() == pytest.approx(pairwise)


def test_infonce_by_hand_and_temperature():
    expected = sum(-math.log(_softmax(s)[0]) for s in S.tolist()) / 2
    assert infonce(S).item() == pytest.approx(expected, rel=1e-6)
    expected_t = sum(-math.log(_softmax([x / 0.5 for x in s])[0]) for s in S.tolist()) / 2
    assert infonce(S, temperature=0.5).item() == pytest.approx(expected_t, rel=1e-6)
    # positive_index picks another column
    assert infonce(S, torch.tensor([1, 1])).item() == pytest.approx(
        (-math.log(_softmax(S[0].tolist())[1]) - math.log(_softmax(S[1].tolist())[1])) / 2, rel=1e-6)


def test_infonce_with_in_batch_negatives():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # group-major passages: q0's positive, q0's negative, q1's positive, q1's negative
    p = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    scores, pos = in_batch_scores(q, p)
    assert scores.shape == (2, 4) and pos.tolist() == [0, 2]
    assert torch.equal(scores, q @ p.T)
    # by hand: q0 scores (2, 1, 0, 1), positive 2; q1 scores (0, 1, 3, 0), positive 3
    expected = (-math.log(math.exp(2) / (math.exp(2) + 2 * math.e + 1))
                - math.log(math.exp(3) / (math.exp(3) + math.e + 2))) / 2
    assert infonce(scores, pos).item() == pytest.approx(expected, rel=1e-6)
    # in-batch negatives only add candidates: the loss is at least the hard-negatives-only loss
    own = torch.stack([scores[0, :2], scores[1, 2:]])
    assert infonce(scores, pos).item() >= infonce(own).item()
    with pytest.raises(ValueError, match="multiple of B"):
        in_batch_scores(q, p[:3])


@pytest.mark.parametrize("name", ["listwise_kl", "listnet", "nway_margin_mse"])
def test_teacher_losses_send_gradient_to_the_student_only(name):
    fn = get_loss(name).fn
    s = torch.zeros(1, 3, requires_grad=True)
    t = torch.tensor([[3.0, 0.0, 1.0]], requires_grad=True)
    fn(s, t).backward()
    assert t.grad is None
    g = s.grad[0]
    assert g[0] < 0  # descending raises the teacher's favourite, the positive
    assert g[1] > g[2]  # and lowers the negative the teacher likes least the most


def test_infonce_gradient_raises_the_positive():
    s = torch.zeros(2, 4, requires_grad=True)
    infonce(s).backward()
    assert torch.all(s.grad[:, 0] < 0) and torch.all(s.grad[:, 1:] > 0)


@pytest.mark.parametrize("name", ["listwise_kl", "listnet", "nway_margin_mse"])
def test_shape_errors_say_how_to_fix(name):
    fn = get_loss(name).fn
    with pytest.raises(ValueError, match=r"shape \(B, 1\+k\).*view\(B, 1 \+ k\)"):
        fn(S.flatten(), T.flatten())
    with pytest.raises(ValueError, match="same B groups"):
        fn(S, T[:, :2])
    with pytest.raises(ValueError, match="at least 1 negative"):
        fn(S[:, :1], T[:, :1])
    with pytest.raises(ValueError, match="empty batch"):
        fn(torch.zeros(0, 3), torch.zeros(0, 3))
    with pytest.raises(ValueError, match="positive_index must hold one column per query"):
        infonce(S, torch.tensor([0]))


def test_registry_entries_and_options():
    for name in ("listwise_kl", "listnet", "nway_margin_mse"):
        assert get_loss(name).step == "group" and get_loss(name).needs_scores
    spec = get_loss("infonce")
    assert spec.step == "group" and not spec.needs_scores
    opts = spec.resolve_options({"temperature": "0.05", "cross_device": "true"})
    assert opts == {"temperature": 0.05, "in_batch": True, "cross_device": True}
    assert spec.fn_options(opts) == {"temperature": 0.05}
    assert get_loss("listwise_kl").resolve_options({"temperature": "2"}) == {"temperature": 2.0}
    with pytest.raises(UserError, match="temperature=0.0 must be > 0"):
        get_loss("listwise_kl").resolve_options({"temperature": 0})
    with pytest.raises(UserError, match="listnet has no option tau"):
        get_loss("listnet").resolve_options({"tau": 1})
