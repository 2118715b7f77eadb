"""The seed-and-prompt bootstrap on synthetic data whose variance is known: outcome = seed effect + prompt noise,
so the grand mean of S seeds x P prompts has variance sigma_seed^2 / S + sigma_prompt^2 / (S P)."""

import numpy as np
import pytest

from bench.stats import paired_seed_prompt_bootstrap, seed_prompt_bootstrap


def synthetic(rng, seeds: int, prompts: int, sigma_seed: float, sigma_prompt: float, mean: float = 0.5):
    return mean + rng.normal(0, sigma_seed, (seeds, 1)) + rng.normal(0, sigma_prompt, (seeds, prompts))


def test_interval_width_matches_the_known_variance():
    rng = np.random.default_rng(1)
    seeds, prompts, sigma_seed, sigma_prompt = 30, 60, 0.05, 0.3
    expected_sd = np.sqrt(sigma_seed**2 / seeds + sigma_prompt**2 / (seeds * prompts))
    widths = []
    for trial in range(20):
        _, low, high = seed_prompt_bootstrap(synthetic(rng, seeds, prompts, sigma_seed, sigma_prompt), resamples=2000,
                                             seed=trial)
        widths.append(high - low)
    assert np.mean(widths) == pytest.approx(2 * 1.96 * expected_sd, rel=0.12)


def test_interval_covers_the_true_mean_at_its_level():
    rng = np.random.default_rng(2)
    covered = 0
    trials = 200
    for trial in range(trials):
        values = synthetic(rng, 20, 40, 0.04, 0.25)
        _, low, high = seed_prompt_bootstrap(values, resamples=1000, seed=trial)
        covered += low <= 0.5 <= high
    assert 0.88 <= covered / trials <= 0.99


def test_seed_variance_widens_the_interval_beyond_the_prompt_bootstrap():
    """Ignoring the seeds (one pooled prompt bootstrap) would claim too narrow an interval when seeds vary."""
    rng = np.random.default_rng(3)
    values = synthetic(rng, 10, 50, 0.1, 0.2)
    _, low, high = seed_prompt_bootstrap(values, resamples=4000)
    pooled = values.reshape(1, -1)  # one "seed" of 500 prompts
    _, pooled_low, pooled_high = seed_prompt_bootstrap(pooled, resamples=4000)
    assert (high - low) > 2 * (pooled_high - pooled_low)


def test_paired_difference_cancels_what_rows_share():
    """Two rows that share the seed effects and differ by a constant: the paired interval is narrow and holds
    the constant; an unpaired reading of the same rows would be several times wider."""
    rng = np.random.default_rng(4)
    base = synthetic(rng, 5, 80, 0.1, 0.2)
    better = base + 0.05 + rng.normal(0, 0.02, base.shape)
    mean, low, high = paired_seed_prompt_bootstrap(better, base, resamples=4000)
    assert mean == pytest.approx(0.05, abs=0.005) and low > 0 and high - low < 0.02
    _, a_low, a_high = seed_prompt_bootstrap(better, resamples=4000)
    assert a_high - a_low > 5 * (high - low)


def test_one_seed_is_the_prompt_bootstrap_and_bad_shapes_are_refused():
    values = np.array([[1.0, 0.0, 1.0, 1.0, 0.5, 0.0, 1.0, 1.0]])
    mean, low, high = seed_prompt_bootstrap(values)
    assert mean == pytest.approx(0.6875) and 0.3 < low < mean < high <= 1.0
    with pytest.raises(ValueError, match="same seeds and prompts"):
        paired_seed_prompt_bootstrap(np.zeros((2, 3)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="seeds x prompts"):
        seed_prompt_bootstrap(np.zeros(5))
