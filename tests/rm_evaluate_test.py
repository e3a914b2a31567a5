"""Tests for rm/evaluate.py against hand computations and NumPy loops."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rm import evaluate


def _loop_ece(probs, labels, n_bins=10):
    """Plain-loop ECE with bins edges[b] <= p < edges[b+1] (p = 1 in the last)."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    total, ece = len(probs), 0.0
    for b in range(n_bins):
        members = []
        for p, y in zip(probs, labels):
            upper_ok = p < edges[b + 1] or (b == n_bins - 1 and p <= 1.0)
            if edges[b] <= p and upper_ok:
                members.append((p, y))
        if members:
            mean_p = sum(p for p, _ in members) / len(members)
            mean_y = sum(y for _, y in members) / len(members)
            ece += len(members) / total * abs(mean_y - mean_p)
    return ece


def _symmetrised(chosen, rejected):
    probs, labels = [], []
    for c, r in zip(chosen, rejected):
        p = 1.0 / (1.0 + np.exp(-(c - r)))
        probs += [p, 1.0 - p]
        labels += [1.0, 0.0]
    return probs, labels


def test_hand_computed_tiny_example():
    # Gaps log 3, -log 3, 0 -> p = 0.75, 0.25, 0.5.
    # Symmetrised: bin 7 holds (0.75, 1), (0.75, 0): gap |0.5 - 0.75| = 0.25;
    # bin 2 holds (0.25, 0), (0.25, 1): gap 0.25; bin 5 holds two (0.5, .): 0.
    # ECE = 2/6 * 0.25 + 2/6 * 0.25 = 1/6.
    chosen = [np.log(3.0), 0.0, 2.0]
    rejected = [0.0, np.log(3.0), 2.0]
    metrics = evaluate.preference_metrics(chosen, rejected)
    np.testing.assert_allclose(metrics["ece"], 1.0 / 6.0, rtol=1e-9)
    np.testing.assert_allclose(metrics["brier"], (0.25**2 + 0.75**2 + 0.5**2) / 3, rtol=1e-9)
    np.testing.assert_allclose(metrics["accuracy"], 1.0 / 3.0)
    np.testing.assert_allclose(metrics["ties"], 1.0 / 3.0)
    np.testing.assert_allclose(metrics["margin"], 0.0, atol=1e-12)
    np.testing.assert_allclose(metrics["mean_chosen"], (np.log(3.0) + 2.0) / 3)
    np.testing.assert_allclose(metrics["mean_rejected"], (np.log(3.0) + 2.0) / 3)
    np.testing.assert_allclose(metrics["nll"], (np.log(4 / 3) + np.log(4) + np.log(2)) / 3, rtol=1e-9)
    assert metrics["n"] == 3


def test_ece_and_brier_match_loop_on_random_data():
    rng = np.random.default_rng(1)
    chosen = rng.normal(0.5, 1.5, size=300)
    rejected = rng.normal(0.0, 1.5, size=300)
    metrics = evaluate.preference_metrics(chosen, rejected, n_bins=10)
    probs, labels = _symmetrised(chosen, rejected)
    np.testing.assert_allclose(metrics["ece"], _loop_ece(probs, labels), rtol=1e-9)
    # Symmetrised Brier equals mean((p - 1)^2) over pairs.
    sym_brier = np.mean([(p - y) ** 2 for p, y in zip(probs, labels)])
    np.testing.assert_allclose(metrics["brier"], sym_brier, rtol=1e-9)
    np.testing.assert_allclose(metrics["accuracy"], np.mean(chosen > rejected))
    # A different bin count also matches the loop.
    metrics_7 = evaluate.preference_metrics(chosen, rejected, n_bins=7)
    np.testing.assert_allclose(metrics_7["ece"], _loop_ece(probs, labels, 7), rtol=1e-9)


def test_calibrated_data_has_small_ece_and_overconfident_large():
    # Draw the human label from the model's own BT probability: calibrated.
    rng = np.random.default_rng(2)
    n = 20000
    score_a = rng.normal(0.0, 1.5, size=n)
    score_b = rng.normal(0.0, 1.5, size=n)
    a_wins = rng.random(n) < 1.0 / (1.0 + np.exp(-(score_a - score_b)))
    chosen = np.where(a_wins, score_a, score_b)
    rejected = np.where(a_wins, score_b, score_a)
    calibrated = evaluate.preference_metrics(chosen, rejected)
    assert calibrated["ece"] < 0.02
    # Same rankings, rewards scaled x4: over-confident, so ECE grows a lot while
    # accuracy is unchanged.
    overconfident = evaluate.preference_metrics(4 * chosen, 4 * rejected)
    assert overconfident["ece"] > 0.1
    assert overconfident["accuracy"] == calibrated["accuracy"]
    assert overconfident["brier"] > calibrated["brier"]


def test_reliability_bins_match_loop():
    rng = np.random.default_rng(3)
    # Skewed so that some bins are sparse; float32-exact so that passing it as
    # a (float32) jax array loses nothing.
    probs = (rng.random(200) ** 2).astype(np.float32).astype(np.float64)
    labels = (rng.random(200) < probs).astype(float)
    probs[:3] = [0.0, 1.0, 0.5]  # Edges: 1.0 in the last bin, 0.5 in bin 5.
    bins = evaluate.reliability_bins(jnp.asarray(probs), list(labels), n_bins=10)
    np.testing.assert_allclose(bins["edges"], np.linspace(0, 1, 11))
    edges = np.linspace(0, 1, 11)
    for b in range(10):
        upper = probs <= 1.0 if b == 9 else probs < edges[b + 1]
        members = (probs >= edges[b]) & upper
        assert bins["counts"][b] == members.sum()
        if members.any():
            np.testing.assert_allclose(bins["confidence"][b], probs[members].mean())
            np.testing.assert_allclose(bins["accuracy"][b], labels[members].mean())
        else:
            assert np.isnan(bins["confidence"][b]) and np.isnan(bins["accuracy"][b])
    assert bins["counts"].sum() == 200
    np.testing.assert_allclose(bins["ece"], _loop_ece(probs, labels), rtol=1e-9)


def test_reliability_bins_empty_bins_are_nan():
    bins = evaluate.reliability_bins([0.05, 0.95], [0.0, 1.0], n_bins=10)
    np.testing.assert_array_equal(bins["counts"], [1, 0, 0, 0, 0, 0, 0, 0, 0, 1])
    assert np.isnan(bins["accuracy"][1:9]).all()
    np.testing.assert_allclose(bins["ece"], 0.05)


def test_subsets():
    chosen = [1.0, 0.0, 2.0, 3.0, 0.0, 1.0]
    rejected = [0.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    names = ["chat", "chat", "safety", "safety", "safety", "math"]
    metrics = evaluate.preference_metrics(chosen, rejected, subsets=names)
    # chat: 1/2; safety: 2/3 (tie is wrong); math: 1/1.
    assert metrics["subset/chat/accuracy"] == 0.5
    assert metrics["subset/chat/n"] == 2
    np.testing.assert_allclose(metrics["subset/safety/accuracy"], 2 / 3)
    assert metrics["subset/safety/n"] == 3
    assert metrics["subset/math/accuracy"] == 1.0
    assert metrics["subset/math/n"] == 1
    np.testing.assert_allclose(metrics["subsets_overall"], 4 / 6)
    np.testing.assert_allclose(metrics["subsets_overall"], metrics["accuracy"])
    np.testing.assert_allclose(metrics["subsets_macro"], (0.5 + 2 / 3 + 1) / 3)
    with pytest.raises(ValueError, match="one subset name per pair"):
        evaluate.preference_metrics(chosen, rejected, subsets=names[:-1])
    with pytest.raises(ValueError, match=r"subsets\[2\]"):
        evaluate.preference_metrics(chosen, rejected, subsets=["a", "b", 3, "c", "d", "e"])


def test_accepts_jax_numpy_and_lists():
    chosen = [0.3, -1.0, 2.5, 0.1]
    rejected = [0.0, 0.5, 1.0, 0.2]
    from_list = evaluate.preference_metrics(chosen, rejected)
    from_numpy = evaluate.preference_metrics(np.asarray(chosen, np.float32), np.asarray(rejected, np.float32))
    from_jax = evaluate.preference_metrics(jnp.asarray(chosen), jnp.asarray(rejected))
    for key in from_list:
        np.testing.assert_allclose(from_numpy[key], from_list[key], rtol=1e-6)
        np.testing.assert_allclose(from_jax[key], from_list[key], rtol=1e-6)
    np.testing.assert_allclose(from_list["accuracy"], 0.5)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="they must be paired"):
        evaluate.preference_metrics([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match=r"chosen_rewards\[1\]"):
        evaluate.preference_metrics([1.0, np.nan], [1.0, 0.0])
    with pytest.raises(ValueError, match="no preference pairs"):
        evaluate.preference_metrics([], [])
    with pytest.raises(ValueError, match="outside"):
        evaluate.reliability_bins([0.5, 1.5], [1, 0])
    with pytest.raises(ValueError, match="n_bins"):
        evaluate.reliability_bins([0.5], [1], n_bins=0)


def test_normalization():
    rng = np.random.default_rng(4)
    rewards = rng.normal(3.0, 2.5, size=1000)
    gain, bias = evaluate.compute_normalization(list(rewards))
    normalised = evaluate.apply_normalization(rewards, gain=gain, bias=bias)
    np.testing.assert_allclose(np.mean(normalised), 0.0, atol=1e-10)
    np.testing.assert_allclose(np.std(normalised), 1.0, rtol=1e-10)
    np.testing.assert_allclose(gain, 1.0 / np.std(rewards), rtol=1e-12)
    # Other targets.
    gain, bias = evaluate.compute_normalization(jnp.asarray(rewards), target_mean=1.0, target_std=0.5)
    normalised = evaluate.apply_normalization(rewards, gain=gain, bias=bias)
    np.testing.assert_allclose(np.mean(normalised), 1.0, rtol=1e-5)
    np.testing.assert_allclose(np.std(normalised), 0.5, rtol=1e-5)
    # Hand example: [1, 3] has mean 2, population std 1 -> gain 1, bias -2.
    np.testing.assert_allclose(evaluate.compute_normalization([1.0, 3.0]), (1.0, -2.0))


def test_apply_normalization_on_jax_arrays_under_jit():
    rewards = jnp.array([1.0, 3.0, -2.0], jnp.bfloat16)
    out = jax.jit(lambda r: evaluate.apply_normalization(r, gain=2.0, bias=-1.0))(rewards)
    assert isinstance(out, jax.Array) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, [1.0, 5.0, -5.0])


def test_normalization_errors():
    with pytest.raises(ValueError, match="at least 2"):
        evaluate.compute_normalization([1.0])
    with pytest.raises(ValueError, match="zero std"):
        evaluate.compute_normalization([2.0, 2.0, 2.0])
    with pytest.raises(ValueError, match="target_std"):
        evaluate.compute_normalization([1.0, 2.0], target_std=0.0)
    with pytest.raises(ValueError, match=r"rewards\[1\]"):
        evaluate.compute_normalization([1.0, np.inf])


def test_reliability_diagram_png(tmp_path):
    rng = np.random.default_rng(5)
    chosen = rng.normal(1.0, 1.0, size=500)
    rejected = rng.normal(0.0, 1.0, size=500)
    path = tmp_path / "plots" / "reliability.png"
    returned = evaluate.plot_reliability_diagram(chosen, rejected, str(path), title="tiny RM")
    assert returned == str(path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1000
    # IHDR width/height (big-endian at bytes 16..24) are the 5x6 in @ 100 dpi.
    width = int.from_bytes(data[16:20], "big")
    height = int.from_bytes(data[20:24], "big")
    assert (width, height) == (500, 600)
