"""ORPO: monolithic preference optimisation without a reference model (Hong et al. 2024)."""

import torch.nn.functional as F
from jsonargparse.typing import PositiveFloat

from modules.base import require_positive
from modules.losses import orpo_log_odds, orpo_loss
from modules.paired import PairedPreferenceModule


class ORPO(PairedPreferenceModule):
    """SFT on the chosen response plus lambda times the odds-ratio loss, on length-averaged log-probs.

    Args:
        lam: lambda, the weight of the odds-ratio term (TRL's `beta`; 0.1 in the paper).
    """

    name = "orpo"
    needs_reference = False
    average_logratios = True
    colour = "#bcbd22"

    def __init__(self, lam: PositiveFloat = 0.1, **kwargs):
        super().__init__(**kwargs)
        require_positive(lam=lam)
        self.save_hyperparameters(logger=False)

    @property
    def reward_scale(self) -> float:
        return self.hparams.lam  # TRL's rewards: beta * average log-prob

    def pair_loss(self, chosen_logps, rejected_logps):
        return orpo_loss(chosen_logps, rejected_logps, self.hparams.lam)

    def pair_metrics(self, chosen_logps, rejected_logps):
        log_odds = orpo_log_odds(chosen_logps, rejected_logps)  # TRL's names
        return {"nll_loss": -chosen_logps.mean(), "log_odds_ratio": F.logsigmoid(log_odds).mean(),
                "log_odds_chosen": log_odds.mean()}
