"""Reward-model evaluation: accuracy, calibration and reward normalisation.

The functions here are pure NumPy on rewards that were already computed (they
take jax arrays, numpy arrays or lists); they never run a model, so they work
the same on rewards from this codebase, from a PyTorch model or from a file.

Calibration. A reward model induces, through Bradley-Terry, the probability
p = sigmoid(r_chosen - r_rejected) that the chosen response is preferred. In a
preference set every label is 1 ("chosen won"), so calibration measured on
(p, 1) alone would reward a model that is always over-confident. We score the
symmetrised set instead: each pair contributes (p, 1) and (1 - p, 0), i.e. the
pair seen in both orders, which is what a model that does not know the order
would be asked. ECE is then the usual equal-width-bin estimate over 2N points,
and the Brier score mean((p - 1)^2) is the same on either set.
"""

import os
from collections.abc import Sequence
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np


def _as_1d_float(values, name: str) -> np.ndarray:
    """Converts jax/numpy arrays or lists to a finite float64 [N] array."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"rm/evaluate.py: {name} must be 1-D [N], got shape {array.shape}.")
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise ValueError(
            f"rm/evaluate.py: {name}[{bad[0]}] = {array[bad[0]]} is not finite ({bad.size} non-finite values in total)."
        )
    return array


def _as_pairs(chosen_rewards, rejected_rewards):
    """Validates a pair of reward arrays: 1-D, finite, same non-zero length."""
    chosen = _as_1d_float(chosen_rewards, "chosen_rewards")
    rejected = _as_1d_float(rejected_rewards, "rejected_rewards")
    if chosen.shape != rejected.shape:
        raise ValueError(
            f"rm/evaluate.py: chosen_rewards has {chosen.shape[0]} values but "
            f"rejected_rewards has {rejected.shape[0]}; they must be paired."
        )
    if chosen.size == 0:
        raise ValueError("rm/evaluate.py: no preference pairs to evaluate.")
    return chosen, rejected


def _sigmoid(x: np.ndarray) -> np.ndarray:
    # tanh form: no overflow warning for large |x|, unlike 1 / (1 + exp(-x)).
    return 0.5 * (1.0 + np.tanh(0.5 * x))


def symmetrised_calibration_set(chosen_rewards, rejected_rewards):
    """The (probability, label) set used for calibration of a preference model.

    Args:
      chosen_rewards: [N] rewards of the preferred responses.
      rejected_rewards: [N] rewards of the dispreferred responses.

    Returns:
      (probs, labels): [2N] arrays; the first N entries are (p, 1) with
      p = sigmoid(r_c - r_r), the last N are (1 - p, 0).
    """
    chosen, rejected = _as_pairs(chosen_rewards, rejected_rewards)
    p_chosen = _sigmoid(chosen - rejected)  # [N]
    probs = np.concatenate([p_chosen, 1.0 - p_chosen])  # [2N]
    labels = np.concatenate([np.ones_like(p_chosen), np.zeros_like(p_chosen)])
    return probs, labels


def reliability_bins(probs, labels, *, n_bins: int = 10) -> dict:
    """Equal-width reliability bins on [0, 1] and the expected calibration error.

    Bin b holds edges[b] <= p < edges[b + 1]; the last bin also holds p = 1.

    Args:
      probs: [N] predicted probabilities of the positive label, in [0, 1].
      labels: [N] observed labels in [0, 1] (0/1, or soft labels).
      n_bins: number of equal-width bins.

    Returns:
      dict with
        'edges'      [n_bins + 1] bin edges, linspace(0, 1),
        'confidence' [n_bins] mean predicted probability per bin (nan if empty),
        'accuracy'   [n_bins] mean label per bin (nan if empty),
        'counts'     [n_bins] int number of points per bin,
        'ece'        float, sum_b (n_b / N) |accuracy_b - confidence_b|.
    """
    if int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"rm/evaluate.py: n_bins must be a positive integer, got {n_bins!r}.")
    n_bins = int(n_bins)
    probs = _as_1d_float(probs, "probs")
    labels = _as_1d_float(labels, "labels")
    if probs.shape != labels.shape:
        raise ValueError(f"rm/evaluate.py: probs has {probs.size} values but labels has {labels.size}.")
    if probs.size == 0:
        raise ValueError("rm/evaluate.py: reliability_bins needs at least 1 point.")
    for name, values in (("probs", probs), ("labels", labels)):
        bad = np.flatnonzero((values < 0) | (values > 1))
        if bad.size:
            raise ValueError(f"rm/evaluate.py: {name}[{bad[0]}] = {values[bad[0]]} is outside [0, 1].")

    edges = np.linspace(0.0, 1.0, n_bins + 1)  # [n_bins + 1]
    # searchsorted against the same edges we report, so a point exactly on an
    # edge lands where the edges say (floor(p * n_bins) can disagree by 1 ulp).
    bin_index = np.clip(np.searchsorted(edges, probs, side="right") - 1, 0, n_bins - 1)  # [N]
    counts = np.bincount(bin_index, minlength=n_bins)  # [n_bins]
    prob_sums = np.bincount(bin_index, weights=probs, minlength=n_bins)
    label_sums = np.bincount(bin_index, weights=labels, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.where(counts > 0, prob_sums / counts, np.nan)
        accuracy = np.where(counts > 0, label_sums / counts, np.nan)
    gaps = np.where(counts > 0, np.abs(accuracy - confidence), 0.0)
    ece = float(np.sum(counts / probs.size * gaps))
    return {
        "edges": edges,
        "confidence": confidence,
        "accuracy": accuracy,
        "counts": counts,
        "ece": ece,
    }


def preference_metrics(
    chosen_rewards,
    rejected_rewards,
    *,
    subsets: Optional[Sequence[str]] = None,
    n_bins: int = 10,
) -> dict:
    """Accuracy and calibration of a reward model on preference pairs.

    p = sigmoid(r_c - r_r) is the model's probability that the chosen response
    is preferred; the label is 1 for every pair. Calibration (ECE) is measured
    on the symmetrised set, where each pair contributes (p, 1) and (1 - p, 0),
    since with all labels 1 an unsymmetrised ECE would only measure how close p
    is to 1. Brier = mean((p - 1)^2), which equals the symmetrised Brier score.

    Args:
      chosen_rewards: [N] rewards of the preferred responses.
      rejected_rewards: [N] rewards of the dispreferred responses.
      subsets: optional list of N subset names, one per pair (RewardBench
        layout, e.g. 'alpacaeval-easy'); adds per-subset accuracies.
      n_bins: number of equal-width ECE bins on [0, 1].

    Returns:
      dict of Python floats/ints:
        'accuracy'       mean(r_c > r_r); ties count as not correct,
        'ties'           fraction of pairs with r_c == r_r,
        'margin'         mean(r_c - r_r),
        'mean_chosen', 'mean_rejected'   mean rewards,
        'nll'            mean(-log p), the Bradley-Terry loss without margin,
        'ece'            expected calibration error on the symmetrised set,
        'brier'          mean((p - 1)^2),
        'n'              number of pairs.
      With subsets also 'subset/<name>/accuracy', 'subset/<name>/n' per subset,
      'subsets_overall' (count-weighted mean of subset accuracies, equal to
      'accuracy') and 'subsets_macro' (unweighted mean over subsets).
    """
    chosen, rejected = _as_pairs(chosen_rewards, rejected_rewards)
    reward_gap = chosen - rejected  # [N]
    correct = reward_gap > 0  # [N]
    p_chosen = _sigmoid(reward_gap)  # [N]
    probs, labels = symmetrised_calibration_set(chosen, rejected)  # [2N]
    bins = reliability_bins(probs, labels, n_bins=n_bins)

    metrics = {
        "accuracy": float(np.mean(correct)),
        "ties": float(np.mean(reward_gap == 0)),
        "margin": float(np.mean(reward_gap)),
        "mean_chosen": float(np.mean(chosen)),
        "mean_rejected": float(np.mean(rejected)),
        # -log sigmoid(x) = logaddexp(0, -x): stable for large |x|.
        "nll": float(np.mean(np.logaddexp(0.0, -reward_gap))),
        "ece": bins["ece"],
        "brier": float(np.mean(np.square(p_chosen - 1.0))),
        "n": int(chosen.size),
    }
    if subsets is not None:
        metrics.update(_subset_metrics(correct, subsets))
    return metrics


def _subset_metrics(correct: np.ndarray, subsets: Sequence[str]) -> dict:
    """Per-subset accuracy and count, plus weighted and macro averages."""
    subsets = list(subsets)
    if len(subsets) != correct.size:
        raise ValueError(
            f"rm/evaluate.py: subsets has {len(subsets)} names but there are "
            f"{correct.size} pairs; give one subset name per pair."
        )
    for index, name in enumerate(subsets):
        if not isinstance(name, str):
            raise ValueError(
                f"rm/evaluate.py: subsets[{index}] = {name!r} is a {type(name).__name__}; expected a str subset name."
            )
    names = np.asarray(subsets, dtype=object)
    metrics = {}
    accuracies, counts = [], []
    for name in sorted(set(subsets)):
        in_subset = names == name  # [N]
        count = int(np.sum(in_subset))
        accuracy = float(np.mean(correct[in_subset]))
        metrics[f"subset/{name}/accuracy"] = accuracy
        metrics[f"subset/{name}/n"] = count
        accuracies.append(accuracy)
        counts.append(count)
    accuracies, counts = np.asarray(accuracies), np.asarray(counts)
    metrics["subsets_overall"] = float(np.sum(accuracies * counts) / np.sum(counts))
    metrics["subsets_macro"] = float(np.mean(accuracies))
    return metrics


def plot_reliability_diagram(
    chosen_rewards,
    rejected_rewards,
    path: str,
    *,
    n_bins: int = 10,
    title: Optional[str] = None,
    temperature: Optional[float] = None,
) -> str:
    """Writes a reliability diagram of a reward model as a PNG.

    Top panel: observed frequency (mean label) per confidence bin of the
    symmetrised set (see module docstring) against the diagonal of perfect
    calibration. Bottom panel: number of points per bin (log scale). The title
    reports ECE, Brier and accuracy.

    Args:
      chosen_rewards: [N] rewards of the preferred responses.
      rejected_rewards: [N] rewards of the dispreferred responses.
      path: output file (PNG); parent directories are created.
      n_bins: number of equal-width bins.
      title: optional text placed before the metrics in the title.
      temperature: optional fitted temperature T (rm/calibration.py); when given
        (and != 1) the diagram also shows the curve of p = sigmoid((r_c - r_r) / T)
        (orange line: observed frequency at each bin's mean confidence) and the
        title its ECE / Brier.

    Returns:
      path.
    """
    # Imported here so that importing rm.evaluate stays cheap, and through the
    # object-oriented API (no pyplot) so the user's backend/global state is not
    # touched; Figure + Agg canvas renders PNGs headless.
    from matplotlib import ticker
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = preference_metrics(chosen_rewards, rejected_rewards, n_bins=n_bins)
    probs, labels = symmetrised_calibration_set(chosen_rewards, rejected_rewards)
    bins = reliability_bins(probs, labels, n_bins=n_bins)
    edges, counts = bins["edges"], bins["counts"]
    centers = 0.5 * (edges[:-1] + edges[1:])
    width = edges[1] - edges[0]
    filled = counts > 0

    figure = Figure(figsize=(5.0, 6.0), dpi=100)
    FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect")
    top.bar(
        centers[filled],
        bins["accuracy"][filled],
        width=width * 0.9,
        color="tab:blue",
        edgecolor="black",
        label="observed" if temperature in (None, 1.0) else "observed (raw, T = 1)",
    )
    # Red markers at each bin's mean confidence make over/under-confidence
    # visible even inside a bin.
    top.plot(centers[filled], bins["confidence"][filled], "o", color="tab:red", markersize=4, label="mean confidence")
    heading_after = ""
    if temperature is not None and temperature != 1.0:
        gaps = _as_1d_float(chosen_rewards, "chosen_rewards") - _as_1d_float(rejected_rewards, "rejected_rewards")
        p_scaled = _sigmoid(gaps / float(temperature))  # [N]
        scaled = reliability_bins(
            np.concatenate([p_scaled, 1.0 - p_scaled]),
            np.concatenate([np.ones_like(p_scaled), np.zeros_like(p_scaled)]),
            n_bins=n_bins,
        )
        kept = scaled["counts"] > 0
        top.plot(
            scaled["confidence"][kept],
            scaled["accuracy"][kept],
            "s-",
            color="tab:orange",
            markersize=4,
            label=f"temperature-scaled (T={temperature:.3g})",
        )
        brier_after = float(np.mean(np.square(p_scaled - 1.0)))
        heading_after = f"\nafter T={temperature:.3g}: ECE {scaled['ece']:.4f}  Brier {brier_after:.4f}"
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("fraction preferred (label = 1)")
    top.legend(loc="upper left", fontsize=8)
    heading = (
        f"ECE {metrics['ece']:.4f}  Brier {metrics['brier']:.4f}  "
        f"acc {metrics['accuracy']:.3f}  (N={metrics['n']} pairs)"
    )
    heading += heading_after
    top.set_title(f"{title}\n{heading}" if title else heading, fontsize=9)

    bottom.bar(centers, counts, width=width * 0.9, color="tab:gray", edgecolor="black")
    # Log scale: the extreme bins usually hold most points. Plain tick labels
    # (10, 100) read better than matplotlib's default 3x10^2 minor labels.
    bottom.set_yscale("log")
    bottom.yaxis.set_major_formatter(ticker.ScalarFormatter())
    bottom.yaxis.set_minor_formatter(ticker.NullFormatter())
    bottom.set_xlabel("predicted P(first preferred) = sigmoid(r_first - r_second)")
    bottom.set_ylabel("count")
    figure.tight_layout()

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def compute_normalization(rewards, *, target_mean: float = 0.0, target_std: float = 1.0):
    """Gain and bias that map rewards to a target mean and standard deviation.

    Ziegler et al. (2019) normalise the reward model so that its scores on
    samples from the reference policy have mean 0 and std 1; pass those scores
    here. The std is the population std (ddof=0).

    Args:
      rewards: [N] (or any shape; flattened) rewards, N >= 2.
      target_mean: desired mean of gain * r + bias.
      target_std: desired std of gain * r + bias, > 0.

    Returns:
      (gain, bias) as Python floats.
    """
    values = np.asarray(rewards, dtype=np.float64).reshape(-1)
    values = _as_1d_float(values, "rewards")
    if values.size < 2:
        raise ValueError(f"rm/evaluate.py: compute_normalization needs at least 2 rewards, got {values.size}.")
    if not target_std > 0:
        raise ValueError(f"rm/evaluate.py: target_std must be > 0, got {target_std}.")
    mean = float(np.mean(values))
    std = float(np.std(values))
    # Relative threshold: rewards equal up to float rounding are still constant.
    if std <= 1e-12 * max(1.0, abs(mean)):
        raise ValueError(
            f"rm/evaluate.py: rewards have zero std (all about {mean:.6g} over "
            f"{values.size} values); cannot normalise a constant reward."
        )
    gain = target_std / std
    bias = target_mean - gain * mean
    return gain, bias


def apply_normalization(rewards, *, gain, bias):
    """Returns gain * rewards + bias.

    Jax arrays (including traced values inside jit) stay jax float32 arrays, so
    this can be used inside a rollout step; anything else becomes float64 NumPy.
    """
    if isinstance(rewards, jax.Array):
        rewards = rewards.astype(jnp.float32)
        return jnp.asarray(gain, jnp.float32) * rewards + jnp.asarray(bias, jnp.float32)
    return gain * np.asarray(rewards, dtype=np.float64) + bias
