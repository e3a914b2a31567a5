"""Confidence intervals and correlations for the numbers the tables print.

Two kinds of 95% interval cover what the project reports:

* `bootstrap_ci`: percentile bootstrap over the units of one run (e.g. the preference pairs
  of an eval set: resample N pairs with replacement, recompute the statistic, take the
  2.5% / 97.5% quantiles). The resampling rng is seeded, so a rerun prints the same
  interval.
* `t_interval`: across independent runs (seeds): mean +- t_{(1+level)/2, n-1} * s / sqrt(n),
  with s the sample standard deviation (ddof=1).

`pearson` / `spearman` are plain NumPy (Spearman = Pearson of average ranks, ties sharing
the mean rank, as scipy.stats.spearmanr does) so the runtime needs no scipy.

All maths is float64 NumPy.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def _as_1d(values, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"common/stats.py: {name} must be 1-D, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        bad = int(np.flatnonzero(~np.isfinite(array))[0])
        raise ValueError(f"common/stats.py: {name}[{bad}] = {array[bad]} is not finite")
    return array


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"common/stats.py: level must be in (0, 1), got {level}")


def bootstrap_ci(
    values,
    *,
    statistic: Callable[[np.ndarray], float] | None = None,
    level: float = 0.95,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict:
    """Percentile bootstrap interval of `statistic` (default: the mean) over the rows of `values`.

    Args:
      values: [N] per-unit values (e.g. 1.0 / 0.0 per pair for accuracy), or [N, ...] rows
        passed whole to `statistic`.
      statistic: function of a resampled [N, ...] array -> float; None = np.mean over axis 0.
      level: coverage, e.g. 0.95.
      n_resamples: bootstrap resamples.
      seed: seed of np.random.default_rng; the same seed gives the same interval.

    Returns:
      {'estimate': statistic(values), 'low', 'high': the (1-level)/2 and (1+level)/2 quantiles
      of the resampled statistics (numpy's linear interpolation), 'level', 'n', 'n_resamples'}.
    """
    _check_level(level)
    values = np.asarray(values, dtype=np.float64)
    if values.ndim < 1 or values.shape[0] < 1:
        raise ValueError(f"common/stats.py: bootstrap_ci needs at least one row, got shape {values.shape}")
    if n_resamples < 1:
        raise ValueError(f"common/stats.py: n_resamples must be >= 1, got {n_resamples}")
    statistic = statistic or (lambda x: float(np.mean(x, axis=0)))
    n = values.shape[0]
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, n, size=(n_resamples, n))  # [R, N]
    resampled = np.array([statistic(values[row]) for row in indices], np.float64)  # [R]
    low, high = np.quantile(resampled, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return {
        "estimate": float(statistic(values)),
        "low": float(low),
        "high": float(high),
        "level": float(level),
        "n": int(n),
        "n_resamples": int(n_resamples),
    }


def t_interval(values, *, level: float = 0.95) -> dict:
    """Student-t interval of the mean of independent values (e.g. one result per seed).

    mean +- t_{(1+level)/2, n-1} * std(ddof=1) / sqrt(n). With one value the interval is
    undefined: low = high = nan (never a fake zero-width interval).

    Returns:
      {'mean', 'low', 'high', 'half_width', 'std', 'level', 'n'}.
    """
    _check_level(level)
    values = _as_1d(values, "values")
    n = values.size
    if n == 0:
        raise ValueError("common/stats.py: t_interval needs at least one value")
    mean = float(np.mean(values))
    if n == 1:
        nan = float("nan")
        return {"mean": mean, "low": nan, "high": nan, "half_width": nan, "std": nan, "level": float(level), "n": 1}
    from scipy import stats as scipy_stats  # only here: the t quantile (scipy ships with statsmodels)

    std = float(np.std(values, ddof=1))
    half = float(scipy_stats.t.ppf((1.0 + level) / 2.0, df=n - 1)) * std / np.sqrt(n)
    return {
        "mean": mean,
        "low": mean - half,
        "high": mean + half,
        "half_width": half,
        "std": std,
        "level": float(level),
        "n": int(n),
    }


def average_ranks(values) -> np.ndarray:
    """1-based ranks of [N] values; tied values share the mean of their ranks."""
    values = _as_1d(values, "values")
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(values.size, np.float64)
    # Runs of equal values: each run [start, end) gets the mean rank (start + end + 1) / 2.
    boundaries = np.flatnonzero(np.diff(sorted_values) != 0) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [values.size]])
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = 0.5 * (start + end + 1)
    return ranks


def pearson(x, y) -> float:
    """Pearson correlation of two [N] arrays; nan if either is constant or N < 2."""
    x, y = _as_1d(x, "x"), _as_1d(y, "y")
    if x.shape != y.shape:
        raise ValueError(f"common/stats.py: x has {x.size} values but y has {y.size}")
    if x.size < 2:
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    denominator = np.sqrt(np.sum(dx * dx) * np.sum(dy * dy))
    return float(np.sum(dx * dy) / denominator) if denominator > 0 else float("nan")


def spearman(x, y) -> float:
    """Spearman rank correlation: Pearson of the average ranks (ties share ranks)."""
    return pearson(average_ranks(x), average_ranks(y))
