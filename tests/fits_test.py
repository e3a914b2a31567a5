"""Tests of experiments/fits.py: Gao et al. over-optimisation fits, best-of-n maths, the plot."""

import itertools
import math

import numpy as np
import pytest

from experiments import fits


def test_bon_kl_by_hand():
    assert fits.bon_kl(1) == 0.0
    np.testing.assert_allclose(fits.bon_kl(2), math.log(2) - 0.5, rtol=0, atol=1e-15)
    np.testing.assert_allclose(
        fits.bon_kl(np.array([4, 16])), [math.log(4) - 3 / 4, math.log(16) - 15 / 16], rtol=0, atol=1e-15
    )
    with pytest.raises(ValueError, match="n must be >= 1"):
        fits.bon_kl(0)


@pytest.mark.parametrize("method", ["bon", "rl"])
def test_fits_recover_noiseless_parameters(method):
    alpha, beta = 1.7, 0.45
    d = np.sqrt(fits.bon_kl(2.0 ** np.arange(0, 12)))  # includes d = 0 (n = 1)
    fit_fn, curve = (fits.fit_bon, fits.bon_curve) if method == "bon" else (fits.fit_rl, fits.rl_curve)
    # Hand-written forms, independent of the library's curve functions.
    if method == "bon":
        r = d * (alpha - beta * d)
    else:
        r = np.array([0.0 if x == 0 else x * (alpha - beta * math.log(x)) for x in d])
    np.testing.assert_allclose(curve(d, alpha, beta), r, rtol=0, atol=1e-12)
    fit = fit_fn(d, r)
    assert abs(fit["alpha"] - alpha) < 1e-6 and abs(fit["beta"] - beta) < 1e-6
    assert fit["r2"] == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("method", ["bon", "rl"])
def test_fits_with_small_noise(method):
    rng = np.random.default_rng(0)
    alpha, beta = 1.2, 0.3
    d = np.linspace(0.1, 4.0, 60)
    fit_fn, curve = (fits.fit_bon, fits.bon_curve) if method == "bon" else (fits.fit_rl, fits.rl_curve)
    r = curve(d, alpha, beta) + rng.normal(0, 0.01, d.shape)
    fit = fit_fn(d, r)
    assert fit["alpha"] == pytest.approx(alpha, abs=0.02)
    assert fit["beta"] == pytest.approx(beta, abs=0.02)
    assert 0.99 < fit["r2"] < 1.0
    # r2 against a direct computation from the fitted curve.
    pred = curve(d, fit["alpha"], fit["beta"])
    r2 = 1 - np.sum((r - pred) ** 2) / np.sum((r - r.mean()) ** 2)
    assert fit["r2"] == pytest.approx(r2, rel=1e-12)


def test_fit_errors():
    with pytest.raises(ValueError, match="same length"):
        fits.fit_bon([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match=">= 0"):
        fits.fit_rl([-1.0, 1.0, 2.0], [0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="two distinct"):
        fits.fit_rl([0.0, 1.0, 1.0], [0.0, 1.0, 1.0])


def test_peaks_match_grid_argmax():
    grid = np.linspace(1e-6, 20.0, 2_000_001)
    step = grid[1] - grid[0]
    for alpha, beta in [(1.0, 0.3), (2.5, 1.1), (0.4, 0.05)]:
        peak = fits.peak_d_bon(alpha, beta)
        assert peak == pytest.approx(alpha / (2 * beta))
        assert abs(peak - grid[np.argmax(fits.bon_curve(grid, alpha, beta))]) <= step
    for alpha, beta in [(1.0, 0.5), (0.5, 0.4), (2.0, 1.5)]:
        peak = fits.peak_d_rl(alpha, beta)
        assert peak < 20.0
        assert abs(peak - grid[np.argmax(fits.rl_curve(grid, alpha, beta))]) <= step
    assert fits.peak_d_bon(1.0, -0.1) == math.inf
    assert fits.peak_d_rl(1.0, 0.0) == math.inf
    assert fits.peak_d_rl(0.5, 1e-4) == math.inf  # exp(4999): past any float, a fit still rising (no overflow)
    assert fits.peak_d_bon(-1.0, 0.5) == 0.0


def test_peak_of_a_curve_without_maximum_over_the_range_measured():
    """beta < 0: the fitted curve is convex. One that falls over all of [0, d_max] peaks at 0 there (its
    upturn lies past the data); one still above 0 at d_max is rising where the data stop (inf). Hand values:
    RL alpha -1.08, beta -0.36 (a PPO gold curve that collapsed): minimum at exp(alpha / beta - 1) = e^2."""
    alpha, beta = -1.08, -0.36
    assert math.exp(alpha / beta - 1.0) == pytest.approx(math.e**2)
    grid = np.linspace(0.0, 6.76, 100_001)  # the range measured; R(6.76) = 6.76 (-1.08 + 0.36 log 6.76) < 0
    assert fits.rl_curve(6.76, alpha, beta) < 0
    assert fits.peak_d_rl(alpha, beta, d_max=6.76) == 0.0 == grid[np.argmax(fits.rl_curve(grid, alpha, beta))]
    assert fits.peak_d_rl(alpha, beta) == math.inf  # no range given: the form's supremum
    assert fits.rl_curve(30.0, alpha, beta) > 0  # measured out to d = 30 the curve has risen above 0 again
    assert fits.peak_d_rl(alpha, beta, d_max=30.0) == math.inf
    # best-of-n: d (alpha - beta d) with alpha -0.5, beta -0.2 is below 0 until d = alpha / beta = 2.5
    assert fits.peak_d_bon(-0.5, -0.2, d_max=2.0) == 0.0
    assert fits.peak_d_bon(-0.5, -0.2, d_max=3.0) == math.inf
    assert fits.peak_d_bon(0.5, -0.2, d_max=1.0) == math.inf  # rising from the start
    assert fits.peak_d_rl(0.0, 0.0, d_max=5.0) == 0.0 and fits.peak_d_rl(0.3, 0.0, d_max=5.0) == math.inf


def _brute_force_best_of_n(proxy, gold, n):
    """Mean over prompts of the average, over all n-subsets, of the proxy-argmax sample."""
    proxy_means, gold_means = [], []
    for p_row, g_row in zip(proxy, gold):
        ps, gs = [], []
        for subset in itertools.combinations(range(len(p_row)), n):
            subset = list(subset)
            best = subset[int(np.argmax(p_row[subset]))]
            ps.append(p_row[best])
            gs.append(g_row[best])
        proxy_means.append(np.mean(ps))
        gold_means.append(np.mean(gs))
    return np.mean(proxy_means), np.mean(gold_means)


def test_best_of_n_estimate_equals_brute_force():
    rng = np.random.default_rng(1)
    proxy = rng.normal(size=(5, 8))
    gold = proxy + rng.normal(size=(5, 8))
    proxy[2, 3] = proxy[2, 6]  # a tie: both must pick the lower index
    gold[2, 6] = gold[2, 3] + 5.0
    for n in range(1, 9):
        expected = _brute_force_best_of_n(proxy, gold, n)
        got = fits.best_of_n_estimate(proxy, gold, n)
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    # n = 1: plain means; n = N: the proxy argmax of each row.
    np.testing.assert_allclose(fits.best_of_n_estimate(proxy, gold, 1), (proxy.mean(), gold.mean()))
    weights = fits.best_of_n_weights(8, 3)
    assert weights.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(
        weights, [math.comb(i - 1, 2) / math.comb(8, 3) for i in range(1, 9)], rtol=1e-12, atol=1e-15
    )
    with pytest.raises(ValueError, match="1 <= n <= n_samples"):
        fits.best_of_n_estimate(proxy, gold, 9)


def test_best_of_n_indices():
    scores = np.array([[0.1, 0.9, 0.5, 2.0], [3.0, 1.0, 3.0, 0.0]])
    np.testing.assert_array_equal(fits.best_of_n_indices(scores, 2), [1, 0])
    np.testing.assert_array_equal(fits.best_of_n_indices(scores, 4), [3, 0])
    rng = np.random.default_rng(0)
    idx = fits.best_of_n_indices(rng.normal(size=(200, 6)), 3, rng=rng)
    assert idx.shape == (200,) and idx.min() >= 0 and idx.max() <= 5
    # Random subsets: the chosen sample is the max of some 3 of the 6, i.e. never the row's minimum
    # and never below rank 3 (ascending); check that against the row ranks.
    scores = rng.normal(size=(500, 6))
    idx = fits.best_of_n_indices(scores, 3, rng=rng)
    ranks = np.argsort(np.argsort(scores, axis=1), axis=1)[np.arange(500), idx] + 1
    assert ranks.min() >= 3
    # Frequencies of each rank follow C(i-1, 2) / C(6, 3).
    freq = np.bincount(ranks, minlength=7)[1:] / 500
    np.testing.assert_allclose(freq, fits.best_of_n_weights(6, 3), atol=0.07)


def test_plot_writes_png(tmp_path):
    d = np.sqrt(fits.bon_kl(2.0 ** np.arange(0, 8)))
    points, fitted = {}, {}
    for label, (a, b) in {"rm-small": (1.0, 0.4), "rm-large": (1.3, 0.3)}.items():
        gold = fits.bon_curve(d, a, b)
        proxy = fits.bon_curve(d, a + 0.5, 0.05)
        points[label] = {"d": d, "gold": gold, "proxy": proxy}
        fitted[label] = {"gold": fits.fit_bon(d, gold), "proxy": fits.fit_bon(d, proxy)}
    path = fits.plot_overoptimization(points, fitted, str(tmp_path / "bon.png"), method="bon", title="test")
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    path = fits.plot_overoptimization(points, None, str(tmp_path / "rl.png"), method="rl", title="")
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="'bon' or 'rl'"):
        fits.plot_overoptimization(points, fitted, str(tmp_path / "x.png"), method="ppo", title="")


@pytest.mark.parametrize("method", ["bon", "rl"])
def test_fit_standard_errors_match_statsmodels(method):
    import statsmodels.api as sm

    rng = np.random.default_rng(4)
    d = np.linspace(0.1, 3.0, 12)
    if method == "bon":
        design, fit_fn = np.stack([d, -(d**2)], axis=1), fits.fit_bon
    else:
        design, fit_fn = np.stack([d, -d * np.log(d)], axis=1), fits.fit_rl
    r = design @ np.array([1.2, 0.4]) + rng.normal(0, 0.05, d.size)
    fit = fit_fn(d, r)
    ols = sm.OLS(r, design).fit()  # no constant: the same linear-in-parameters form
    np.testing.assert_allclose([fit["alpha"], fit["beta"]], ols.params, rtol=1e-10)
    np.testing.assert_allclose([fit["alpha_se"], fit["beta_se"]], ols.bse, rtol=1e-8)
    assert fit["dof"] == d.size - 2
    two = fit_fn(d[:2], r[:2])
    assert np.isnan(two["alpha_se"]) and two["dof"] == 0
