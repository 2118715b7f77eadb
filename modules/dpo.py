"""Direct Preference Optimization (Rafailov et al. 2023)."""

from jsonargparse.typing import PositiveFloat

from bench.core.errors import ConfigError
from modules.base import require_positive
from modules.losses import dpo_loss
from modules.paired import PairedPreferenceModule


class DPO(PairedPreferenceModule):
    """Logistic loss on beta times the margin of summed log-ratios.

    Args:
        beta: inverse temperature; the strength of the implicit KL penalty.
        label_smoothing: conservative DPO's assumed label-noise rate, in [0, 0.5).
    """

    name = "dpo"
    colour = "#1f77b4"

    def __init__(self, beta: PositiveFloat = 0.1, label_smoothing: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        require_positive(beta=beta)
        if not 0 <= label_smoothing < 0.5:
            raise ConfigError(f"model.label_smoothing must be in [0, 0.5), got {label_smoothing}")
        self.save_hyperparameters(logger=False)

    def pair_loss(self, chosen_logratios, rejected_logratios):
        return dpo_loss(chosen_logratios, rejected_logratios, self.hparams.beta, self.hparams.label_smoothing)
