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


def test_rrhf_sums_hinges_over_reward_ordered_valid_pairs():
    from modules.losses import rrhf_loss

    # prompt 0: rewards 1 < 2 < 3, scores -1, -2, -0.5 -> pairs (i worse than j): (0,1): max(0,-1+2)=1,
    # (0,2): max(0,-1+0.5)=0, (1,2): max(0,-2+0.5)=0 -> 1.0
    # prompt 1: a tie in rewards (0 and 1) ranks neither way; candidate 2 is masked out -> only (0,?) none
    #           rewards [5, 5, 0], scores [0, 3, 9], mask [1, 1, 0] -> 0
    # prompt 2: k=3 with rewards [2, 1, 1], scores [-3, -1, -2] -> (1,0): max(0,-1+3)=2, (2,0): max(0,-2+3)=1 -> 3
    scores = t(-1.0, -2.0, -0.5, 0.0, 3.0, 9.0, -3.0, -1.0, -2.0).view(3, 3)
    rewards = t(1.0, 2.0, 3.0, 5.0, 5.0, 0.0, 2.0, 1.0, 1.0).view(3, 3)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    torch.testing.assert_close(rrhf_loss(scores, rewards, mask), t(1.0, 0.0, 3.0))
    # all candidates masked: nothing to rank
    torch.testing.assert_close(rrhf_loss(scores[:1], rewards[:1], torch.zeros(1, 3, dtype=torch.bool)), t(0.0))
    # k = 2, B = 1
    torch.testing.assert_close(rrhf_loss(t(-0.5, -1.5).view(1, 2), t(0.0, 1.0).view(1, 2),
                                         torch.ones(1, 2, dtype=torch.bool)), t(1.0))


def test_gae_matches_the_recursion_by_hand():
    from modules.losses import gae

    # row 0: 3 real tokens; row 1: 1 real token then padding; row 2: all masked
    rewards = t(1.0, 0.0, 2.0, 0.5, 9.0, 9.0, 1.0, 1.0, 1.0).view(3, 3)
    values = t(0.5, 1.0, -1.0, 0.2, 4.0, 4.0, 3.0, 3.0, 3.0).view(3, 3)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    gamma, lam = 1.0, 0.5
    # row 0: deltas: d2 = 2 - (-1) = 3; d1 = 0 + 1*(-1) - 1 = -2; d0 = 1 + 1*1 - 0.5 = 1.5
    #        A2 = 3; A1 = -2 + 0.5*3 = -0.5; A0 = 1.5 + 0.5*(-0.5) = 1.25
    # row 1: d0 = 0.5 + 0 (next masked) - 0.2 = 0.3; A0 = 0.3; padding -> 0
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(advantages, t(1.25, -0.5, 3.0, 0.3, 0.0, 0.0, 0.0, 0.0, 0.0).view(3, 3))
    torch.testing.assert_close(returns, advantages + values)
    # gamma < 1 discounts the bootstrap and the recursion: row 0 only, gamma 0.9, lam 1
    a, _ = gae(rewards[:1], values[:1], mask[:1], 0.9, 1.0)
    d2, d1, d0 = 3.0, 0.0 + 0.9 * -1.0 - 1.0, 1.0 + 0.9 * 1.0 - 0.5
    torch.testing.assert_close(a, t(d0 + 0.9 * (d1 + 0.9 * d2), d1 + 0.9 * d2, d2).view(1, 3))


def test_ppo_policy_loss_clips_and_counts():
    from modules.losses import ppo_policy_loss

    old = t(0.0, 0.0, 0.0, 0.0).view(2, 2)
    new = t(math.log(1.5), math.log(0.5), math.log(1.1), 0.0).view(2, 2)
    advantages = t(1.0, -1.0, 2.0, 5.0).view(2, 2)
    mask = torch.tensor([[1, 1], [1, 0]])
    # token 0: ratio 1.5, A 1 -> max(-1.5, -1.2) = -1.2 (clipped larger)
    # token 1: ratio 0.5, A -1 -> max(0.5, 0.8) = 0.8 (clipped larger)
    # token 2: ratio 1.1, A 2 -> max(-2.2, -2.2) = -2.2 (not clipped); token 3 masked
    loss, clipfrac = ppo_policy_loss(new, old, advantages, mask, cliprange=0.2)
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.2) / 3)
    assert clipfrac.item() == pytest.approx(2 / 3)
    # an all-masked row adds nothing
    loss_with_empty_row, _ = ppo_policy_loss(torch.cat([new, new[:1]]), torch.cat([old, old[:1]]),
                                             torch.cat([advantages, advantages[:1]]),
                                             torch.cat([mask, torch.zeros(1, 2, dtype=mask.dtype)]), 0.2)
    assert loss_with_empty_row.item() == pytest.approx(loss.item())


def test_ppo_value_loss_clips_and_counts():
    from modules.losses import ppo_value_loss

    values = t(1.0, 0.0, 2.0).view(1, 3)
    old = t(0.5, 0.0, 1.0).view(1, 3)
    returns = t(1.0, 1.0, 0.0).view(1, 3)
    mask = torch.tensor([[1, 1, 1]])
    # token 0: V-R = 0, clip V = 0.7 -> (0.7-1)^2 = 0.09 > 0 -> 0.09, clipped
    # token 1: V-R = -1 -> 1, clip V = 0 -> 1, equal -> 1, not clipped
    # token 2: V-R = 2 -> 4, clip V = 1.2 -> 1.44 -> 4, not clipped
    loss, clipfrac = ppo_value_loss(values, old, returns, mask, cliprange_value=0.2)
    assert loss.item() == pytest.approx(0.5 * (0.09 + 1 + 4) / 3)
    assert clipfrac.item() == pytest.approx(1 / 3)
    all_masked, frac = ppo_value_loss(values, old, returns, torch.zeros_like(mask), 0.2)
    assert all_masked.item() == 0 and frac.item() == 0


def test_rank_agreement_counts_reward_ordered_valid_pairs():
    from modules.losses import rank_agreement

    # prompt 0: rewards 1 < 2 < 3, scores -1, -2, -0.5: pairs (0,1) disagree, (0,2) and (1,2) agree
    # prompt 1: tie (0,1) is not a pair; candidate 2 is masked -> no pairs
    scores = t(-1.0, -2.0, -0.5, 0.0, 3.0, 9.0).view(2, 3)
    rewards = t(1.0, 2.0, 3.0, 5.0, 5.0, 0.0).view(2, 3)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    agreeing, pairs = rank_agreement(scores, rewards, mask)
    assert (agreeing.item(), pairs.item()) == (2, 3)


def test_masked_whiten_uses_only_real_tokens():
    from modules.losses import masked_whiten

    values = t(1.0, 2.0, 3.0, 100.0).view(2, 2)
    mask = torch.tensor([[1, 1], [1, 0]])
    # real tokens 1, 2, 3: mean 2, unbiased variance 1
    torch.testing.assert_close(masked_whiten(values, mask, eps=0.0), t(-1.0, 0.0, 1.0, 0.0).view(2, 2))
