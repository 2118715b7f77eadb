"""The offline paired-preference family (DPO, IPO, SimPO, ORPO, SLiC-HF): one loss of the chosen and rejected
log-ratios on top of the shared machinery of `modules.base`, and TRL's paired implicit-reward metrics."""

import torch

from modules.base import AlignmentModule


def preference_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """TRL's names for paired implicit-reward statistics (reward = beta * logratio)."""
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen_logps.mean(),
        "logps/rejected": rejected_logps.mean(),
    }


class PairedPreferenceModule(AlignmentModule):
    """An offline paired-preference loss of the chosen and rejected log-ratios (DPO, IPO, ...).
    A subclass gives `pair_loss`, whether log-ratios are length-averaged and, unless it is its `beta`, its
    `reward_scale`.
    With `needs_reference = False` (SimPO, ORPO, SLiC-HF) the "log-ratios" are the policy's own log-probs:
    no reference is loaded, cached or run."""

    data_view = "paired"
    average_logratios: bool = False
    pruning_metric = "val/rewards/accuracies"

    @property
    def reward_scale(self) -> float:
        """The scale of TRL's implicit rewards: β for the losses that have one (DPO, SimPO, SLiC-HF)."""
        return self.hparams.beta

    def pair_loss(self, chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def pair_metrics(self, chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor) -> dict[str, torch.Tensor]:
        """Metrics of the algorithm's own beyond TRL's paired ones (detached inputs)."""
        return {}

    def loss_and_metrics(self, batch):
        # One forward over chosen and rejected rows together: the collator stacks them.
        policy = self.policy_logps(batch)
        logratios = policy.reduce(self.average_logratios)
        if self.needs_reference:
            logratios = logratios - self.reference_logps(batch).reduce(self.average_logratios)
        chosen_logratios, rejected_logratios = logratios.chunk(2)
        loss = self.pair_loss(chosen_logratios, rejected_logratios).mean()
        chosen_logps, rejected_logps = policy.total.detach().chunk(2)
        rewards = self.reward_scale * logratios.detach()
        metrics = preference_metrics(*rewards.chunk(2), chosen_logps, rejected_logps)
        return loss, metrics | self.pair_metrics(*logratios.detach().chunk(2))

    def examples_in(self, batch: dict) -> int:
        return batch["input_ids"].shape[0] // 2  # chosen and rejected rows of each pair
