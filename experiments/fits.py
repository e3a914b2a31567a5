"""Over-optimisation curves (Gao, Schulman, Hilton 2022): fits, best-of-n maths, plots.

With d = sqrt(KL(pi || pi_init)) and rewards measured relative to the initial
policy (R(0) = 0), the gold reward follows

  best-of-n:  R(d) = d (alpha - beta d)
  RL:         R(d) = d (alpha - beta log d)

Both are linear in (alpha, beta), so the fits are ordinary least squares with no
intercept. The KL of best-of-n against its base policy is log n - (n - 1) / n.

  d = np.sqrt(bon_kl(np.array([1, 2, 4, 8, 16])))
  fit = fit_bon(d, gold)            # {'alpha', 'beta', 'r2'}
  peak_d_bon(fit['alpha'], fit['beta'])

Fits run in float64 NumPy: they are tiny, and recovering (alpha, beta) to 1e-6
needs more than float32's 7 digits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

__all__ = [
    "bon_kl",
    "fit_bon",
    "fit_rl",
    "bon_curve",
    "rl_curve",
    "peak_d_bon",
    "peak_d_rl",
    "best_of_n_indices",
    "best_of_n_weights",
    "best_of_n_estimate",
    "best_of_n_prompt_estimates",
    "plot_overoptimization",
]


def bon_kl(n):
    """KL(best-of-n || base) = log n - (n - 1) / n nats (an upper bound that is tight in practice)."""
    n = np.asarray(n, np.float64)
    if np.any(n < 1):
        raise ValueError(f"bon_kl: n must be >= 1, got {n}.")
    return np.log(n) - (n - 1.0) / n


def _as_points(d, r, *, name: str) -> tuple[np.ndarray, np.ndarray]:
    d = np.asarray(d, np.float64).reshape(-1)  # [K]
    r = np.asarray(r, np.float64).reshape(-1)  # [K]
    if d.shape != r.shape:
        raise ValueError(f"{name}: d and r must have the same length, got {d.size} and {r.size}.")
    if not (np.all(np.isfinite(d)) and np.all(np.isfinite(r))):
        raise ValueError(f"{name}: d and r must be finite.")
    if np.any(d < 0):
        raise ValueError(f"{name}: d = sqrt(KL) must be >= 0, got min {d.min()}.")
    return d, r


def _least_squares(design: np.ndarray, r: np.ndarray, *, name: str) -> dict:
    """Solves r ~ design @ (alpha, beta); r2 = 1 - SS_res / SS_tot.

    Standard errors are the OLS ones: cov = s^2 (X^T X)^-1 with s^2 = SS_res / (K - 2)
    (K points, two parameters, no intercept); nan with K = 2 (no residual degree of freedom).
    """
    if np.linalg.matrix_rank(design) < 2:
        raise ValueError(
            f"{name}: needs at least two distinct d > 0 to fit (alpha, beta); got d = {design[:, 0].tolist()}."
        )
    (alpha, beta), *_ = np.linalg.lstsq(design, r, rcond=None)
    residual = r - design @ np.array([alpha, beta])  # [K]
    ss_res = float(np.sum(residual**2))
    ss_tot = float(np.sum((r - r.mean()) ** 2))
    # Constant r (e.g. all zeros): r2 is undefined; report a perfect fit as 1.
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else float("nan"))
    dof = design.shape[0] - 2
    if dof > 0:
        covariance = ss_res / dof * np.linalg.inv(design.T @ design)  # [2, 2]
        alpha_se, beta_se = np.sqrt(np.diag(covariance))
    else:
        alpha_se = beta_se = float("nan")
    return {
        "alpha": float(alpha),
        "beta": float(beta),
        "r2": float(r2),
        "alpha_se": float(alpha_se),
        "beta_se": float(beta_se),
        "dof": int(dof),
    }


def fit_bon(d, r) -> dict:
    """Least-squares fit of R(d) = d (alpha - beta d).

    Returns {'alpha', 'beta', 'r2', 'alpha_se', 'beta_se', 'dof'} (OLS standard errors).
    """
    d, r = _as_points(d, r, name="fit_bon")
    design = np.stack([d, -(d**2)], axis=1)  # [K, 2]
    return _least_squares(design, r, name="fit_bon")


def _d_log_d(d: np.ndarray) -> np.ndarray:
    # d log d -> 0 as d -> 0, so a d = 0 point is predicted as R = 0 whatever (alpha, beta).
    safe = np.where(d > 0, d, 1.0)
    return np.where(d > 0, d * np.log(safe), 0.0)


def fit_rl(d, r) -> dict:
    """Least-squares fit of R(d) = d (alpha - beta log d); returns {'alpha', 'beta', 'r2',
    'alpha_se', 'beta_se', 'dof'} (OLS standard errors, as fit_bon).

    log d needs d > 0; points at d = 0 use the limit R(0) = 0 (they inform no
    parameter but count in r2).
    """
    d, r = _as_points(d, r, name="fit_rl")
    design = np.stack([d, -_d_log_d(d)], axis=1)  # [K, 2]
    return _least_squares(design, r, name="fit_rl")


def bon_curve(d, alpha: float, beta: float) -> np.ndarray:
    """R(d) = d (alpha - beta d)."""
    d = np.asarray(d, np.float64)
    return d * (alpha - beta * d)


def rl_curve(d, alpha: float, beta: float) -> np.ndarray:
    """R(d) = d (alpha - beta log d), with R(0) = 0."""
    d = np.asarray(d, np.float64)
    return alpha * d - beta * _d_log_d(d)


def _no_maximum_peak(value_at_d_max: float | None, alpha: float, beta: float) -> float:
    """The peak of a fitted curve with no interior maximum (beta <= 0: linear or convex, R(0) = 0).

    Over d >= 0 it rises for ever (inf) unless it is a line that never rises (beta = 0 >= alpha: 0). A
    convex curve (beta < 0) that starts by falling rises again only past its minimum, so over the range
    measured, [0, d_max], its maximum is at an end: d = 0 when R(d_max) <= 0 (the gold only fell; the upturn
    is an extrapolation), else inf (still rising where the measurements stop). Without d_max: inf."""
    if beta == 0:
        return math.inf if alpha > 0 else 0.0
    if value_at_d_max is not None and value_at_d_max <= 0:
        return 0.0
    return math.inf


def peak_d_bon(alpha: float, beta: float, d_max: float | None = None) -> float:
    """argmax over d >= 0 of d (alpha - beta d): alpha / (2 beta) for beta > 0 (0 when alpha <= 0).

    beta <= 0 (no turn-over): inf, or 0 when the curve only falls over the range measured, [0, d_max]
    (`_no_maximum_peak`).
    """
    if beta > 0:
        return max(alpha / (2.0 * beta), 0.0)
    return _no_maximum_peak(None if d_max is None else float(bon_curve(d_max, alpha, beta)), alpha, beta)


def peak_d_rl(alpha: float, beta: float, d_max: float | None = None) -> float:
    """argmax over d > 0 of d (alpha - beta log d): exp(alpha / beta - 1) for beta > 0.

    (dR/dd = alpha - beta (log d + 1) = 0.) beta <= 0: inf, or 0 when the curve only falls over the range
    measured, [0, d_max] (`_no_maximum_peak`: e.g. alpha < 0 and beta < 0, a curve that falls and whose fitted
    upturn lies past d_max).
    """
    if beta > 0:
        # A tiny beta puts the peak past any float (a curve still rising where it was measured): inf, not a crash.
        exponent = alpha / beta - 1.0
        return math.exp(exponent) if exponent < 700.0 else math.inf
    return _no_maximum_peak(None if d_max is None else float(rl_curve(d_max, alpha, beta)), alpha, beta)


# ----------------------------------------------------------------------------- best-of-n


def _check_scores(scores, n: int, *, name: str) -> np.ndarray:
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 2:
        raise ValueError(f"{name}: expected scores of shape [n_prompts, n_samples], got {scores.shape}.")
    if not 1 <= n <= scores.shape[1]:
        raise ValueError(f"{name}: need 1 <= n <= n_samples = {scores.shape[1]}, got n = {n}.")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{name}: scores must be finite.")
    return scores


def best_of_n_indices(scores, n: int, *, rng: np.random.Generator | None = None) -> np.ndarray:
    """Index of the best-of-n sample per prompt: [P, N] scores -> [P] int64.

    Without rng the candidates are the first n samples of each row; with rng, a
    random n-subset per row. Ties go to the lowest index (np.argmax).
    """
    scores = _check_scores(scores, n, name="best_of_n_indices")
    n_prompts, n_samples = scores.shape
    if rng is None:
        candidates = np.broadcast_to(np.arange(n), (n_prompts, n))  # [P, n]
    else:
        candidates = np.argsort(rng.random((n_prompts, n_samples)), axis=1)[:, :n]  # [P, n]
    best = np.argmax(np.take_along_axis(scores, candidates, axis=1), axis=1)  # [P]
    return np.take_along_axis(candidates, best[:, None], axis=1)[:, 0].astype(np.int64)


def best_of_n_weights(n_samples: int, n: int) -> np.ndarray:
    """[N] probabilities that the rank-i sample (ascending, 1-based) wins a random n-subset.

    P(rank i is the max) = C(i - 1, n - 1) / C(N, n): the other n - 1 members come
    from the i - 1 lower ranks. Computed in log space so large N does not overflow.
    """
    log_w = np.full(n_samples, -np.inf)
    for i in range(n, n_samples + 1):
        log_w[i - 1] = math.lgamma(i) - math.lgamma(n) - math.lgamma(i - n + 1)
    log_w -= math.lgamma(n_samples + 1) - math.lgamma(n + 1) - math.lgamma(n_samples - n + 1)
    weights = np.exp(log_w)
    return weights / weights.sum()  # Sums to 1 exactly in theory (hockey-stick identity).


def best_of_n_estimate(proxy, gold, n: int, *, rng: np.random.Generator | None = None) -> tuple[float, float]:
    """Unbiased estimate of E[proxy] and E[gold] of best-of-n (by proxy) from N >= n samples.

    Averages over all n-subsets of each prompt's N samples at once (Nakano et al.
    2021; Gao et al. 2022, appendix): sort by proxy, weight rank i by
    C(i - 1, n - 1) / C(N, n). Tied proxy scores go to the lowest sample index,
    as np.argmax over a subset would; with rng they are broken at random.

    Args:
      proxy: [P, N] proxy-RM scores (the selection criterion).
      gold: [P, N] gold rewards of the same samples.
      n: best-of-n, 1 <= n <= N.
      rng: optional numpy Generator for random tie-breaking.

    Returns:
      (mean proxy, mean gold) of the best-of-n sample, averaged over prompts.
    """
    proxy_units, gold_units = best_of_n_prompt_estimates(proxy, gold, n, rng=rng)
    return float(np.mean(proxy_units)), float(np.mean(gold_units))


def best_of_n_prompt_estimates(
    proxy, gold, n: int, *, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per prompt, the unbiased best-of-n estimate of E[proxy] and E[gold]: ([P], [P]) float64.

    best_of_n_estimate is their mean over prompts; the bootstrap of the fitted gold peak
    (experiments/peak_bootstrap.py) resamples these prompt units. Args and ties as best_of_n_estimate.
    """
    proxy = _check_scores(proxy, n, name="best_of_n_estimate")
    gold = np.asarray(gold, np.float64)
    if gold.shape != proxy.shape:
        raise ValueError(f"best_of_n_estimate: gold shape {gold.shape} != proxy shape {proxy.shape}.")
    n_prompts, n_samples = proxy.shape
    # Secondary key decides ties: a larger key ranks higher and so wins the subset.
    if rng is None:
        tie_key = -np.broadcast_to(np.arange(n_samples), proxy.shape)  # lowest index ranks highest
    else:
        tie_key = rng.random(proxy.shape)
    order = np.lexsort((tie_key, proxy), axis=1)  # [P, N], ascending by proxy, then tie key
    weights = best_of_n_weights(n_samples, n)  # [N]
    proxy_sorted = np.take_along_axis(proxy, order, axis=1)  # [P, N]
    gold_sorted = np.take_along_axis(gold, order, axis=1)  # [P, N]
    return proxy_sorted @ weights, gold_sorted @ weights  # [P], [P]


# ----------------------------------------------------------------------------- plot


def plot_overoptimization(
    points: Mapping[str, Mapping[str, np.ndarray]],
    fits: Mapping[str, Mapping[str, Mapping[str, float]]] | None,
    path: str,
    *,
    method: str = "bon",
    title: str = "",
) -> str:
    """Gold (filled) and proxy (hollow) reward vs d with the fitted curves, as a PNG.

    Args:
      points: proxy label -> {'d': [K], 'gold': [K], 'proxy': [K]} (proxy optional).
      fits: proxy label -> {'gold': {'alpha', 'beta'}, 'proxy': {...} (optional)}, or
        None. Gold curves are solid, proxy curves dashed, in the label's colour.
      path: output .png file.
      method: 'bon' (d (alpha - beta d)) or 'rl' (d (alpha - beta log d)).
      title: figure title.

    Returns:
      path.
    """
    import matplotlib

    matplotlib.use("Agg")  # Files only; never needs a display.
    import matplotlib.pyplot as plt

    curves = {"bon": bon_curve, "rl": rl_curve}
    if method not in curves:
        raise ValueError(f"plot_overoptimization: method must be 'bon' or 'rl', got {method!r}.")
    fits = fits or {}
    unknown = sorted(set(fits) - set(points))
    if unknown:
        raise ValueError(f"plot_overoptimization: fits for labels with no points: {unknown}.")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, ax = plt.subplots(figsize=(9.0, 4.4))
    d_max = max([float(np.max(p["d"])) for p in points.values() if np.size(p["d"])] + [1e-3])
    grid = np.linspace(0.0, 1.05 * d_max, 200)
    for i, (label, p) in enumerate(points.items()):
        color = colors[i % len(colors)]
        if "d" not in p or "gold" not in p:
            raise ValueError(f"plot_overoptimization: points[{label!r}] needs 'd' and 'gold' arrays.")
        ax.scatter(p["d"], p["gold"], color=color, label=f"{label}: gold", zorder=3)
        if p.get("proxy") is not None:
            ax.scatter(p["d"], p["proxy"], facecolors="none", edgecolors=color, label=f"{label}: proxy", zorder=3)
        for kind, style in (("gold", "-"), ("proxy", "--")):
            fit = fits.get(label, {}).get(kind)
            if fit is not None:
                ax.plot(
                    grid,
                    curves[method](grid, fit["alpha"], fit["beta"]),
                    style,
                    color=color,
                    label=f"{label}: {kind} fit (a={fit['alpha']:.3g}, b={fit['beta']:.3g})",
                )
    ax.axhline(0.0, color="0.7", linewidth=0.8, zorder=0)
    ax.set_xlabel("d = sqrt(KL)")
    ax.set_ylabel("reward (relative to the initial policy)")
    ax.set_title(title or f"Over-optimisation ({'best-of-n' if method == 'bon' else 'RL'})")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: points fill the axes
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
