"""Temperature scaling, length bias and the interval code, against independent references."""

import numpy as np
import pytest
import scipy.optimize
import scipy.stats

from common.stats import average_ranks, bootstrap_ci, pearson, spearman, t_interval
from rm.calibration import calibration_metrics, fit_temperature, temperature_nll
from rm.length_bias import length_bias_metrics


def _miscalibrated(n=2000, seed=0, true_t=1.0, scale=4.0):
    """Pairs whose true P(chosen preferred) = sigmoid(g / true_t) but whose rewards are scale * g:
    the reward model is `scale` times too confident, so the best temperature is about scale * true_t."""
    rng = np.random.default_rng(seed)
    g = rng.normal(0.0, 2.0, n)
    won = rng.random(n) < 1.0 / (1.0 + np.exp(-g / true_t))  # did the first response win?
    first, second = scale * g, np.zeros(n)
    chosen = np.where(won, first, second)
    rejected = np.where(won, second, first)
    return chosen, rejected


def test_temperature_lowers_ece_and_keeps_accuracy():
    chosen, rejected = _miscalibrated()
    temperature = fit_temperature(chosen, rejected)
    before = calibration_metrics(chosen, rejected, temperature=1.0)
    after = calibration_metrics(chosen, rejected, temperature=temperature)
    assert 3.0 < temperature < 5.5  # recovers the over-confidence factor 4
    assert before["ece"] > 0.1 and after["ece"] < 0.03
    assert after["brier"] < before["brier"] and after["nll"] < before["nll"]
    assert after["accuracy"] == before["accuracy"]


def test_fitted_temperature_matches_grid_and_scipy():
    chosen, rejected = _miscalibrated(n=500, seed=3, scale=2.5)
    gaps = chosen - rejected
    temperature = fit_temperature(chosen, rejected)
    # Brute-force grid of the NLL computed independently (log1p form).
    grid = np.exp(np.linspace(np.log(0.05), np.log(20.0), 20001))
    nll = [np.mean(np.log1p(np.exp(-gaps / t))) for t in grid]
    assert abs(temperature - grid[int(np.argmin(nll))]) / temperature < 1e-3
    ref = scipy.optimize.minimize_scalar(
        lambda log_t: np.mean(np.log1p(np.exp(-gaps / np.exp(log_t)))),
        bounds=(np.log(0.05), np.log(20.0)),
        method="bounded",
        options={"xatol": 1e-10},
    )
    np.testing.assert_allclose(temperature, np.exp(ref.x), rtol=1e-5)
    # Soft labels: the fit minimises the soft cross-entropy.
    labels = np.random.default_rng(1).uniform(0.3, 1.0, gaps.size)
    t_soft = fit_temperature(chosen, rejected, labels=labels)
    ref = scipy.optimize.minimize_scalar(
        lambda log_t: temperature_nll(gaps, labels, np.exp(log_t)),
        bounds=(np.log(0.05), np.log(20.0)),
        method="bounded",
        options={"xatol": 1e-10},
    )
    np.testing.assert_allclose(t_soft, np.exp(ref.x), rtol=1e-5)


def test_temperature_bounds_and_degenerate():
    assert fit_temperature([1.0, 2.0], [0.0, 0.0]) == 1e-2  # separable: NLL falls as T -> 0
    assert fit_temperature([0.0, 1.0], [0.0, 1.0]) == 1.0  # all gaps 0: T does not matter
    with pytest.raises(ValueError, match="labels"):
        fit_temperature([1.0], [0.0], labels=[1.5])


def test_length_bias_against_scipy():
    rng = np.random.default_rng(0)
    n = 60
    len_c, len_r = rng.integers(3, 20, n), rng.integers(3, 20, n)
    len_c[:5] = len_r[:5]  # some equal lengths
    chosen = 0.3 * len_c + rng.normal(0, 1, n)
    rejected = 0.3 * len_r + rng.normal(0, 1, n)
    m = length_bias_metrics(chosen, rejected, len_c, len_r)
    rewards, lengths = np.concatenate([chosen, rejected]), np.concatenate([len_c, len_r])
    np.testing.assert_allclose(m["length/pearson"], scipy.stats.pearsonr(rewards, lengths)[0], rtol=1e-10)
    np.testing.assert_allclose(m["length/spearman"], scipy.stats.spearmanr(rewards, lengths)[0], rtol=1e-10)
    diff, correct = len_c - len_r, chosen > rejected
    for name, where in (("diff<-0.5", diff < 0), ("-0.5<=diff<0.5", diff == 0), ("diff>=0.5", diff > 0)):
        assert m[f"length/bin/{name}/n"] == int(where.sum())
        assert m[f"length/bin/{name}/accuracy"] == pytest.approx(float(correct[where].mean()))
    np.testing.assert_allclose(average_ranks([3, 1, 3, 2]), scipy.stats.rankdata([3, 1, 3, 2]))
    assert np.isnan(pearson([1.0, 1.0], [0.0, 2.0])) and spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_t_interval_hand_case():
    # values 1, 2, 3: mean 2, s = 1, t_{0.975, 2} = 4.302653 (t table) -> half width 4.302653 / sqrt(3).
    ci = t_interval([1.0, 2.0, 3.0])
    assert ci["mean"] == 2.0 and ci["std"] == pytest.approx(1.0)
    assert ci["half_width"] == pytest.approx(4.302653 / np.sqrt(3.0), rel=1e-6)
    assert ci["low"] == pytest.approx(2.0 - 4.302653 / np.sqrt(3.0), rel=1e-6)
    one = t_interval([0.5])
    assert np.isnan(one["low"]) and one["mean"] == 0.5


def test_bootstrap_hand_case():
    values = np.array([0.0, 1.0, 1.0, 1.0])
    ci = bootstrap_ci(values, n_resamples=500, seed=7)
    # Independent reference: the same resamples drawn by hand.
    idx = np.random.default_rng(7).integers(0, 4, size=(500, 4))
    means = values[idx].mean(1)
    assert ci["estimate"] == 0.75
    assert (ci["low"], ci["high"]) == tuple(np.quantile(means, [0.025, 0.975]))
    assert ci["low"] <= 0.25 + 1e-12 and ci["high"] == 1.0  # only 5 possible means: 0, .25, .5, .75, 1
    assert bootstrap_ci(values, n_resamples=500, seed=7) == ci  # fixed seed: same interval
    constant = bootstrap_ci(np.ones(10), n_resamples=50)
    assert constant["low"] == constant["high"] == 1.0
