"""Small statistics for paired comparisons (per-image or per-token differences)."""

from __future__ import annotations

import numpy as np

from ..utils import check_int


def _finite(values: np.ndarray, name: str) -> np.ndarray:
    """``values`` if all are finite: a NaN would make every resampled mean NaN without a word."""
    if not np.isfinite(values).all():
        raise ValueError(f"{name} must be finite, got {int((~np.isfinite(values)).sum())} NaN or infinite value(s)")
    return values


def bootstrap_ci(values, confidence: float = 0.95, n_resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``values`` (1-D, finite), ``confidence``
    in (0, 1), ``n_resamples`` an int >= 1."""
    values = _finite(np.asarray(values, dtype=np.float64).ravel(), "values")
    if values.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), e.g. 0.95, got {confidence!r}")
    n_resamples = check_int(n_resamples, "n_resamples", 1)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, (n_resamples, values.size))].mean(axis=1)
    alpha = (1 - confidence) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def paired_permutation_test(before, after, n_resamples: int = 10_000, seed: int = 0) -> float:
    """Two-sided sign-flip permutation p-value for mean(after - before) != 0.

    Under the null hypothesis the sign of each paired difference is
    exchangeable; the p-value counts random sign flips whose |mean| reaches
    the observed one (with the +1 correction, so it is never 0). ``before`` and ``after`` hold the
    same number of finite values; ``n_resamples`` is an int >= 1.
    """
    before = _finite(np.asarray(before, dtype=np.float64).ravel(), "before")
    after = _finite(np.asarray(after, dtype=np.float64).ravel(), "after")
    if before.size != after.size:  # numpy would broadcast a single value against all the others
        raise ValueError(f"before and after must hold the same number of paired values, got {before.size} "
                         f"and {after.size}")
    diff = after - before
    if diff.size == 0:
        raise ValueError("paired_permutation_test needs at least one pair")
    n_resamples = check_int(n_resamples, "n_resamples", 1)
    rng = np.random.default_rng(seed)
    observed = abs(diff.mean())
    signs = rng.choice([-1.0, 1.0], size=(n_resamples, diff.size))
    null = np.abs((signs * diff).mean(axis=1))
    return float((1 + (null >= observed - 1e-12).sum()) / (n_resamples + 1))
