"""Identity Preference Optimisation (Azar et al. 2023)."""

from jsonargparse.typing import PositiveFloat

from modules.base import require_positive
from modules.losses import ipo_loss
from modules.paired import PairedPreferenceModule


class IPO(PairedPreferenceModule):
    """Squared regression of the log-ratio margin onto 1 / (2 tau).

    Args:
        tau: regularisation strength; the target margin is 1 / (2 tau).
        average_logratios: length-average the log-ratios (the IPO paper's practice); sums when false.
    """

    name = "ipo"
    colour = "#ff7f0e"

    def __init__(self, tau: PositiveFloat = 0.1, average_logratios: bool = True, **kwargs):
        super().__init__(**kwargs)
        require_positive(tau=tau)
        self.save_hyperparameters(logger=False)
        self.average_logratios = average_logratios

    @property
    def reward_scale(self) -> float:
        return self.hparams.tau  # tau plays beta's role in the implicit reward

    def pair_loss(self, chosen_logratios, rejected_logratios):
        return ipo_loss(chosen_logratios, rejected_logratios, self.hparams.tau)
