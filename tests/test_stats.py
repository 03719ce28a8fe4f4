"""spotlib.stats: bootstrap intervals over images and paired tests (McNemar, sign-flip permutation)."""

import numpy as np
import pytest

from spotlib.stats import (accuracy_with_ci, bootstrap_ci, bootstrap_means, mcnemar_test, paired_effect,
                           paired_permutation_test)


def test_bootstrap_ci_covers_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    small = rng.normal(0.3, 1.0, 50)
    large = rng.normal(0.3, 1.0, 5000)
    lo_s, hi_s = bootstrap_ci(small, seed=0)
    lo_l, hi_l = bootstrap_ci(large, seed=0)
    assert lo_s < small.mean() < hi_s and lo_l < large.mean() < hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 5  # width ~ 1/sqrt(n): 100x the samples, ~10x narrower
    # the 95% interval of a large normal sample is close to mean +- 1.96 sd / sqrt(n)
    assert hi_l - lo_l == pytest.approx(2 * 1.96 / np.sqrt(5000), rel=0.1)


def test_bootstrap_ci_is_seeded_and_degenerate_for_constants():
    values = np.arange(20.0)
    assert bootstrap_ci(values, seed=3) == bootstrap_ci(values, seed=3)
    assert bootstrap_ci(np.full(10, 2.5)) == (2.5, 2.5)
    with pytest.raises(ValueError, match="at least one"):
        bootstrap_ci([])


def test_permutation_test_detects_a_shift_and_not_noise():
    rng = np.random.default_rng(0)
    before = rng.normal(0, 1, 200)
    shifted = before + 0.5 + rng.normal(0, 0.5, 200)
    noise = before + rng.normal(0, 0.5, 200)
    assert paired_permutation_test(before, shifted, seed=0) < 1e-3
    assert paired_permutation_test(before, noise, seed=0) > 0.05


def test_permutation_test_matches_the_exact_sign_flip_distribution():
    """With 4 pairs all 16 sign patterns can be enumerated: the Monte-Carlo p-value must approach it."""
    diff = np.array([1.0, 2.0, 3.0, -0.5])
    signs = np.array(np.meshgrid(*[[-1, 1]] * 4)).reshape(4, -1).T
    exact = np.mean(np.abs((signs * diff).mean(1)) >= abs(diff.mean()) - 1e-12)
    p = paired_permutation_test(np.zeros(4), diff, n_resamples=20000, seed=0)
    assert p == pytest.approx(exact, abs=0.01)


def test_permutation_p_value_is_never_zero():
    assert paired_permutation_test(np.zeros(30), np.ones(30), n_resamples=100) == pytest.approx(1 / 101)


# -- the fast paths agree with the plain definitions -------------------------------------------
def test_bootstrap_of_outcomes_matches_index_resampling():
    """0/1 outcomes go through multinomial counts; the replicate distribution must be the index bootstrap's."""
    rng = np.random.default_rng(2)
    correct = (rng.random(400) < 0.7).astype(float)
    fast = bootstrap_means(correct, n_resamples=20_000, seed=0)
    slow = correct[rng.integers(0, correct.size, (20_000, correct.size))].mean(axis=1)
    assert fast.mean() == pytest.approx(slow.mean(), abs=1e-3)
    assert fast.std() == pytest.approx(slow.std(), rel=0.03)
    assert np.quantile(fast, 0.025) == pytest.approx(np.quantile(slow, 0.025), abs=0.006)
    assert fast.std() == pytest.approx(np.sqrt(0.7 * 0.3 / 400), rel=0.1)  # the binomial standard error
    # many distinct levels take the index path; the interval is still centred on the mean
    spread = rng.normal(size=300)
    lo, hi = bootstrap_ci(spread)
    assert lo < spread.mean() < hi


def test_permutation_fast_path_matches_explicit_sign_flips():
    """Paired 0/1 outcomes (differences in {-1, 0, 1}) use binomial sign counts: same p as explicit flips."""
    rng = np.random.default_rng(3)
    a, b = (rng.random(300) < 0.6).astype(float), (rng.random(300) < 0.5).astype(float)
    diff = a - b
    signs = rng.choice([-1.0, 1.0], size=(20_000, diff.size))
    explicit = (1 + np.sum(np.abs((signs * diff).mean(1)) >= abs(diff.mean()) - 1e-12)) / 20_001
    assert paired_permutation_test(b, a, n_resamples=20_000, seed=0) == pytest.approx(explicit, abs=0.01)


def test_mcnemar_counts_only_discordant_images():
    from scipy.stats import binomtest

    a = np.array([1] * 30 + [0] * 10 + [1] * 50 + [0] * 10, bool)  # 30 only-a, 10 only-b, 60 concordant
    b = np.array([0] * 30 + [1] * 10 + [1] * 50 + [0] * 10, bool)
    assert mcnemar_test(a, b) == pytest.approx(binomtest(30, 40, 0.5).pvalue)
    assert mcnemar_test(a, a) == 1.0
    with pytest.raises(ValueError, match="0/1"):
        mcnemar_test([0.5, 1], [1, 0])
    with pytest.raises(ValueError, match="same images"):
        mcnemar_test([1, 0], [1])


def test_accuracy_and_paired_effect():
    correct = np.array([1] * 80 + [0] * 20, bool)
    acc = accuracy_with_ci(correct)
    assert acc["value"] == 80.0 and acc["n"] == 100 and acc["ci_low"] < 80 < acc["ci_high"]
    assert acc["ci_high"] - acc["ci_low"] == pytest.approx(2 * 1.96 * 4.0, rel=0.15)  # +-1.96 sqrt(.8 .2 / 100)
    other = correct.copy()
    other[:30] = False  # b loses 30 images a gets right
    effect = paired_effect(correct, other)
    assert effect["diff"] == pytest.approx(30.0) and effect["ci_low"] > 0 and effect["p_value"] < 1e-6
    seeds_mean = (correct.astype(float) + other) / 2  # per-image means over seeds: the sign-flip test
    assert 0 < paired_effect(seeds_mean, other)["p_value"] < 1e-3
