"""Kahneman-Tversky Optimization (Ethayarajh et al. 2024) on unpaired desirable/undesirable rows."""

import logging

import torch
from jsonargparse.typing import PositiveFloat

from modules.base import AlignmentModule, require_positive
from modules.losses import kto_loss

log = logging.getLogger(__name__)


class KTO(AlignmentModule):
    """Each response is judged against a KL reference point estimated on mismatched completions.

    Args:
        beta: inverse temperature of the value function.
        desirable_weight: lambda_D, the weight of desirable rows.
        undesirable_weight: lambda_U, the weight of undesirable rows.
    """

    name = "kto"
    data_view = "unpaired"
    pruning_metric = "val/rewards/margins"
    colour = "#2ca02c"

    def __init__(
        self,
        beta: PositiveFloat = 0.1,
        desirable_weight: PositiveFloat = 1.0,
        undesirable_weight: PositiveFloat = 1.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        require_positive(beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
        self.save_hyperparameters(logger=False)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        desirable = torch.tensor(self.trainer.datamodule.views["train"]["desirable"])
        n_desirable, n_undesirable = int(desirable.sum()), int((~desirable).sum())
        hp = self.hparams
        ratio = hp.desirable_weight * n_desirable / max(hp.undesirable_weight * n_undesirable, 1e-12)
        # The KTO paper recommends lambda_D * n_D / (lambda_U * n_U) in [1, 4/3].
        if not 1 <= ratio <= 4 / 3:
            log.warning(
                "KTO: desirable_weight*n_D / (undesirable_weight*n_U) = %.3f (n_D=%d, n_U=%d) is outside the "
                "recommended [1, 4/3]; adjust model.desirable_weight or model.undesirable_weight",
                ratio, n_desirable, n_undesirable,
            )

    @torch.no_grad()
    def kl_estimate(self, batch) -> torch.Tensor:
        """Mean log-ratio of mismatched completions over the global batch, clamped at 0."""
        policy, reference = self.policy_logps(batch, "kl_"), self.reference_logps(batch, "kl_")
        logratios = policy.total - reference.total
        (kl, _), = self.weighted_means_across_devices({"kl": (logratios.mean(), len(logratios))}).values()
        return kl.clamp(min=0)

    def loss_and_metrics(self, batch):
        hp = self.hparams
        kl = self.kl_estimate(batch)
        policy, reference = self.policy_logps(batch), self.reference_logps(batch)
        logratios = policy.total - reference.total
        desirable = batch["desirable"]
        loss = kto_loss(logratios, desirable, kl, hp.beta, hp.desirable_weight, hp.undesirable_weight).mean()
        rewards, logps = hp.beta * logratios.detach(), policy.total.detach()
        metrics = {"kl": kl}
        for kind, rows in (("chosen", desirable), ("rejected", ~desirable)):
            # Over this device's rows of one kind (maybe none); log_metrics averages them over the global batch.
            metrics[f"rewards/{kind}"] = (rewards[rows].mean(), int(rows.sum()))
            metrics[f"logps/{kind}"] = (logps[rows].mean(), int(rows.sum()))
        means = self.weighted_means_across_devices({k: metrics[k] for k in ("rewards/chosen", "rewards/rejected")})
        (chosen, n_chosen), (rejected, n_rejected) = means.values()
        # The same global margin on every device; weight 0 when the global batch lacks a kind.
        metrics["rewards/margins"] = (chosen - rejected, len(rewards) if n_chosen and n_rejected else 0)
        return loss, metrics
