"""GRPO: group relative policy optimisation (Shao et al. 2024, DeepSeekMath)."""

from typing import Literal

from jsonargparse.typing import NonNegativeFloat, PositiveFloat

from modules.grouped import GroupedOnlineModule
from modules.losses import group_advantages, grpo_loss, k3_kl


class GRPO(GroupedOnlineModule):
    """k responses per prompt; each response's advantage is its score normalised within the prompt's group, and
    every token takes PPO's clipped ratio with that advantage plus beta times its k3 KL to the reference.

    Args:
        beta: weight of the per-token KL to the reference in the loss (the paper's 0.04).
        epsilon_high: when set, the upper ratio clip (DAPO's clip-higher); `epsilon` is the lower one.
        scale_rewards: divide by the group's standard deviation (false: Dr. GRPO's unscaled advantages).
        loss_type: how token losses are aggregated: "dapo", the token-level mean over the batch (DAPO; TRL's
            default); "grpo", the mean of each response's token mean (the paper); "dr_grpo", the sum over
            B * max_new_tokens (Dr. GRPO). See `modules.losses.grpo_loss`.
    """

    name = "grpo"
    colour = "#637939"

    def __init__(self, beta: NonNegativeFloat = 0.04, epsilon_high: PositiveFloat | None = None, scale_rewards: bool = True,
                 loss_type: Literal["dapo", "grpo", "dr_grpo"] = "dapo", **kwargs):
        super().__init__(beta=beta, **kwargs)

    def advantages(self, samples, old, ref):
        return group_advantages(samples.scores, self.hparams.num_generations, self.hparams.scale_rewards)

    def loss(self, logprobs, old, ref, advantages, samples, rollout):
        hp = self.hparams
        # DAPO's normaliser is the token count of the global batch; gradients are averaged over devices.
        num_tokens = self.mean_across_devices(rollout.mask.sum().float())
        loss, clip_ratio = grpo_loss(logprobs, old, advantages, samples.mask, hp.epsilon, hp.epsilon_high or hp.epsilon,
                                     hp.beta, ref, hp.loss_type, hp.max_new_tokens, num_tokens)
        if hp.loss_type != "dapo":  # a mean over the rows given: their share of the mean over the rollout's
            loss = loss * len(samples.scores) / len(rollout.scores)
        return loss, {"clip_ratio/region_mean": clip_ratio}

    def kl(self, samples, old, ref):
        return (k3_kl(old, ref) * samples.mask).sum() / samples.mask.sum().clamp(min=1)  # TRL's: k3, per token
