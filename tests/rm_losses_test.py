"""Tests for rm/losses.py against NumPy references written here."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rm import losses


def _np_log_sigmoid(x):
    # log sigmoid(x) = -log(1 + exp(-x)), stable form in float64.
    return -np.logaddexp(0.0, -np.asarray(x, np.float64))


def _np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def _np_bt_loss(chosen, rejected, margin=0.0, center_coef=0.0, mask=None):
    """Loop reference over the valid pairs."""
    chosen = np.asarray(chosen, np.float64)
    rejected = np.asarray(rejected, np.float64)
    margin = np.broadcast_to(np.asarray(margin, np.float64), chosen.shape)
    mask = np.ones(chosen.shape) if mask is None else np.asarray(mask)
    bt_terms, center_terms = [], []
    for c, r, m, keep in zip(chosen, rejected, margin, mask):
        if keep:
            bt_terms.append(-_np_log_sigmoid(c - r - m))
            center_terms.append((c + r) ** 2)
    bt = float(np.mean(bt_terms))
    return bt + center_coef * float(np.mean(center_terms)), bt


@pytest.fixture
def rewards():
    rng = np.random.default_rng(0)
    chosen = rng.normal(size=16).astype(np.float32)
    rejected = rng.normal(size=16).astype(np.float32)
    return chosen, rejected


def test_plain_loss_and_metrics_match_numpy(rewards):
    chosen, rejected = rewards
    loss, metrics = losses.bradley_terry_loss(chosen, rejected)
    want, _ = _np_bt_loss(chosen, rejected)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(metrics["bt_loss"], want, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], np.mean(chosen > rejected))
    np.testing.assert_allclose(metrics["margin"], np.mean(chosen - rejected), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["chosen_reward"], np.mean(chosen), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["rejected_reward"], np.mean(rejected), rtol=1e-5, atol=1e-6)
    assert float(metrics["n_pairs"]) == 16


def test_hand_computed_example():
    # gap 0 -> log 2; gap log 3 -> -log(3/4); accuracy 1/2 (tie counts as wrong).
    loss, metrics = losses.bradley_terry_loss(jnp.array([1.0, np.log(3.0)]), jnp.array([1.0, 0.0]))
    np.testing.assert_allclose(loss, (np.log(2.0) + np.log(4.0 / 3.0)) / 2, rtol=1e-6)
    np.testing.assert_allclose(metrics["accuracy"], 0.5)


@pytest.mark.parametrize("margin", [0.5, "per_pair"])
def test_margin_matches_numpy(rewards, margin):
    chosen, rejected = rewards
    if margin == "per_pair":
        margin = np.linspace(0.0, 2.0, chosen.size).astype(np.float32)
    loss, metrics = losses.bradley_terry_loss(chosen, rejected, margin=margin)
    want, _ = _np_bt_loss(chosen, rejected, margin=margin)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    # The 'margin' metric is the reward gap, not the margin input.
    np.testing.assert_allclose(metrics["margin"], np.mean(chosen - rejected), rtol=1e-5, atol=1e-6)
    # A positive margin makes the task harder: loss strictly increases.
    assert loss > losses.bradley_terry_loss(chosen, rejected)[0]


def test_centering_matches_numpy(rewards):
    chosen, rejected = rewards
    chosen = chosen + 3.0  # An offset the centering term should penalise.
    rejected = rejected + 3.0
    loss, metrics = losses.bradley_terry_loss(chosen, rejected, margin=0.25, center_coef=0.01)
    want, want_bt = _np_bt_loss(chosen, rejected, margin=0.25, center_coef=0.01)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(metrics["bt_loss"], want_bt, rtol=1e-5)
    np.testing.assert_allclose(metrics["centering"], np.mean((chosen.astype(np.float64) + rejected) ** 2), rtol=1e-5)


def test_mask_excludes_padded_pairs(rewards):
    chosen, rejected = rewards
    mask = np.array([1] * 10 + [0] * 6, np.float32)
    margin = np.linspace(-1.0, 1.0, 16).astype(np.float32)
    # Garbage (even inf/nan) in padded slots must not change anything.
    chosen_padded = chosen.copy()
    chosen_padded[10:] = [np.inf, -np.inf, np.nan, 1e30, 0.0, 5.0]
    loss, metrics = losses.bradley_terry_loss(chosen_padded, rejected, margin=margin, center_coef=0.1, mask=mask)
    want, _ = _np_bt_loss(chosen[:10], rejected[:10], margin=margin[:10], center_coef=0.1)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(metrics["accuracy"], np.mean(chosen[:10] > rejected[:10]))
    np.testing.assert_allclose(metrics["chosen_reward"], np.mean(chosen[:10]), rtol=1e-5, atol=1e-6)
    assert float(metrics["n_pairs"]) == 10
    # Gradients at padded entries are exactly zero, and finite everywhere.
    grad = jax.grad(lambda c: losses.bradley_terry_loss(c, rejected, margin=margin, center_coef=0.1, mask=mask)[0])(
        jnp.asarray(chosen_padded)
    )
    assert np.all(np.isfinite(grad))
    np.testing.assert_array_equal(grad[10:], 0.0)
    # Boolean masks behave like 0/1 masks.
    loss_bool, _ = losses.bradley_terry_loss(
        chosen_padded, rejected, margin=margin, center_coef=0.1, mask=mask.astype(bool)
    )
    np.testing.assert_allclose(loss_bool, loss)


def test_all_zero_mask_gives_zero_not_nan(rewards):
    chosen, rejected = rewards
    mask = np.zeros(16, np.float32)
    loss, metrics = losses.bradley_terry_loss(chosen, rejected, mask=mask, center_coef=0.01)
    assert float(loss) == 0.0
    for name, value in metrics.items():
        assert np.isfinite(value), name
    grad = jax.grad(lambda c: losses.bradley_terry_loss(c, rejected, mask=mask)[0])(jnp.asarray(chosen))
    np.testing.assert_array_equal(grad, 0.0)


def test_extreme_values_are_finite():
    chosen = jnp.array([1e4, -1e4, 0.0, 5e3], jnp.float32)
    rejected = jnp.array([-1e4, 1e4, 0.0, -5e3], jnp.float32)

    def loss_fn(c, r):
        return losses.bradley_terry_loss(c, r, center_coef=0.01)[0]

    loss = loss_fn(chosen, rejected)
    grads = jax.grad(loss_fn, argnums=(0, 1))(chosen, rejected)
    assert np.isfinite(loss)
    assert all(np.all(np.isfinite(g)) for g in grads)
    # -log_sigmoid(2e4) = 0, -log_sigmoid(-2e4) = 2e4, -log_sigmoid(0) = log 2,
    # -log_sigmoid(1e4) = 0; centering: (c + r) = 0 everywhere.
    np.testing.assert_allclose(loss, (2e4 + np.log(2.0)) / 4, rtol=1e-6)


def test_gradient_matches_analytic(rewards):
    chosen, rejected = rewards
    margin = np.linspace(0.0, 1.0, chosen.size).astype(np.float32)
    batch = chosen.size
    grad_chosen, grad_rejected = jax.grad(
        lambda c, r: losses.bradley_terry_loss(c, r, margin=margin)[0], argnums=(0, 1)
    )(jnp.asarray(chosen), jnp.asarray(rejected))
    gap = chosen.astype(np.float64) - rejected - margin
    want = -_np_sigmoid(-gap) / batch
    np.testing.assert_allclose(grad_chosen, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grad_rejected, -want, rtol=1e-5, atol=1e-7)
    # Raising a chosen reward always lowers the loss.
    assert np.all(np.asarray(grad_chosen) < 0)

    # With centering the extra gradient is 2 c (r_c + r_r) / B.
    grad_centered = jax.grad(lambda c: losses.bradley_terry_loss(c, rejected, margin=margin, center_coef=0.1)[0])(
        jnp.asarray(chosen)
    )
    want_centered = want + 2 * 0.1 * (chosen.astype(np.float64) + rejected) / batch
    np.testing.assert_allclose(grad_centered, want_centered, rtol=1e-5, atol=1e-7)


def test_jit_and_bfloat16_inputs(rewards):
    chosen, rejected = rewards
    fn = jax.jit(lambda c, r: losses.bradley_terry_loss(c, r, center_coef=0.01))
    loss, metrics = fn(jnp.asarray(chosen, jnp.bfloat16), jnp.asarray(rejected, jnp.bfloat16))
    assert loss.dtype == jnp.float32
    assert metrics["accuracy"].dtype == jnp.float32
    chosen_bf = np.asarray(jnp.asarray(chosen, jnp.bfloat16), np.float64)
    rejected_bf = np.asarray(jnp.asarray(rejected, jnp.bfloat16), np.float64)
    want, _ = _np_bt_loss(chosen_bf, rejected_bf, center_coef=0.01)
    np.testing.assert_allclose(loss, want, rtol=1e-5)


def test_probability():
    chosen = np.array([0.0, np.log(3.0), -2.0])
    rejected = np.array([0.0, 0.0, 1.0])
    np.testing.assert_allclose(
        losses.bradley_terry_probability(chosen, rejected), _np_sigmoid(chosen - rejected), rtol=1e-6
    )
    np.testing.assert_allclose(losses.bradley_terry_probability(chosen, rejected)[1], 0.75, rtol=1e-6)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="rejected_rewards shape"):
        losses.bradley_terry_loss(jnp.zeros(4), jnp.zeros(3))
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        losses.bradley_terry_loss(jnp.zeros((4, 2)), jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match="margin"):
        losses.bradley_terry_loss(jnp.zeros(4), jnp.zeros(4), margin=jnp.zeros(3))
    with pytest.raises(ValueError, match="mask"):
        losses.bradley_terry_loss(jnp.zeros(4), jnp.zeros(4), mask=jnp.ones(5))
