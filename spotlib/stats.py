"""Intervals and paired tests for accuracies (per-image outcomes) and other per-image differences.

Every accuracy spotlib reports is a mean of per-image 0/1 outcomes, so its uncertainty over the
choice of test images is a bootstrap over images: :func:`bootstrap_ci`. Two methods scored on the
same images are compared by a paired test: :func:`mcnemar_test` (0/1 outcomes, exact) or
:func:`paired_permutation_test` (any paired values).
"""

from __future__ import annotations

import numpy as np

from .utils import check_int

EXACT_LEVELS = 64  # values with at most this many distinct levels are resampled through their counts


def _finite(values, name: str) -> np.ndarray:
    """``values`` as a flat float64 array if all are finite: a NaN would make every resampled mean NaN."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if not np.isfinite(values).all():
        raise ValueError(f"{name} must be finite, got {int((~np.isfinite(values)).sum())} NaN or infinite value(s)")
    return values


def bootstrap_means(values, n_resamples: int = 10_000, seed: int = 0) -> np.ndarray:
    """``n_resamples`` bootstrap replicates of the mean of ``values`` (1-D, finite, at least one).

    Values with few distinct levels (0/1 outcomes, their means over seeds) are resampled through
    their counts, which are multinomial under the bootstrap: the same distribution as drawing
    indices with replacement, in O(levels) per replicate instead of O(n)."""
    values = _finite(values, "values")
    if values.size == 0:
        raise ValueError("a bootstrap needs at least one value")
    n_resamples = check_int(n_resamples, "n_resamples", 1)
    rng = np.random.default_rng(seed)
    levels, counts = np.unique(values, return_counts=True)
    if len(levels) <= EXACT_LEVELS:
        draws = rng.multinomial(values.size, counts / values.size, size=n_resamples)
        return draws @ levels / values.size
    means = np.empty(n_resamples)
    for start in range(0, n_resamples, 256):  # chunks bound the memory of the index matrix
        stop = min(start + 256, n_resamples)
        means[start:stop] = values[rng.integers(0, values.size, (stop - start, values.size))].mean(axis=1)
    return means


def bootstrap_ci(values, confidence: float = 0.95, n_resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``values`` (1-D, finite), ``confidence``
    in (0, 1), ``n_resamples`` an int >= 1."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95, got {confidence!r}")
    means = bootstrap_means(values, n_resamples, seed)
    alpha = (1 - confidence) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def accuracy_with_ci(correct, confidence: float = 0.95, seed: int = 0) -> dict[str, float]:
    """``{"value", "ci_low", "ci_high", "n"}`` of per-image outcomes ``correct`` (n,) (bool or 0/1; means
    over seeds allowed), in percent, with the percentile bootstrap interval over images."""
    values = _finite(np.asarray(correct, dtype=np.float64), "correct")
    low, high = bootstrap_ci(values, confidence, seed=seed)
    return {"value": float(100 * values.mean()), "ci_low": 100 * low, "ci_high": 100 * high, "n": int(values.size)}


def mcnemar_test(correct_a, correct_b) -> float:
    """Exact two-sided McNemar p-value that two methods scored on the same images are equally accurate.

    Only the discordant images count (a right where b is wrong, and the reverse); under the null
    hypothesis each is either way with probability 1/2 (a binomial test). Returns 1.0 without
    discordant images."""
    from scipy.stats import binomtest

    a, b = np.asarray(correct_a).ravel(), np.asarray(correct_b).ravel()
    if not (np.isin(a, (0, 1)).all() and np.isin(b, (0, 1)).all()):
        raise ValueError("mcnemar_test takes 0/1 (bool) outcomes per image; for other paired values use "
                         "paired_permutation_test")
    a, b = a.astype(bool), b.astype(bool)
    if a.size != b.size:
        raise ValueError(f"correct_a and correct_b must score the same images, got {a.size} and {b.size} outcomes")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    return 1.0 if only_a + only_b == 0 else float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


def paired_permutation_test(before, after, n_resamples: int = 10_000, seed: int = 0) -> float:
    """Two-sided sign-flip permutation p-value for mean(after - before) != 0.

    Under the null hypothesis the sign of each paired difference is
    exchangeable; the p-value counts random sign flips whose |mean| reaches
    the observed one (with the +1 correction, so it is never 0). ``before`` and ``after`` hold the
    same number of finite values; ``n_resamples`` is an int >= 1.
    """
    before, after = _finite(before, "before"), _finite(after, "after")
    if before.size != after.size:  # numpy would broadcast a single value against all the others
        raise ValueError(f"before and after must hold the same number of paired values, got {before.size} "
                         f"and {after.size}")
    diff = after - before
    if diff.size == 0:
        raise ValueError("paired_permutation_test needs at least one pair")
    n_resamples = check_int(n_resamples, "n_resamples", 1)
    rng = np.random.default_rng(seed)
    observed = abs(diff.mean())
    magnitudes, counts = np.unique(np.abs(diff[diff != 0]), return_counts=True)
    if len(magnitudes) <= EXACT_LEVELS:
        # Few distinct |differences| (e.g. 0/1 outcomes): the number of positive signs among the k pairs
        # of one magnitude is Binomial(k, 1/2) under sign flipping, the same null distribution in O(levels).
        positive = rng.binomial(counts, 0.5, size=(n_resamples, len(magnitudes)))
        null = np.abs((2 * positive - counts) @ magnitudes / diff.size)
        exceed = int((null >= observed - 1e-12).sum())
    else:
        exceed = 0
        for start in range(0, n_resamples, 256):  # chunks bound the memory of the sign matrix
            signs = rng.choice([-1.0, 1.0], size=(min(256, n_resamples - start), diff.size))
            exceed += int((np.abs((signs * diff).mean(axis=1)) >= observed - 1e-12).sum())
    return float((1 + exceed) / (n_resamples + 1))


def paired_effect(correct_a, correct_b, confidence: float = 0.95, seed: int = 0) -> dict[str, float]:
    """How much more accurate method a is than b on the same images: ``{"diff", "ci_low", "ci_high",
    "p_value", "n"}``, the difference in percentage points with its bootstrap interval over images and
    a two-sided p-value: exact McNemar for 0/1 outcomes, the sign-flip permutation test otherwise
    (per-image means over seeds)."""
    a, b = _finite(correct_a, "correct_a"), _finite(correct_b, "correct_b")
    if a.size != b.size:
        raise ValueError(f"correct_a and correct_b must score the same images, got {a.size} and {b.size} outcomes")
    low, high = bootstrap_ci(a - b, confidence, seed=seed)
    binary = np.isin(a, (0, 1)).all() and np.isin(b, (0, 1)).all()
    p = mcnemar_test(a, b) if binary else paired_permutation_test(b, a, seed=seed)
    return {"diff": float(100 * (a - b).mean()), "ci_low": 100 * low, "ci_high": 100 * high, "p_value": p, "n": int(a.size)}
