"""Confidence intervals that cover both sources of variation in a comparison: the seeds (training, reward
models, sampling) and the evaluation prompts.

A row's outcomes are an (S seeds x P prompts) array; every seed is evaluated on the same P prompts. The
bootstrap resamples seeds with replacement, then prompts with replacement within each resampled seed, and
takes the grand mean. Two rows are compared pairwise: the same resampled seeds and prompts for both, so that
what the seeds and prompts share cancels. With one seed it is the paired prompt bootstrap.

With few seeds (3 is common) the seed level of any bootstrap is coarse: it sees only S values, and its
variance estimate is biased low by (S - 1) / S. Read a 3-seed interval as a lower bound on the uncertainty.
"""

import numpy as np


def _indices(shape: tuple[int, int], resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    seeds, prompts = shape
    rng = np.random.default_rng(seed)
    seed_draws = rng.integers(0, seeds, (resamples, seeds))
    prompt_draws = rng.integers(0, prompts, (resamples, seeds, prompts))
    return seed_draws[:, :, None], prompt_draws


def _interval(values: np.ndarray, confidence: float, resamples: int, seed: int) -> tuple[float, float, float]:
    values = np.asarray(values, dtype=float)
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"outcomes must be a non-empty (seeds x prompts) array, got shape {values.shape}")
    seed_draws, prompt_draws = _indices(values.shape, resamples, seed)
    means = values[seed_draws, prompt_draws].mean(axis=(1, 2))
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(values.mean()), float(low), float(high)


def seed_prompt_bootstrap(values, confidence: float = 0.95, resamples: int = 10_000,
                          seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high) of the grand mean of a (seeds x prompts) array."""
    return _interval(values, confidence, resamples, seed)


def paired_seed_prompt_bootstrap(a, b, confidence: float = 0.95, resamples: int = 10_000,
                                 seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high) of mean(a) - mean(b), where a and b share their seeds and prompts, position by position."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired outcomes need the same seeds and prompts, got shapes {a.shape} and {b.shape}")
    return _interval(a - b, confidence, resamples, seed)
