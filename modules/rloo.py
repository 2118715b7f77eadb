"""RLOO: REINFORCE with a leave-one-out baseline (Ahmadian et al. 2024, "Back to Basics")."""

from modules.grouped import GroupedOnlineModule
from modules.losses import rloo_advantages, rloo_loss


class RLOO(GroupedOnlineModule):
    """k responses per prompt, each rewarded with the proxy's score minus beta times its sequence KL to the
    reference (beta: TRL's 0.05 by default); the baseline of a response is the mean reward of the prompt's
    other k - 1 responses. The ratio clip (`epsilon`) is on the sequence-level surrogate."""

    name = "rloo"
    colour = "#393b79"

    def advantages(self, samples, old, ref):
        return rloo_advantages(samples.scores - self.hparams.beta * (old - ref).sum(1), self.hparams.num_generations)

    def loss(self, logprobs, old, ref, advantages, samples, rollout):
        per_response = rloo_loss((logprobs * samples.mask).sum(1), old.sum(1), advantages, self.hparams.epsilon)
        return per_response.sum() / len(rollout.scores), {}  # the rows' share of the mean over the rollout

    def kl(self, samples, old, ref):
        return (old - ref).sum() / samples.mask.sum().clamp(min=1)  # TRL's: the sequence KL, per token
