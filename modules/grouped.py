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
        micro_batch_rows: responses per forward and backward pass (all of a rollout's by default). An update
            is still one optimizer step on the whole rollout's loss, with the same gradient; memory then grows
            with this, not with prompts x k.
    """

    train_on_measures_kl = True  # old_and_reference_logprobs or policy_logprobs_with_kl, before the update

    def __init__(self, num_generations: AtLeastTwo = 4, beta: NonNegativeFloat = 0.05, epsilon: PositiveFloat = 0.2,
                 num_iterations: PositiveInt = 1, micro_batch_rows: PositiveInt | None = None, **kwargs):
        super().__init__(**kwargs)
        require_group_size(num_generations)
        require_non_negative(beta=beta)
        require_positive(epsilon=epsilon, num_iterations=num_iterations)
        if micro_batch_rows is not None:
            require_positive(micro_batch_rows=micro_batch_rows)
        self.save_hyperparameters(logger=False)
        self.samples_per_prompt = num_generations

    def advantages(self, samples: Samples, old: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """One advantage per response, from the rollout's scores and per-token log-probs (old: the sampling policy's)."""
        raise NotImplementedError

    def loss(self, logprobs: torch.Tensor, old: torch.Tensor, ref: torch.Tensor, advantages: torch.Tensor,
             samples: Samples, rollout: Samples) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The share of one update's loss that falls on `samples`, rows of the `rollout` (all of it, or a
        micro-batch; the shares sum to the rollout's loss), from the policy's current per-token log-probs on
        them, and metrics of that share, each a mean over the share's response tokens."""
        raise NotImplementedError

    def kl(self, samples: Samples, old: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """The KL to the reference that TRL logs as `kl`."""
        raise NotImplementedError

    def micro_batches(self, samples: Samples) -> list[slice]:
        rows = len(samples.scores)
        size = self.hparams.micro_batch_rows or rows
        return [slice(start, min(start + size, rows)) for start in range(0, rows, size)]

    def old_and_reference_logprobs(self, samples: Samples) -> tuple[torch.Tensor, torch.Tensor]:
        """As `OnlineModule`'s, one micro-batch at a time; the micro-batches' KLs make up `samples.kl`."""
        old, ref, kl = zip(*(self.logprobs_and_kl(samples[rows]) for rows in self.micro_batches(samples)))
        samples.kl = torch.cat(kl)
        return torch.cat(old), torch.cat(ref)

    def one_pass(self, samples: Samples) -> bool:
        """Whether the policy's only update on this rollout is one forward pass over all of it: then its log-probs
        as it sampled are that pass's own (`policy_logprobs_with_kl`), and the policy runs once, not twice."""
        return self.hparams.num_iterations == 1 and len(self.micro_batches(samples)) == 1

    def micro_batch_losses(self, samples: Samples, old: torch.Tensor, ref: torch.Tensor, advantages: torch.Tensor,
                           shares: list[tuple[torch.Tensor, dict, int]], computed: torch.Tensor | None = None):
        """Each micro-batch's share of the loss, its forward pass run only when `update` asks for it, so that
        one micro-batch's activations are alive at a time; `shares` records each share and its metrics.
        `computed`: the policy's log-probs of a one-pass update, whose forward pass has run."""
        for rows in self.micro_batches(samples):
            logprobs = computed if computed is not None else self.response_logprobs(
                self.policy, "policy", samples.sequences[rows])[0]
            loss, metrics = self.loss(logprobs, old[rows], ref[rows], advantages[rows], samples[rows], samples)
            shares.append((loss.detach(), metrics, int(samples.mask[rows].sum())))
            yield loss

    def train_on(self, samples, batch_idx):
        computed = None
        if self.one_pass(samples):  # the update's own log-probs, detached, are the sampling policy's
            computed, ref = self.policy_logprobs_with_kl(samples)
            old = computed.detach() * samples.mask
        else:
            old, ref = self.old_and_reference_logprobs(samples)
        advantages = self.advantages(samples, old, ref)
        updates = []
        for _ in range(self.hparams.num_iterations):
            shares = []
            if self.update(self.micro_batch_losses(samples, old, ref, advantages, shares, computed), batch_idx):
                tokens = max(sum(n for *_, n in shares), 1)
                updates.append({"loss": sum(loss for loss, *_ in shares)} | {
                    name: sum(metrics[name] * n for _, metrics, n in shares) / tokens for name in shares[0][1]})
        metrics = self.objective_metrics(samples, old, ref) | self.group_metrics(samples)
        metrics["kl"] = self.kl(samples, old, ref)
        if updates:  # the mean over the updates that were not skipped
            metrics |= {name: torch.stack([update[name] for update in updates]).mean() for name in updates[0]}
        return metrics
