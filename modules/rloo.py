"""RLOO: REINFORCE with a leave-one-out baseline (Ahmadian et al. 2024, "Back to Basics")."""

import torch
from jsonargparse.typing import NonNegativeFloat, PositiveFloat, PositiveInt

from modules.base import require_positive
from modules.losses import rloo_advantages, rloo_loss
from modules.online import AtLeastTwo, OnlineModule, require_group_size


class RLOO(OnlineModule):
    """k responses per prompt, each rewarded with the proxy's score minus beta times its sequence KL to the
    reference; the baseline of a response is the mean reward of the prompt's other k - 1 responses.

    Args:
        num_generations: k, responses sampled per prompt (>= 2).
        beta: weight of the sequence-level KL (summed log-ratio) subtracted from the score.
        epsilon: ratio clip of the sequence-level surrogate (inactive with one iteration).
        num_iterations: updates on each rollout (TRL's mu).
    """

    name = "rloo"
    colour = "#393b79"

    def __init__(self, num_generations: AtLeastTwo = 4, beta: NonNegativeFloat = 0.05, epsilon: PositiveFloat = 0.2,
                 num_iterations: PositiveInt = 1, **kwargs):
        super().__init__(**kwargs)
        require_group_size(num_generations)
        require_positive(epsilon=epsilon, num_iterations=num_iterations)
        self.save_hyperparameters(logger=False)
        self.samples_per_prompt = num_generations

    def train_on(self, samples, batch_idx):
        hp = self.hparams
        old, ref = self.old_and_reference_logprobs(samples)
        kl = (old - ref).sum(1)
        advantages = rloo_advantages(samples.scores - hp.beta * kl, hp.num_generations)
        losses = []
        for _ in range(hp.num_iterations):
            logprobs, _ = self.response_logprobs(self.policy, "policy", samples.sequences)
            loss = rloo_loss((logprobs * samples.mask).sum(1), old.sum(1), advantages, hp.epsilon).mean()
            if self.update(loss, batch_idx):
                losses.append(loss.detach())
        metrics = self.objective_metrics(samples, old, ref) | self.group_metrics(samples)
        metrics["kl"] = kl.sum() / samples.mask.sum().clamp(min=1)  # TRL's: per token
        if losses:
            metrics["loss"] = torch.stack(losses).mean()
        return metrics
