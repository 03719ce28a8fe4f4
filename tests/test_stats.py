"""Statistics used by case study 3: bootstrap intervals and the paired sign-flip permutation test."""

import numpy as np
import pytest

from spotlib.paper.stats import bootstrap_ci, paired_permutation_test


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
