"""Bootstrap interval of the seed-averaged Gao curve's fitted gold peak: units (best-of-n prompts, PPO rollouts)
resampled with replacement within each seed, curves re-averaged over seeds and re-fitted as fit_points does.

Best-of-n: one prompt resample per seed and replicate, shared by every proxy of that seed (they score the same
samples), so the proxies' replicates are paired. PPO: rollouts resampled within each (seed, iteration),
independently per proxy; d (from the KL metric) is not resampled. Pure NumPy, float64.

Beside the fitted peak, the observed one (`observed_peak`): the d at which the averaged gold curve itself is
highest (PPO: after a centred running mean over `rl_window` iterations), with the same replicates. It needs no
functional form, so it stays meaningful where Gao's form misfits (PPO here: R^2 0.86-0.92), but it cannot lie
beyond the largest d measured: there it is a lower bound (`at_end` counts such replicates).
"""

from __future__ import annotations

import math

import numpy as np

from experiments import fits

_FITS = {"bon": (fits.fit_bon, fits.peak_d_bon), "rl": (fits.fit_rl, fits.peak_d_rl)}


def block_points(d, values, block: int) -> tuple[np.ndarray, np.ndarray]:
    """PPO points for a fit, `block` iterations per point: the first point (d = 0, the SFT policy: the baseline) kept
    as it is, the rest averaged over consecutive runs of `block` iterations (d and values alike; the last run may be
    shorter). block = 1 returns the points unchanged. One iteration's 32 rollouts per seed are a noisy measurement of
    the policy's gold; a block of them is the measurement at a checkpoint."""
    d, values = np.asarray(d, np.float64), np.asarray(values, np.float64)
    block = int(block)
    if block < 1:
        raise ValueError(f"block_points: block must be >= 1, got {block}")
    if block == 1 or len(d) <= 2:
        return d, values
    starts = range(1, len(d), block)
    d_b = np.array([d[0]] + [d[i : i + block].mean() for i in starts])
    v_b = np.array([values[0]] + [values[i : i + block].mean() for i in starts])
    return d_b, v_b


def fitted_peak(method: str, d, gold, rl_block: int = 1) -> float:
    """Gold peak d of the Gao fit to gold relative to its first point (as fit_points; PPO on block_points with
    rl_block); nan when unfittable."""
    fit, peak = _FITS[method]
    gold, d = np.asarray(gold, np.float64), np.asarray(d, np.float64)
    if method == "rl":
        d, gold = block_points(d, gold, rl_block)
    try:
        g = fit(d, gold - gold[0])
    except ValueError:
        return float("nan")
    return float(peak(g["alpha"], g["beta"], d_max=float(d.max())))


def running_mean(values, window: int) -> np.ndarray:
    """Centred running mean over `window` (odd) points; near the ends the window shrinks to the points that
    exist (no padding, so the first and last points are not pulled towards a repeated edge value)."""
    values = np.asarray(values, np.float64)
    if window < 1 or window % 2 == 0:
        raise ValueError(f"running_mean: window must be odd and >= 1, got {window}")
    half = window // 2
    sums = np.concatenate([[0.0], np.cumsum(values)])
    idx = np.arange(len(values))
    lo, hi = np.maximum(idx - half, 0), np.minimum(idx + half + 1, len(values))
    return (sums[hi] - sums[lo]) / (hi - lo)


def observed_peak(method: str, d, gold, rl_window: int = 11) -> float:
    """d of the highest point of the gold curve (best-of-n: as measured; PPO: its running mean over rl_window
    iterations, since one iteration's rollouts are noisy); the first such point on ties."""
    gold = np.asarray(gold, np.float64)
    curve = running_mean(gold, rl_window) if method == "rl" else gold
    return float(np.asarray(d, np.float64)[int(np.argmax(curve))])


def _order(peaks: dict, labels: list[str]) -> dict:
    """{'<a> < <b>': fraction of replicates whose peak of b (the next label) lies further out than a's (ties
    1/2; replicates where either is nan left out)}."""
    out = {}
    for a, b in zip(labels, labels[1:]):
        pa, pb = peaks[a], peaks[b]
        valid = ~(np.isnan(pa) | np.isnan(pb))
        further = (pb[valid] > pa[valid]) + 0.5 * (pb[valid] == pa[valid])  # inf > finite counts as further out
        out[f"{a} < {b}"] = float(np.mean(further)) if valid.any() else float("nan")
    return out


def percentile_inf_last(values, q: float) -> float:
    """q-th percentile (0..100, linear interpolation) with nan sorted as +inf, after inf; a bound that
    touches a non-finite replicate is inf (np.percentile would give nan for inf - inf)."""
    v = np.sort(np.where(np.isnan(values), np.inf, np.asarray(values, np.float64)))
    pos = q / 100.0 * (len(v) - 1)
    lo, hi = int(math.floor(pos)), int(math.ceil(pos))
    if not np.isfinite(v[hi]):
        return float("inf")
    return float(v[lo] + (v[hi] - v[lo]) * (pos - lo))


def _replicate_curves(per_seed: list[dict], method: str, labels: list[str], rng, resamples: int) -> list[dict]:
    """Per seed, {label: [B, K] resampled gold curve} (full-sample curve when resamples == 0 -> [1, K])."""
    out = []
    for s, seed_points in enumerate(per_seed):
        curves = {}
        if method == "bon":
            units = {label: np.asarray(seed_points["bon"][label]["gold_units"], np.float64) for label in labels}
            n_prompts = {u.shape[0] for u in units.values()}
            if len(n_prompts) != 1:
                raise ValueError(f"seed #{s}: best-of-n gold_units of {labels} have different prompt counts")
            (p,) = n_prompts
            idx = rng.integers(p, size=(resamples, p)) if resamples else np.arange(p)[None]  # [B, P], paired
            for label, u in units.items():
                curves[label] = u[idx].mean(axis=1)  # [B, P, K] -> [B, K]
        else:
            for label in labels:
                per_iter = seed_points["rl"][label]["gold_units"]  # [T][rollouts], ragged allowed
                curve = np.empty((max(resamples, 1), len(per_iter)))
                for t, u in enumerate(per_iter):
                    u = np.asarray(u, np.float64)
                    if u.size == 0:
                        raise ValueError(f"seed #{s}, rl {label}: iteration {t} has no gold_units")
                    idx = rng.integers(len(u), size=(resamples, len(u))) if resamples else np.arange(len(u))[None]
                    curve[:, t] = u[idx].mean(axis=1)
                curves[label] = curve
        out.append(curves)
    return out


def bootstrap_peaks(
    per_seed: list[dict], method: str, *, resamples: int = 1000, seed: int = 0, rl_window: int = 11, rl_block: int = 1
) -> dict:
    """Percentile bootstrap of the seed-averaged curve's fitted gold peak d, per proxy label.

    Args:
      per_seed: each seed's points ({method: {label: {'d': [K], 'gold_units': [P][K] (bon) or [T][R] (rl)}}}).
      method: 'bon' or 'rl'.
      resamples: B replicates.
      seed: the resampling rng's seed.
      rl_window: PPO iterations in the running mean of the observed peak (`observed_peak`).
      rl_block: PPO iterations per fitted point (`block_points`), as fit_points' rl_block.

    Returns:
      {label: {'peak' (un-resampled), 'low', 'high' (2.5 / 97.5 percentiles over all B, inf/nan sorted last),
      'median', 'n_inf', 'n_nan', 'resamples', 'observed': {'peak', 'low', 'high', 'at_end'} (the observed
      peak, its percentile interval and how many replicates peak at the largest d)}, 'order': {'<a> < <b>':
      fraction of replicates whose fitted peak of b (the next label) lies further out than a's (ties 1/2;
      replicates where either is nan left out)}, 'order_observed': the same for the observed peaks}.
    """
    if method not in _FITS:
        raise ValueError(f"bootstrap_peaks: method must be 'bon' or 'rl', got {method!r}")
    if resamples < 1:
        raise ValueError(f"bootstrap.resamples must be >= 1, got {resamples}")
    labels = list(per_seed[0][method])
    rng = np.random.default_rng(seed)
    full = _replicate_curves(per_seed, method, labels, rng, 0)
    reps = _replicate_curves(per_seed, method, labels, rng, resamples)
    out, peaks, observed = {}, {}, {}
    for label in labels:
        length = min(len(p[method][label]["d"]) for p in per_seed)  # common length, as mean_curve
        d = np.mean([np.asarray(p[method][label]["d"], np.float64)[:length] for p in per_seed], axis=0)  # [K]
        gold_full = np.mean([c[label][0, :length] for c in full], axis=0)  # [K]
        gold_reps = np.mean([c[label][:, :length] for c in reps], axis=0)  # [B, K]
        peaks[label] = np.array([fitted_peak(method, d, g, rl_block) for g in gold_reps])  # [B]
        finite = peaks[label][np.isfinite(peaks[label])]
        observed[label] = np.array([observed_peak(method, d, g, rl_window) for g in gold_reps])  # [B]
        out[label] = {
            "peak": fitted_peak(method, d, gold_full, rl_block),
            "low": percentile_inf_last(peaks[label], 2.5),
            "high": percentile_inf_last(peaks[label], 97.5),
            "median": percentile_inf_last(peaks[label], 50.0),
            "n_inf": int(np.sum(np.isinf(peaks[label]))),
            "n_nan": int(np.sum(np.isnan(peaks[label]))),
            "n_finite": int(finite.size),
            "resamples": int(resamples),
            "observed": {
                "peak": observed_peak(method, d, gold_full, rl_window),
                "low": float(np.percentile(observed[label], 2.5)),
                "high": float(np.percentile(observed[label], 97.5)),
                "at_end": int(np.sum(observed[label] == d.max())),
            },
        }
    out["order"] = _order(peaks, labels)
    out["order_observed"] = _order(observed, labels)
    return out


def format_ci(record: dict, digits: int = 2) -> str:
    """'(0.93, 2.41)' plus ' [k inf, m nan of B]' when some replicates never turned over or could not be fitted."""
    text = f"({record['low']:.{digits}f}, {record['high']:.{digits}f})"
    extra = [f"{record[k]} {k[2:]}" for k in ("n_inf", "n_nan") if record[k]]
    return text + (f" [{', '.join(extra)} of {record['resamples']}]" if extra else "")


def format_observed(record: dict, digits: int = 2) -> str:
    """'2.34 (1.81, 2.34)' for record['observed'], plus ' [k at the largest d of B]' (lower bounds) when some are."""
    o = record["observed"]
    text = f"{o['peak']:.{digits}f} ({o['low']:.{digits}f}, {o['high']:.{digits}f})"
    return text + (f" [{o['at_end']} at the largest d of {record['resamples']}]" if o["at_end"] else "")
