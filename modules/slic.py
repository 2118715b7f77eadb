"""SLiC-HF: sequence likelihood calibration with human feedback (Zhao et al. 2023), without a reference."""

from jsonargparse.typing import NonNegativeFloat, PositiveFloat

from modules.base import require_non_negative, require_positive
from modules.losses import slic_loss
from modules.paired import PairedPreferenceModule


class SLiC(PairedPreferenceModule):
    """Calibration hinge on beta times the margin of summed log-probs, plus lambda times the chosen NLL.

    Args:
        beta: 1 / delta, the inverse of the margin the hinge asks for (the paper's delta is 1).
        lam: lambda, the weight of the NLL regulariser on the chosen response (0: the hinge alone).
    """

    name = "slic"
    needs_reference = False
    colour = "#17becf"

    def __init__(self, beta: PositiveFloat = 1.0, lam: NonNegativeFloat = 0.0, **kwargs):
        super().__init__(**kwargs)
        require_positive(beta=beta)
        require_non_negative(lam=lam)
        self.save_hyperparameters(logger=False)

    def pair_loss(self, chosen_logps, rejected_logps):
        return slic_loss(chosen_logps, rejected_logps, self.hparams.beta, self.hparams.lam)
