"""RRHF: Rank Responses to align with Human Feedback (Yuan et al. 2023), without a reference model.

Each prompt brings k candidates ranked by the proxy reward model (the ranked view). The policy's
length-normalised log-probs must order the candidates as the rewards do, and the best-rewarded
candidate is also fitted by supervised learning.
"""

from typing import Literal

from jsonargparse.typing import PositiveFloat

from modules.base import AlignmentModule, require_positive
from modules.losses import rank_agreement, rrhf_loss


class RRHF(AlignmentModule):
    """L = rank_weight * L_rank + L_sft on batches of any number of prompts and any k >= 2.

    Args:
        rank_weight: w, the weight of the ranking loss (1 in the paper).
        sft_reduction: L_sft over the best candidate's tokens: "sum", the paper's -sum_t log p (eq. 3), or
            "mean", the per-token mean, which shrinks L_sft by the response length and so weighs the ranking
            loss more (the authors' code divides the sum by the padded width, in between).
    """

    name = "rrhf"
    data_view = "ranked"
    needs_reference = False
    proxy_setting = "data.proxy"
    pruning_metric = "val/rank_accuracy"
    colour = "#d62728"

    def __init__(self, rank_weight: PositiveFloat = 1.0, sft_reduction: Literal["sum", "mean"] = "sum", **kwargs):
        super().__init__(**kwargs)
        require_positive(rank_weight=rank_weight)
        self.save_hyperparameters(logger=False)

    def loss_and_metrics(self, batch):
        rewards, valid = batch["rewards"], batch["candidate_mask"]
        # s_i: mean token log-prob of candidate i; rows are prompt-major, k per prompt.
        logps = self.policy_logps(batch)
        scores = logps.mean.view_as(rewards)
        rank_loss = rrhf_loss(scores, rewards, valid).mean()
        best = rewards.masked_fill(~valid, float("-inf")).argmax(dim=1, keepdim=True)
        fitted = scores if self.hparams.sft_reduction == "mean" else logps.total.view_as(rewards)
        sft_loss = -fitted.gather(1, best).mean()  # NLL of the best-rewarded candidate
        loss = self.hparams.rank_weight * rank_loss + sft_loss
        agreeing, ranked_pairs = rank_agreement(scores.detach(), rewards, valid)
        metrics = {
            "loss_rank": rank_loss,
            "loss_sft": sft_loss,
            "rank_accuracy": (agreeing / ranked_pairs.clamp(min=1), int(ranked_pairs)),
        }
        return loss, metrics

    def examples_in(self, batch: dict) -> int:
        return batch["rewards"].shape[0]  # prompts, each with k rows
