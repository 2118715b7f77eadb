"""A run's evaluation metrics with bootstrap confidence intervals, as torchmetrics Metrics so that their state
(the per-prompt values) is gathered correctly across devices before anything is computed. The statistics live
in this folder: these per-run metrics, and the tables' tests in `bench.evaluation.stats`, whose bootstrap both use."""

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from bench.evaluation.stats import seed_prompt_bootstrap


def bootstrap_ci(values: torch.Tensor, confidence: float = 0.95, resamples: int = 2000, seed: int = 0):
    """Percentile bootstrap interval of the mean: `bench.evaluation.stats`'s bootstrap (the tables' own) over one
    seed's prompts. Values are sorted first, so the interval depends only on the multiset of values, not on the
    order in which devices gathered them."""
    values = values.double().sort().values.cpu().numpy()[None, :]
    _, low, high = seed_prompt_bootstrap(values, confidence, resamples, seed)
    return low, high


class BootstrapMean(Metric):
    """Mean of per-example values, with a percentile-bootstrap confidence interval."""

    full_state_update = False

    def __init__(self, confidence: float = 0.95, resamples: int = 2000, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.confidence, self.resamples, self.seed = confidence, resamples, seed
        self.add_state("values", default=[], dist_reduce_fx="cat")

    def update(self, values: torch.Tensor) -> None:
        self.values.append(values.detach().double().flatten())

    def compute(self) -> dict[str, float]:
        values = dim_zero_cat(self.values)
        if values.numel() == 0:
            raise ValueError(f"{type(self).__name__} has no values to compute")
        low, high = bootstrap_ci(values, self.confidence, self.resamples, self.seed)
        return {"value": values.mean().item(), "ci_low": low, "ci_high": high, "n": values.numel()}


def win_outcomes(policy_scores: torch.Tensor, baseline_scores: torch.Tensor) -> torch.Tensor:
    """1 where the policy's score beats the baseline's, 1/2 on a tie, 0 otherwise."""
    return (policy_scores > baseline_scores).double() + 0.5 * (policy_scores == baseline_scores).double()


class WinRate(BootstrapMean):
    """Fraction of prompts on which the policy beats a baseline (ties count 1/2), with a bootstrap CI.
    `update` takes the two score tensors, or precomputed outcomes (pairwise judges) via `outcomes=`."""

    def update(self, policy_scores: torch.Tensor | None = None, baseline_scores: torch.Tensor | None = None,
               outcomes: torch.Tensor | None = None) -> None:
        if outcomes is None:
            outcomes = win_outcomes(policy_scores, baseline_scores)
        super().update(outcomes)
