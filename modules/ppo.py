"""PPO for RLHF, as the field converged on it (TRL's PPOv2; Huang et al., "The N+ implementation details
of RLHF with PPO"): on-policy rollouts scored by the proxy reward model, a per-token KL penalty against
the reference, GAE, and clipped policy and value updates. Lightning manual optimisation: one training
step is one rollout followed by `ppo_epochs` passes over `num_mini_batches`."""

import copy
from collections import defaultdict
from dataclasses import dataclass

import torch
from jsonargparse.typing import NonNegativeFloat, PositiveFloat, PositiveInt
from tqdm.auto import tqdm

from bench.core.errors import ConfigError
from modules.base import require_positive
from modules.losses import gae, masked_mean, masked_whiten, ppo_policy_loss, ppo_value_loss
from modules.online import OnlineModule, Samples, Sequences


@dataclass
class Rollout:
    """One response per prompt of a batch, with its per-token log-probs under the policy and the reference and
    its values: (B, T) over response tokens, right-padded, and 0 where `mask` is 0."""

    samples: Samples
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor

    @property
    def sequences(self) -> Sequences:
        return self.samples.sequences

    @property
    def mask(self) -> torch.Tensor:
        return self.samples.mask

    @property
    def scores(self) -> torch.Tensor:
        return self.samples.scores


class ValueHead(torch.nn.Module):
    """V(x, y_<t) from a decoder's hidden state. Zero-initialised: values start at 0 and the head learns
    before the backbone moves."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.score = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.score.weight)
        torch.nn.init.zeros_(self.score.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.score(hidden).squeeze(-1).float()


class PPO(OnlineModule):
    """Actor-critic RLHF against the proxy reward model. Sampling, the proxy and the reference as in
    `OnlineModule` (log-probs at the sampling temperature).

    Args:
        kl_coef: initial coefficient of the per-token KL penalty.
        kl_target: with a value, adapt kl_coef towards this KL per response (Ziegler et al.'s controller).
        kl_horizon: the adaptive controller's horizon, in prompts.
        ppo_epochs: passes over each rollout.
        num_mini_batches: optimizer steps per pass; the rollout batch must divide into them.
        cliprange, cliprange_value: PPO's ratio clip and the value clip.
        vf_coef: weight of the value loss.
        gamma, lam: GAE's discount and lambda.
        share_value_backbone: compute values from the policy's own hidden states instead of a copy.
    """

    name = "ppo"
    colour = "#9467bd"
    train_on_measures_kl = True  # in `rollout`, before the first update

    def __init__(
        self,
        kl_coef: NonNegativeFloat = 0.05,
        kl_target: PositiveFloat | None = None,
        kl_horizon: PositiveInt = 10000,
        ppo_epochs: int = 4,
        num_mini_batches: PositiveInt = 1,
        cliprange: PositiveFloat = 0.2,
        cliprange_value: PositiveFloat = 0.2,
        vf_coef: PositiveFloat = 0.1,
        gamma: float = 1.0,
        lam: float = 0.95,
        share_value_backbone: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if ppo_epochs < 1:
            raise ConfigError(f"model.ppo_epochs must be >= 1, got {ppo_epochs}")
        require_positive(cliprange=cliprange, cliprange_value=cliprange_value, vf_coef=vf_coef,
                         num_mini_batches=num_mini_batches)
        if not 0 <= gamma <= 1 or not 0 <= lam <= 1:
            raise ConfigError(f"need gamma and lam in [0, 1]; got {gamma}, {lam}")
        self.save_hyperparameters(logger=False)
        self.kl_coef = kl_coef
        self.value_backbone = self.value_head = None

    @property
    def kl_coefficient(self) -> float:
        return self.kl_coef

    def dropout_free_models(self) -> list[torch.nn.Module]:
        return super().dropout_free_models() + ([self.value_backbone] if self.value_backbone is not None else [])

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        super().configure_model()
        if not self.hparams.share_value_backbone:
            self.value_backbone = copy.deepcopy(self.policy.get_decoder()).eval()  # no dropout, as the policy
        self.value_head = ValueHead(self.policy.config.hidden_size)

    def trainable_parameters(self):
        modules = [self.policy, self.value_head] + ([self.value_backbone] if self.value_backbone else [])
        return [p for m in modules for p in m.parameters()]

    def value_estimates(self, sequences: Sequences, policy_hidden: torch.Tensor) -> torch.Tensor:
        if self.value_backbone is None:
            return self.value_head(policy_hidden)
        return self.value_head(self.response_hidden(self.value_backbone, sequences))

    # --- a rollout ---------------------------------------------------------------------------------
    @torch.no_grad()
    def rollout(self, samples: Samples) -> Rollout:
        """Log-probs and values of the samples; records their exact KL in `samples.kl` from the same logits."""
        sequences, mask = samples.sequences, samples.mask
        policy_logits, hidden = self.response_logits(self.policy, "policy", sequences)
        logprobs = self.logprobs_of(policy_logits, sequences)
        reference_logits, _ = self.response_logits(self.reference, "reference", sequences)
        ref_logprobs = self.logprobs_of(reference_logits, sequences)
        samples.kl = self.response_kl(policy_logits, reference_logits, mask)
        del policy_logits, reference_logits  # the largest activations: gone before the value backbone runs
        values = self.value_estimates(sequences, hidden)
        return Rollout(samples, logprobs * mask, ref_logprobs * mask, values * mask)

    def rollout_metrics(self, rollout: Rollout, kl_coef: float) -> tuple[dict, torch.Tensor]:
        """TRL's objective/ metrics, and the per-token rewards: -kl_coef * KL, plus the score at the last token."""
        non_score_rewards = -kl_coef * (rollout.logprobs - rollout.ref_logprobs)
        last = rollout.mask.sum(1) - 1
        rewards = non_score_rewards.clone()
        rewards[torch.arange(len(last), device=last.device), last] += rollout.scores
        return self.objective_metrics(rollout.samples, rollout.logprobs, rollout.ref_logprobs), rewards

    # --- training ----------------------------------------------------------------------------------
    def ppo_updates(self, rollout: Rollout, advantages: torch.Tensor, returns: torch.Tensor, batch_idx: int) -> dict:
        hp = self.hparams
        if len(rollout.scores) % hp.num_mini_batches:
            raise ConfigError(f"the rollout batch ({len(rollout.scores)} prompts) does not divide into "
                              f"model.num_mini_batches={hp.num_mini_batches}")
        stats = defaultdict(list)
        progress = tqdm(total=hp.ppo_epochs * hp.num_mini_batches, desc="rollout: PPO updates", leave=False)
        for _ in range(hp.ppo_epochs):
            for rows in torch.randperm(len(rollout.scores), device=self.device).chunk(hp.num_mini_batches):
                mask = rollout.mask[rows]
                sequences = rollout.sequences[rows]
                logprobs, hidden = self.response_logprobs(self.policy, "policy", sequences)
                values = self.value_estimates(sequences, hidden)
                old_logprobs = rollout.logprobs[rows]
                policy_loss, policy_clipfrac = ppo_policy_loss(logprobs, old_logprobs, advantages[rows], mask,
                                                               hp.cliprange)
                value_loss, value_clipfrac = ppo_value_loss(values, rollout.values[rows], returns[rows], mask,
                                                            hp.cliprange_value)
                loss = policy_loss + hp.vf_coef * value_loss
                progress.update()
                if not self.update(loss, batch_idx):
                    continue
                with torch.no_grad():
                    stats["policy/approxkl"].append(0.5 * masked_mean((logprobs - old_logprobs) ** 2, mask))
                    stats["policy/clipfrac"].append(policy_clipfrac)
                    stats["loss/policy"].append(policy_loss)
                    stats["loss/value"].append(value_loss)
                    stats["val/clipfrac"].append(value_clipfrac)
                    stats["loss"].append(loss)
        progress.close()
        return {name: torch.stack(values).mean() for name, values in stats.items()}

    def adapt_kl_coef(self, kl: torch.Tensor, prompts: int) -> None:
        """Ziegler et al.'s proportional controller towards `kl_target`, with the error clipped to 0.2."""
        hp = self.hparams
        if hp.kl_target is not None:
            error = min(max(self.mean_across_devices(kl).item() / hp.kl_target - 1, -0.2), 0.2)
            self.kl_coef *= 1 + error * prompts * self.trainer.world_size / hp.kl_horizon

    def train_on(self, samples: Samples, batch_idx: int) -> dict:
        rollout = self.rollout(samples)
        metrics, rewards = self.rollout_metrics(rollout, self.kl_coef)
        advantages, returns = gae(rewards, rollout.values, rollout.mask, self.hparams.gamma, self.hparams.lam)
        advantages = masked_whiten(advantages, rollout.mask)
        metrics.update(self.ppo_updates(rollout, advantages, returns, batch_idx))  # a skipped batch: one mini-batch
        self.rollout_tokens *= self.hparams.ppo_epochs  # each epoch reads the rollout again
        metrics["objective/kl_coef"] = torch.tensor(self.kl_coef)
        # The controller follows the KL that the reward penalises, as before objective/kl became the exact KL.
        self.adapt_kl_coef(metrics["objective/kl_estimate"], len(rollout.scores))
        return metrics

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["kl_coef"] = self.kl_coef

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        self.kl_coef = checkpoint.get("kl_coef", self.kl_coef)
