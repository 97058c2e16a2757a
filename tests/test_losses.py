"""Every distillation loss against values computed by hand, plus shape errors and the registry."""

from __future__ import annotations

import math

import pytest
import torch

from raykd.losses import LOSSES, get_loss, labels_ce, margin_mse, pointwise_mse, weighted_ranknet

S_POS = torch.tensor([3.0, 0.0])
S_NEG = torch.tensor([1.0, 1.0])
T_POS = torch.tensor([10.0, 2.0])
T_NEG = torch.tensor([9.0, 4.0])


def test_margin_mse_by_hand():
    # student margins (2, -1), teacher margins (1, -2): squared errors 1 and 1
    assert margin_mse(S_POS, S_NEG, T_POS, T_NEG).item() == pytest.approx(1.0)
    # the same margins at another score range cost nothing more: only margins count
    assert margin_mse(S_POS + 100, S_NEG + 100, T_POS, T_NEG).item() == pytest.approx(1.0)
    assert margin_mse(torch.tensor([5.0]), torch.tensor([4.0]), torch.tensor([1.0]), torch.tensor([0.0])).item() == 0.0


def test_pointwise_mse_by_hand():
    # pairs: (3-10)^2=49, (0-2)^2=4, (1-9)^2=64, (1-4)^2=9 -> mean 126/4
    assert pointwise_mse(S_POS, S_NEG, T_POS, T_NEG).item() == pytest.approx(126 / 4)
    # unlike Margin-MSE, a shifted score range is penalised
    assert pointwise_mse(S_POS + 1, S_NEG + 1, S_POS, S_NEG).item() == pytest.approx(1.0)


def test_weighted_ranknet_by_hand():
    # triple 1: dt=1, ds=2 -> 1*log(1+e^-2); triple 2: dt=-2 (teacher prefers neg), ds=-1 -> 2*log(1+e^-1)
    expected = (math.log1p(math.exp(-2)) + 2 * math.log1p(math.exp(-1))) / 2
    assert weighted_ranknet(S_POS, S_NEG, T_POS, T_NEG).item() == pytest.approx(expected, rel=1e-6)
    # a teacher tie gives no signal
    tie = weighted_ranknet(torch.tensor([0.0]), torch.tensor([5.0]), torch.tensor([1.0]), torch.tensor([1.0]))
    assert tie.item() == 0.0


def test_labels_ce_by_hand():
    expected = (math.log1p(math.exp(-2)) + math.log1p(math.exp(1))) / 2
    assert labels_ce(S_POS, S_NEG).item() == pytest.approx(expected, rel=1e-6)


def test_losses_have_gradients_that_move_the_student_margin_the_right_way():
    s_pos = torch.tensor([0.0], requires_grad=True)
    s_neg = torch.tensor([0.0], requires_grad=True)
    margin_mse(s_pos, s_neg, torch.tensor([2.0]), torch.tensor([0.0])).backward()
    assert s_pos.grad.item() < 0 < s_neg.grad.item()  # descending raises pos, lowers neg


@pytest.mark.parametrize("fn", [margin_mse, pointwise_mse, weighted_ranknet])
def test_shape_errors_say_how_to_fix(fn):
    with pytest.raises(ValueError, match=r"shape \(B,\).*squeeze"):
        fn(S_POS[:, None], S_NEG, T_POS, T_NEG)
    with pytest.raises(ValueError, match="same batch size"):
        fn(S_POS, S_NEG, T_POS[:1], T_NEG[:1])
    with pytest.raises(ValueError, match="empty batch"):
        fn(*(torch.zeros(0),) * 4)


def test_registry():
    assert {"margin_mse", "mse", "ranknet", "labels"} <= set(LOSSES)
    assert get_loss("labels").needs_scores is False and get_loss("margin_mse").needs_scores is True
    with pytest.raises(ValueError, match="unknown loss 'margin'.*margin_mse"):
        get_loss("margin")
