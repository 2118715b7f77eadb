"""Preference-alignment losses as pure functions of tensors.

Every loss returns a per-example tensor of shape (B,); the caller reduces it. A "logratio" is
log pi_theta(y|x) - log pi_ref(y|x) for one response, summed or averaged over its tokens.
"""

import torch
import torch.nn.functional as F


def dpo_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """DPO (Rafailov et al. 2023), with the conservative-DPO label smoothing eps.

    loss = -(1 - eps) * log sigmoid(beta * h) - eps * log sigmoid(-beta * h),
    h = chosen_logratios - rejected_logratios.
    """
    h = chosen_logratios - rejected_logratios
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def ipo_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, tau: float) -> torch.Tensor:
    """IPO (Azar et al. 2023): regress the log-ratio margin h onto 1 / (2 tau)."""
    h = chosen_logratios - rejected_logratios
    return (h - 1 / (2 * tau)) ** 2


def kto_loss(
    logratios: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> torch.Tensor:
    """KTO (Ethayarajh et al. 2024) with the KL reference point `kl` (a scalar, no gradient).

    desirable rows:   lambda_D * (1 - sigmoid(beta * (logratio - kl)))
    undesirable rows: lambda_U * (1 - sigmoid(beta * (kl - logratio)))
    """
    desirable_loss = desirable_weight * (1 - torch.sigmoid(beta * (logratios - kl)))
    undesirable_loss = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratios)))
    return torch.where(desirable, desirable_loss, undesirable_loss)


def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, center_rewards_coefficient: float = 0.0
) -> torch.Tensor:
    """Reward-model loss: -log sigmoid(r+ - r-), plus c * (r+ + r-)^2 to keep rewards centred at 0
    (its batch mean is TRL's center_rewards_coefficient term)."""
    return -F.logsigmoid(chosen_rewards - rejected_rewards) + center_rewards_coefficient * (
        chosen_rewards + rejected_rewards
    ) ** 2
