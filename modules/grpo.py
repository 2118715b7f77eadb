"""GRPO: group relative policy optimisation (Shao et al. 2024, DeepSeekMath)."""

from typing import Literal

import torch
from jsonargparse.typing import NonNegativeFloat, PositiveFloat, PositiveInt

from modules.base import require_non_negative, require_positive
from modules.losses import grpo_loss, group_advantages, k3_kl
from modules.online import AtLeastTwo, OnlineModule, require_group_size


class GRPO(OnlineModule):
    """k responses per prompt; each response's advantage is its score normalised within the prompt's group, and
    every token takes PPO's clipped ratio with that advantage plus beta times its k3 KL to the reference.

    Args:
        num_generations: k, responses sampled per prompt (>= 2).
        beta: weight of the per-token KL to the reference in the loss (the paper's 0.04).
        epsilon: the ratio clip; epsilon_high, when set, the upper one (DAPO's clip-higher).
        num_iterations: updates on each rollout (the paper's mu); with 1 the ratio is 1 and nothing is clipped.
        scale_rewards: divide by the group's standard deviation (false: Dr. GRPO's unscaled advantages).
        loss_type: how token losses are aggregated: "dapo", the token-level mean over the batch (DAPO; TRL's
            default); "grpo", the mean of each response's token mean (the paper); "dr_grpo", the sum over
            B * max_new_tokens (Dr. GRPO). See `modules.losses.grpo_loss`.
    """

    name = "grpo"
    colour = "#637939"

    def __init__(self, num_generations: AtLeastTwo = 4, beta: NonNegativeFloat = 0.04, epsilon: PositiveFloat = 0.2,
                 epsilon_high: PositiveFloat | None = None, num_iterations: PositiveInt = 1, scale_rewards: bool = True,
                 loss_type: Literal["dapo", "grpo", "dr_grpo"] = "dapo", **kwargs):
        super().__init__(**kwargs)
        require_group_size(num_generations)
        require_non_negative(beta=beta)
        require_positive(epsilon=epsilon, num_iterations=num_iterations)
        self.save_hyperparameters(logger=False)
        self.samples_per_prompt = num_generations

    def train_on(self, samples, batch_idx):
        hp = self.hparams
        old, ref = self.old_and_reference_logprobs(samples)
        advantages = group_advantages(samples.scores, hp.num_generations, hp.scale_rewards)
        # DAPO's normaliser is the token count of the global batch; gradients are averaged over devices.
        num_tokens = self.mean_across_devices(samples.mask.sum().float())
        losses, clipped = [], []
        for _ in range(hp.num_iterations):
            logprobs, _ = self.response_logprobs(self.policy, "policy", samples.sequences)
            loss, clip_ratio = grpo_loss(logprobs, old, advantages, samples.mask, hp.epsilon, hp.epsilon_high or hp.epsilon,
                                         hp.beta, ref, hp.loss_type, hp.max_new_tokens, num_tokens)
            if self.update(loss, batch_idx):
                losses.append(loss.detach())
                clipped.append(clip_ratio)
        metrics = self.objective_metrics(samples, old, ref) | self.group_metrics(samples)
        metrics["kl"] = (k3_kl(old, ref) * samples.mask).sum() / samples.mask.sum().clamp(min=1)  # TRL's: k3, per token
        if losses:
            metrics |= {"loss": torch.stack(losses).mean(), "clip_ratio/region_mean": torch.stack(clipped).mean()}
        return metrics
