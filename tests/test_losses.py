"""The loss functions against values computed by hand from their formulas."""

import math

import pytest
import torch

from modules.losses import dpo_loss, ipo_loss, kto_loss


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def softplus(x):  # -log sigmoid(-x), written out
    return math.log(1 + math.exp(x))


def test_dpo_matches_hand_values():
    # h = [2, -2, 0], beta 0.5: -log sigmoid(beta*h) = log(1 + exp(-beta*h))
    loss = dpo_loss(t(2.0, -1.0, 0.5), t(0.0, 1.0, 0.5), beta=0.5)
    assert loss.shape == (3,)
    torch.testing.assert_close(loss, t(0.31326168751822286, 1.3132616875182228, 0.6931471805599453))


def test_dpo_label_smoothing_batch_of_one():
    # h = 1, beta 0.1, eps 0.2: 0.8 * log(1 + e^-0.1) + 0.2 * log(1 + e^0.1)
    loss = dpo_loss(t(1.0), t(0.0), beta=0.1, label_smoothing=0.2)
    expected = 0.8 * softplus(-0.1) + 0.2 * softplus(0.1)
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.66439666007357, abs=1e-12)


def test_dpo_depends_only_on_the_margin():
    torch.manual_seed(0)
    chosen, rejected = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    shifted = dpo_loss(chosen + 3.0, rejected + 3.0, beta=0.3, label_smoothing=0.1)
    torch.testing.assert_close(shifted, dpo_loss(chosen, rejected, beta=0.3, label_smoothing=0.1))


def test_ipo_matches_hand_values():
    # tau 0.1: target margin 1/(2*0.1) = 5; h = [2, -2, 0]
    torch.testing.assert_close(ipo_loss(t(2.0, -1.0, 0.5), t(0.0, 1.0, 0.5), tau=0.1), t(9.0, 49.0, 25.0))
    # tau 0.5: target 1, h = 1 gives zero; B = 1
    torch.testing.assert_close(ipo_loss(t(1.5), t(0.5), tau=0.5), t(0.0))


def test_kto_mixed_batch_with_weights():
    loss = kto_loss(t(1.0, -1.0), torch.tensor([True, False]), t(0.5)[0], beta=2.0, desirable_weight=2.0,
                    undesirable_weight=0.5)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    expected = t(2.0 * (1 - sigmoid(2.0 * (1.0 - 0.5))), 0.5 * (1 - sigmoid(2.0 * (0.5 + 1.0))))
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(loss, t(0.5378828427399902, 0.02371293658878339))


def test_kto_single_kind_batches():
    zero = torch.tensor(0.0, dtype=torch.float64)
    only_undesirable = kto_loss(t(0.0, 2.0), torch.tensor([False, False]), zero, beta=0.1)
    torch.testing.assert_close(only_undesirable, t(0.5, 1 - 1 / (1 + math.exp(0.2))))
    only_desirable = kto_loss(t(0.0), torch.tensor([True]), zero, beta=0.1)
    torch.testing.assert_close(only_desirable, t(0.5))


def test_bradley_terry_matches_hand_values():
    from modules.losses import bradley_terry_loss

    # r+ - r- = [1, -1, 0]; centring term c * (r+ + r-)^2 with r+ + r- = [3, -1, 0]
    loss = bradley_terry_loss(t(2.0, -1.0, 0.0), t(1.0, 0.0, 0.0))
    torch.testing.assert_close(loss, t(softplus(-1.0), softplus(1.0), math.log(2)))
    centred = bradley_terry_loss(t(2.0, -1.0, 0.0), t(1.0, 0.0, 0.0), center_rewards_coefficient=0.01)
    torch.testing.assert_close(centred, t(softplus(-1.0) + 0.09, softplus(1.0) + 0.01, math.log(2)))
    assert bradley_terry_loss(t(0.5), t(0.5)).shape == (1,)
