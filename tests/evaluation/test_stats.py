"""The seed-and-prompt bootstrap on synthetic data whose variance is known: outcome = seed effect + prompt noise,
so the grand mean of S seeds x P prompts has variance sigma_seed^2 / S + sigma_prompt^2 / (S P). Then the tests
against a fixed baseline: the paired difference (a t-test with one seed, crossed seed x prompt random effects
with several), Holm's adjustment and its interval levels, and the minimum detectable difference."""

import numpy as np
import pytest
from scipy import stats

from bench.evaluation.stats import (
    holm,
    minimum_detectable_difference,
    paired_difference,
    paired_seed_prompt_bootstrap,
    satterthwaite_df,
    seed_prompt_bootstrap,
)


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


def crossed(rng, seeds, prompts, sigma_seed, sigma_prompt, sigma_residual, mean=0.1):
    """D[s, p] = mean + seed_s + prompt_p + e: the grand mean has variance
    sigma_seed^2 / S + sigma_prompt^2 / P + sigma_residual^2 / (S P)."""
    return (mean + rng.normal(0, sigma_seed, (seeds, 1)) + rng.normal(0, sigma_prompt, (1, prompts))
            + rng.normal(0, sigma_residual, (seeds, prompts)))


def test_one_seed_is_scipys_paired_t_test():
    rng = np.random.default_rng(5)
    a, b = rng.normal(0.2, 1, (1, 40)), rng.normal(0, 1, (1, 40))
    difference = paired_difference(a, b)
    expected = stats.ttest_rel(a[0], b[0])
    assert difference.t == pytest.approx(expected.statistic) and difference.p == pytest.approx(expected.pvalue)
    assert difference.df == 39 and difference.se == pytest.approx(np.std(a - b, ddof=1) / np.sqrt(40))
    assert (difference.low, difference.high) == pytest.approx(tuple(expected.confidence_interval(0.95)))
    assert difference.interval(0.9) == pytest.approx(tuple(expected.confidence_interval(0.9)))


def test_seeds_and_prompts_standard_error_matches_the_true_spread():
    """Over many datasets the estimated variance of the grand mean averages to the true one."""
    rng = np.random.default_rng(6)
    seeds, prompts, sigmas = 3, 64, (0.2, 0.3, 0.5)
    true_sd = np.sqrt(sigmas[0] ** 2 / seeds + sigmas[1] ** 2 / prompts + sigmas[2] ** 2 / (seeds * prompts))
    zeros = np.zeros((seeds, prompts))
    results = [paired_difference(crossed(rng, seeds, prompts, *sigmas), zeros) for _ in range(2000)]
    assert np.std([r.mean for r in results]) == pytest.approx(true_sd, rel=0.05)  # the simulation is right
    assert np.sqrt(np.mean([r.se**2 for r in results])) == pytest.approx(true_sd, rel=0.05)
    assert 1.5 < np.median([r.df for r in results]) < 3  # the seed component dominates: df approaches S - 1 = 2


def test_crossed_interval_covers_the_true_mean_at_its_level():
    """Where the seed component dominates, the 95 % interval covers the true mean 93-97 % of the time; where
    it is null, it covers at least 95 % (conservative: 3 seeds cannot show that it is null)."""
    rng = np.random.default_rng(7)
    for sigmas, bounds in (((0.5, 0.3, 0.5), (0.93, 0.97)), ((0.0, 0.3, 0.5), (0.95, 1.0))):
        covered = 0
        for _ in range(2000):
            difference = paired_difference(crossed(rng, 3, 128, *sigmas), np.zeros((3, 128)))
            covered += difference.low <= 0.1 <= difference.high
        assert bounds[0] <= covered / 2000 <= bounds[1], sigmas


def test_identical_rows_and_bad_shapes():
    same = np.random.default_rng(8).integers(0, 5, size=(3, 10)).astype(float)
    difference = paired_difference(same, same)
    assert (difference.mean, difference.p, difference.low, difference.high, difference.se) == (0, 1, 0, 0, 0)
    shifted = paired_difference(same + 0.5, same)
    assert shifted.p == 0 and shifted.low == shifted.high == pytest.approx(0.5)
    with pytest.raises(ValueError, match=r"\(2, 3\) and \(3, 3\)"):
        paired_difference(np.zeros((2, 3)), np.zeros((3, 3)))


def test_satterthwaite_degrees_of_freedom():
    assert satterthwaite_df([(2.0, 7, 1.0)]) == pytest.approx(7)
    assert satterthwaite_df([(1.0, 5, 1.0), (1.0, 5, 1.0)]) == pytest.approx(10)  # two equal halves: df add up
    # (1 + 4 - 1)^2 / (1/2 + 16/10 + 1/20)
    assert satterthwaite_df([(1.0, 2, 1.0), (4.0, 10, 1.0), (1.0, 20, -1.0)]) == pytest.approx(16 / 2.15)


def test_holm_against_a_hand_worked_example():
    """p = [0.01, 0.04, 0.03, 0.005], alpha 0.05. Sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06,
    0.04 x 1 = 0.04 -> monotone 0.06. Rejected: the first two steps; the third (0.03 > 0.05 / 2) stops."""
    result = holm([0.01, 0.04, 0.03, 0.005])
    assert result.adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert result.rejected.tolist() == [True, False, False, True]
    assert result.levels == pytest.approx([1 - 0.05 / 3, 1 - 0.05 / 2, 1 - 0.05 / 2, 1 - 0.05 / 4])
    assert holm([0.5, 0.9]).adjusted == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([]).adjusted.size == 0


def test_holm_is_monotone_and_its_interval_levels_agree_with_it():
    """On random tables of paired differences: adjusted p-values follow the raw order, and each row's interval
    at its returned level excludes 0 exactly when Holm rejects it."""
    rng = np.random.default_rng(9)
    disagreements, decisions = 0, []
    for _ in range(300):
        m = int(rng.integers(1, 9))
        differences = [paired_difference(crossed(rng, 3, 32, 0.1, 0.2, 0.5, mean=rng.choice([0, 0.2, 0.5])),
                                         np.zeros((3, 32))) for _ in range(m)]
        result = holm([d.p for d in differences])
        order = np.argsort([d.p for d in differences])
        assert np.all(np.diff(result.adjusted[order]) >= 0) and np.all(result.adjusted <= 1)
        for difference, rejected, level in zip(differences, result.rejected, result.levels):
            low, high = difference.interval(level)
            disagreements += (low > 0 or high < 0) != rejected
            decisions.append(bool(rejected))
        assert np.all(result.adjusted >= [d.p for d in differences])
    assert disagreements == 0
    assert 100 < sum(decisions) < len(decisions) - 100  # both decisions were put to the test, many times


def test_minimum_detectable_difference_formula_and_power():
    """(t_{1-alpha/2} + t_power) * se; with one seed of 64 prompts, a true difference of the MDE is found about
    80 % of the time."""
    assert minimum_detectable_difference(0.1, 30, 0.05) == pytest.approx(
        (stats.t.ppf(0.975, 30) + stats.t.ppf(0.8, 30)) * 0.1)
    assert minimum_detectable_difference(1.0, 1e9, 0.05) == pytest.approx(1.959964 + 0.841621, rel=1e-5)
    rng = np.random.default_rng(10)
    mde = minimum_detectable_difference(1 / np.sqrt(64), 63, 0.05)
    found = [paired_difference(rng.normal(mde, 1, (1, 64)), np.zeros((1, 64))).p < 0.05 for _ in range(2000)]
    assert 0.7 <= np.mean(found) <= 0.9
