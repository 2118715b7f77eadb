"""SimPO: Simple Preference Optimization with a reference-free reward (Meng et al. 2024)."""

from jsonargparse.typing import NonNegativeFloat, PositiveFloat

from modules.base import require_non_negative, require_positive
from modules.losses import simpo_loss
from modules.paired import PairedPreferenceModule


class SimPO(PairedPreferenceModule):
    """Logistic loss on beta times the margin of length-averaged log-probs, less a target margin gamma.

    Args:
        beta: reward scale (the paper's 2 to 2.5).
        gamma: target reward margin, in reward units (TRL's `simpo_gamma`; the paper's gamma / beta is 0.3 to 0.8).
    """

    name = "simpo"
    needs_reference = False
    average_logratios = True
    colour = "#e377c2"

    def __init__(self, beta: PositiveFloat = 2.0, gamma: NonNegativeFloat = 1.0, **kwargs):
        super().__init__(**kwargs)
        require_positive(beta=beta)
        require_non_negative(gamma=gamma)
        self.save_hyperparameters(logger=False)

    def pair_loss(self, chosen_logps, rejected_logps):
        return simpo_loss(chosen_logps, rejected_logps, self.hparams.beta, self.hparams.gamma)
