"""Temperature scaling of a reward model's Bradley-Terry probabilities (Guo et al. 2017).

A reward model says chosen beats rejected with p = sigmoid(r_c - r_r). Trained to low loss
it is usually over-confident; one scalar T > 0 fixes most of that:

  p_T = sigmoid((r_c - r_r) / T)

T is fitted after training by minimising the negative log-likelihood of held-out pairs
(the eval pairs, or a calibration split: configs/rm.py eval.calibrate_on). It never changes
which response ranks higher, so accuracy is unchanged; rewards themselves are not rescaled
(PPO's normalisation is separate), only the probabilities that are reported.

The fit is on s = 1/T: NLL(s) = -mean(y log sigmoid(s d) + (1 - y) log sigmoid(-s d)) is
convex in s (a one-feature logistic regression without intercept), so its derivative
g(s) = -mean((y - sigmoid(s d)) d) is monotone and bisection on g finds the minimum. T is
kept in [t_min, t_max]: with separable data (every d > 0) the NLL keeps falling as T -> 0,
and the bound says so instead of returning 0.

The fitted T is stored in the checkpoint's extra ('calibration') and in the workdir's
calibration.json; `rm.model.load_reward_model` reads it back (LoadedRewardModel.temperature).
"""

from __future__ import annotations

import json
import os

import numpy as np

from rm.evaluate import reliability_bins

CALIBRATION_FILE = "calibration.json"


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow warning for large |x|


def _gaps_and_labels(chosen_rewards, rejected_rewards, labels):
    chosen = np.asarray(chosen_rewards, np.float64).reshape(-1)
    rejected = np.asarray(rejected_rewards, np.float64).reshape(-1)
    if chosen.shape != rejected.shape or chosen.size == 0:
        raise ValueError(
            f"rm/calibration.py: need paired, non-empty rewards; got {chosen.size} chosen and {rejected.size} rejected"
        )
    if not (np.all(np.isfinite(chosen)) and np.all(np.isfinite(rejected))):
        raise ValueError("rm/calibration.py: rewards must be finite")
    labels = np.ones_like(chosen) if labels is None else np.asarray(labels, np.float64).reshape(-1)
    if labels.shape != chosen.shape or np.any((labels < 0) | (labels > 1)):
        raise ValueError(f"rm/calibration.py: labels must be {chosen.size} values in [0, 1]")
    return chosen - rejected, labels


def temperature_nll(reward_gaps, labels, temperature: float) -> float:
    """Mean NLL of (soft) labels y under p = sigmoid(d / T): -mean(y log p + (1 - y) log(1 - p))."""
    d = np.asarray(reward_gaps, np.float64) / float(temperature)
    y = np.asarray(labels, np.float64)
    # -log sigmoid(x) = logaddexp(0, -x), stable for large |x|.
    return float(np.mean(y * np.logaddexp(0.0, -d) + (1.0 - y) * np.logaddexp(0.0, d)))


def fit_temperature(
    chosen_rewards, rejected_rewards, *, labels=None, t_min: float = 1e-2, t_max: float = 1e2, iterations: int = 200
) -> float:
    """The temperature T in [t_min, t_max] minimising the NLL of held-out pairs.

    Args:
      chosen_rewards, rejected_rewards: [N] raw rewards of held-out pairs.
      labels: optional [N] probabilities that chosen is preferred (soft labels / ties);
        None = 1 for every pair (ordinary preference data).
      t_min, t_max: bounds on T (see module docstring).
      iterations: bisection steps on s = 1/T (in log space; 200 is far below float64 eps).

    Returns:
      T as a Python float (1.0 when every gap is 0: the likelihood does not depend on T).
    """
    if not 0 < t_min < t_max:
        raise ValueError(f"rm/calibration.py: need 0 < t_min < t_max, got {t_min}, {t_max}")
    gaps, y = _gaps_and_labels(chosen_rewards, rejected_rewards, labels)
    if not np.any(gaps != 0):
        return 1.0

    def slope(log_s):  # dNLL/ds at s = exp(log_s); same sign as dNLL/dlog_s
        s = np.exp(log_s)
        return -float(np.mean((y - _sigmoid(s * gaps)) * gaps))

    low, high = -np.log(t_max), -np.log(t_min)  # log s bounds
    if slope(low) >= 0:
        return float(t_max)
    if slope(high) <= 0:
        return float(t_min)
    for _ in range(iterations):
        middle = 0.5 * (low + high)
        if slope(middle) > 0:
            high = middle
        else:
            low = middle
    return float(np.exp(-0.5 * (low + high)))


def calibration_metrics(chosen_rewards, rejected_rewards, *, temperature: float = 1.0, n_bins: int = 10) -> dict:
    """ECE (symmetrised set, as rm.evaluate), Brier and NLL of p = sigmoid((r_c - r_r) / T).

    Returns {'ece', 'brier', 'nll', 'accuracy'}: accuracy = mean(r_c > r_r), which no T > 0 changes.
    """
    if not temperature > 0:
        raise ValueError(f"rm/calibration.py: temperature must be > 0, got {temperature}")
    gaps, ones = _gaps_and_labels(chosen_rewards, rejected_rewards, None)
    p = _sigmoid(gaps / temperature)  # [N]
    probs = np.concatenate([p, 1.0 - p])  # [2N] symmetrised: (p, 1) and (1 - p, 0)
    labels = np.concatenate([ones, np.zeros_like(ones)])
    bins = reliability_bins(probs, labels, n_bins=n_bins)
    return {
        "ece": bins["ece"],
        "brier": float(np.mean(np.square(p - 1.0))),
        "nll": temperature_nll(gaps, ones, temperature),
        "accuracy": float(np.mean(gaps > 0)),
    }


def calibrated_probability(chosen_rewards, rejected_rewards, temperature: float = 1.0) -> np.ndarray:
    """p = sigmoid((r_c - r_r) / T), float64 NumPy."""
    gaps = np.asarray(chosen_rewards, np.float64) - np.asarray(rejected_rewards, np.float64)
    return _sigmoid(gaps / float(temperature))


def write_calibration(workdir: str, calibration: dict) -> str:
    """Writes calibration.json (temperature, source, n, metrics before/after) into the workdir."""
    path = os.path.join(workdir, CALIBRATION_FILE)
    with open(path, "w") as f:
        json.dump(calibration, f, indent=2)
    return path
