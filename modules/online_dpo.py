"""Online DPO: direct preference optimisation on fresh samples ranked by a reward model (Guo et al. 2024,
"Direct Language Model Alignment from Online AI Feedback")."""

import torch
from jsonargparse.typing import PositiveFloat

from modules.base import require_positive
from modules.losses import dpo_loss
from modules.online import OnlineModule
from modules.paired import preference_metrics


class OnlineDPO(OnlineModule):
    """Two responses per prompt from the current policy; the proxy's higher-scored one is chosen (the first on a
    tie, as TRL), and DPO's loss is taken on the pair's summed log-ratios against the reference.

    Args:
        beta: DPO's inverse temperature.
    """

    name = "online-dpo"
    colour = "#843c39"
    samples_per_prompt = 2
    train_on_measures_kl = True  # from the loss's own forward passes, before the update
    # The implicit reward is beta * log(pi / pi_ref) of the model itself, not of its tempered sampling distribution.
    logprob_temperature_is_sampling = False

    def __init__(self, beta: PositiveFloat = 0.1, **kwargs):
        super().__init__(**kwargs)
        require_positive(beta=beta)
        self.save_hyperparameters(logger=False)

    def train_on(self, samples, batch_idx):
        beta = self.hparams.beta
        logprobs, ref = self.policy_logprobs_with_kl(samples)  # and objective/kl, before the update below
        logprobs = logprobs * samples.mask
        scores = samples.scores.view(-1, 2)
        first_wins = scores[:, 0] >= scores[:, 1]
        pairs = torch.arange(len(scores), device=self.device) * 2
        chosen, rejected = pairs + (~first_wins).long(), pairs + first_wins.long()
        policy_logps, ref_logps = logprobs.sum(1), ref.sum(1)
        logratios = policy_logps - ref_logps
        loss = dpo_loss(logratios[chosen], logratios[rejected], beta).mean()
        metrics = {"loss": loss.detach()} if self.update(loss, batch_idx) else {}
        detached = logratios.detach() * beta
        metrics |= preference_metrics(detached[chosen], detached[rejected], policy_logps.detach()[chosen],
                                      policy_logps.detach()[rejected])
        metrics |= self.objective_metrics(samples, logprobs.detach(), ref)
        metrics |= {"objective/scores_margin": (samples.scores[chosen] - samples.scores[rejected]).mean(),
                    "val/contain_eos_token": samples.ended.float().mean(), "beta": torch.tensor(beta)}
        return metrics
