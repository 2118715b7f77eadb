"""What the group methods (RLOO, GRPO) share: k responses to each prompt, whose advantages are taken within
the prompt's group, and `num_iterations` updates on each rollout from its log-probs under the sampling policy
and the reference. A subclass gives only its idea: the advantages, the loss and the KL that TRL logs."""

import torch
from jsonargparse.typing import NonNegativeFloat, PositiveFloat, PositiveInt

from modules.base import require_non_negative, require_positive
from modules.online import AtLeastTwo, OnlineModule, Samples, require_group_size


class GroupedOnlineModule(OnlineModule):
    """Base of RLOO and GRPO (it sets no `name`, so it is no algorithm of its own).

    Args:
        num_generations: k, responses sampled per prompt (>= 2).
        beta: weight of the KL to the reference.
        epsilon: the ratio clip; inactive with one iteration, where the ratio is 1.
        num_iterations: updates on each rollout (TRL's and the GRPO paper's mu).
    """

    def __init__(self, num_generations: AtLeastTwo = 4, beta: NonNegativeFloat = 0.05, epsilon: PositiveFloat = 0.2,
                 num_iterations: PositiveInt = 1, **kwargs):
        super().__init__(**kwargs)
        require_group_size(num_generations)
        require_non_negative(beta=beta)
        require_positive(epsilon=epsilon, num_iterations=num_iterations)
        self.save_hyperparameters(logger=False)
        self.samples_per_prompt = num_generations

    def advantages(self, samples: Samples, old: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """One advantage per response, from the rollout's scores and per-token log-probs (old: the sampling policy's)."""
        raise NotImplementedError

    def loss(self, logprobs: torch.Tensor, old: torch.Tensor, ref: torch.Tensor, advantages: torch.Tensor,
             samples: Samples) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one update from the policy's current per-token log-probs, and metrics of that update."""
        raise NotImplementedError

    def kl(self, samples: Samples, old: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """The KL to the reference that TRL logs as `kl`."""
        raise NotImplementedError

    def train_on(self, samples, batch_idx):
        old, ref = self.old_and_reference_logprobs(samples)
        advantages = self.advantages(samples, old, ref)
        updates = []
        for _ in range(self.hparams.num_iterations):
            logprobs, _ = self.response_logprobs(self.policy, "policy", samples.sequences)
            loss, metrics = self.loss(logprobs, old, ref, advantages, samples)
            if self.update(loss, batch_idx):
                updates.append({"loss": loss.detach(), **metrics})
        metrics = self.objective_metrics(samples, old, ref) | self.group_metrics(samples)
        metrics["kl"] = self.kl(samples, old, ref)
        if updates:  # the mean over the updates that were not skipped
            metrics |= {name: torch.stack([update[name] for update in updates]).mean() for name in updates[0]}
        return metrics
