"""Small statistics for paired comparisons (per-image or per-token differences)."""

from __future__ import annotations

import numpy as np


def bootstrap_ci(values, confidence: float = 0.95, n_resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``values`` (1-D)."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if values.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, (n_resamples, values.size))].mean(axis=1)
    alpha = (1 - confidence) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def paired_permutation_test(before, after, n_resamples: int = 10_000, seed: int = 0) -> float:
    """Two-sided sign-flip permutation p-value for mean(after - before) != 0.

    Under the null hypothesis the sign of each paired difference is
    exchangeable; the p-value counts random sign flips whose |mean| reaches
    the observed one (with the +1 correction, so it is never 0).
    """
    diff = np.asarray(after, dtype=np.float64).ravel() - np.asarray(before, dtype=np.float64).ravel()
    if diff.size == 0:
        raise ValueError("paired_permutation_test needs at least one pair")
    rng = np.random.default_rng(seed)
    observed = abs(diff.mean())
    signs = rng.choice([-1.0, 1.0], size=(n_resamples, diff.size))
    null = np.abs((signs * diff).mean(axis=1))
    return float((1 + (null >= observed - 1e-12).sum()) / (n_resamples + 1))
