"""Preference-alignment losses as pure functions of tensors.

Every loss returns a per-example tensor of shape (B,); the caller reduces it. A "logratio" is
log pi_theta(y|x) - log pi_ref(y|x) for one response, summed or averaged over its tokens.
"""

import math

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


def simpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """SimPO (Meng et al. 2024), reference-free: -log sigmoid(beta * (c - r) - gamma), with c and r the policy's
    length-averaged log-probs and gamma the target reward margin."""
    return -F.logsigmoid(beta * (chosen_logps - rejected_logps) - gamma)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation at either end (Maechler 2012)."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_log_odds(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> torch.Tensor:
    """log(odds(c) / odds(r)), odds(p) = p / (1 - p), of length-averaged log-probs c and r."""
    return (chosen_logps - rejected_logps) - (log1mexp(chosen_logps) - log1mexp(rejected_logps))


def orpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, lam: float) -> torch.Tensor:
    """ORPO (Hong et al. 2024), reference-free: the chosen response's token-mean NLL, -c, plus
    lambda * -log sigmoid(log odds ratio). c and r are length-averaged log-probs."""
    return -chosen_logps - lam * F.logsigmoid(orpo_log_odds(chosen_logps, rejected_logps))


def slic_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, beta: float, lam: float = 0.0) -> torch.Tensor:
    """SLiC-HF (Zhao et al. 2023), reference-free: the calibration hinge max(0, 1 - beta * (c - r)) on summed
    log-probs, plus lambda times the chosen response's NLL, -c. The paper's max(0, delta - (c - r)) - lambda' * c,
    divided by delta = 1 / beta (as TRL's "hinge" writes it)."""
    return torch.relu(1 - beta * (chosen_logps - rejected_logps)) - lam * chosen_logps


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


def rrhf_loss(scores: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RRHF's ranking loss (Yuan et al. 2023), per prompt: the sum, over valid candidate pairs with
    r_i < r_j, of max(0, s_i - s_j). Scores s are length-normalised log-probs; all tensors are (B, k)
    and `mask` marks the valid candidates. Equal rewards rank neither way."""
    score_gap = scores[:, :, None] - scores[:, None, :]  # [b, i, j] = s_i - s_j
    return (score_gap.clamp(min=0) * ranked_pairs(rewards, mask)).sum(dim=(1, 2))


def ranked_pairs(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[b, i, j]: candidates i and j are both valid and r_i < r_j."""
    mask = mask.bool()
    return (rewards[:, :, None] < rewards[:, None, :]) & mask[:, :, None] & mask[:, None, :]


def rank_agreement(scores: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(number of valid pairs with r_i < r_j whose scores agree, s_i < s_j; number of such pairs)."""
    ranked_lower = ranked_pairs(rewards, mask)
    agrees = scores[:, :, None] < scores[:, None, :]
    return (agrees & ranked_lower).sum(), ranked_lower.sum()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum(values * mask) / Sum(mask) over the whole batch; 0 when nothing is unmasked."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the unmasked entries of the whole batch (unbiased variance, as TRL), 0 elsewhere."""
    mean = masked_mean(values, mask)
    count = mask.to(values.dtype).sum()
    variance = masked_mean((values - mean) ** 2, mask) * count / (count - 1).clamp(min=1)
    return (values - mean) * torch.rsqrt(variance + eps) * mask.to(values.dtype)


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded (B, T) response tokens.

    delta_t = r_t + gamma * V_{t+1} * mask_{t+1} - V_t   (V beyond the last column is 0)
    A_t     = delta_t + gamma * lam * mask_{t+1} * A_{t+1}
    returns = A + V; A is 0 where mask is 0.
    """
    mask = mask.to(values.dtype)
    next_values = F.pad(values[:, 1:], (0, 1))
    next_mask = F.pad(mask[:, 1:], (0, 1))
    deltas = rewards + gamma * next_values * next_mask - values
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        running = deltas[:, t] + gamma * lam * next_mask[:, t] * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, advantages + values


def ppo_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, cliprange: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate: masked_mean(max(-A * ratio, -A * clip(ratio, 1 - c, 1 + c))), and the
    fraction of tokens where the clipped term is the larger."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).to(logprobs.dtype), mask)
    return loss, clipfrac


def ppo_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, cliprange_value: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: 0.5 * masked_mean(max((V - R)^2, (V_clip - R)^2)) with
    V_clip = V_old + clip(V - V_old, -c, c), and the fraction of tokens where the clipped term is larger."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped_error = (values - returns) ** 2
    clipped_error = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped_error, clipped_error), mask)
    clipfrac = masked_mean((clipped_error > unclipped_error).to(values.dtype), mask)
    return loss, clipfrac


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """RLOO's leave-one-out advantages (Ahmadian et al. 2024): each reward minus the mean reward of the other
    k - 1 responses to the same prompt. `rewards` is (B * k,), prompt-major (the k responses of a prompt together)."""
    grouped = rewards.view(-1, k)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (k - 1)
    return (grouped - baseline).flatten()


def rloo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, epsilon: float) -> torch.Tensor:
    """RLOO's per-response loss on sequence log-probs, clipped as TRL's RLOO: -min(rho * A, clip(rho, 1 - eps,
    1 + eps) * A), rho = exp(logp - old logp). With one update per rollout rho is 1 and its gradient is
    REINFORCE's, -A * grad log pi(y)."""
    ratio = torch.exp(logps - old_logps)
    return -torch.min(ratio * advantages, torch.clamp(ratio, 1 - epsilon, 1 + epsilon) * advantages)


def group_advantages(rewards: torch.Tensor, k: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantages (Shao et al. 2024): each reward minus its group's mean, divided by the group's standard
    deviation (unbiased, plus `eps`, as TRL) when `scale`. `rewards` is (B * k,), prompt-major."""
    grouped = rewards.view(-1, k)
    advantages = grouped - grouped.mean(1, keepdim=True)
    if scale:
        advantages = advantages / (grouped.std(1, keepdim=True) + eps)
    return advantages.flatten()


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimate of KL(pi || pi_ref) per token: exp(ref - logp) - (ref - logp) - 1 >= 0."""
    return torch.exp(ref_logprobs - logprobs) - (ref_logprobs - logprobs) - 1


GRPO_LOSS_TYPES = ("dapo", "grpo", "dr_grpo")


def grpo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float,
    epsilon_high: float,
    beta: float = 0.0,
    ref_logprobs: torch.Tensor | None = None,
    loss_type: str = "dapo",
    max_completion_length: int | None = None,
    num_tokens: torch.Tensor | float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO's loss over (B, T) response tokens, and the share of tokens whose ratio is clipped (TRL's
    clip_ratio/region_mean). Per token: -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A) + beta * KL, with
    rho = exp(logp - old logp), A the response's advantage and KL the k3 estimate exp(ref - logp) - (ref - logp) - 1.

    The aggregation over tokens (`loss_type`, TRL's names):
    - "dapo": the token-level mean over the batch (DAPO, Yu et al. 2025): sum / `num_tokens` (the batch's
      tokens; a data-parallel caller passes the global count divided by the number of devices);
    - "grpo": the mean over responses of each response's token mean (the GRPO paper), which weighs a token of a
      short response more than one of a long response;
    - "dr_grpo": sum / (B * `max_completion_length`) (Dr. GRPO, Liu et al. 2025), a constant normaliser.
    """
    mask = mask.bool()
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    # Padding positions may hold any value; exp() of them must not turn into inf * 0.
    logprobs, old_logprobs = torch.where(mask, logprobs, zero), torch.where(mask, old_logprobs, zero)
    advantages = advantages[:, None]
    ratio = torch.exp(logprobs - old_logprobs)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * advantages, clipped * advantages)
    if beta:
        ref_logprobs = torch.where(mask, ref_logprobs, zero)
        per_token = per_token + beta * k3_kl(logprobs, ref_logprobs)
    weights = mask.to(per_token.dtype)
    if loss_type == "dapo":
        loss = (per_token * weights).sum() / torch.as_tensor(weights.sum() if num_tokens is None else num_tokens).clamp(min=1)
    elif loss_type == "grpo":
        loss = ((per_token * weights).sum(-1) / weights.sum(-1).clamp(min=1)).mean()
    elif loss_type == "dr_grpo":
        loss = (per_token * weights).sum() / (per_token.shape[0] * max_completion_length)
    else:
        raise ValueError(f"unknown GRPO loss_type {loss_type!r}; choose one of {', '.join(GRPO_LOSS_TYPES)}")
    region_clipped = ((ratio < 1 - epsilon_low) & (advantages < 0)) | ((ratio > 1 + epsilon_high) & (advantages > 0))
    return loss, masked_mean(region_clipped.to(per_token.dtype), weights)
