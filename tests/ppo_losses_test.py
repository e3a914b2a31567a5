"""Tests for ppo/losses.py and ppo/kl.py against plain NumPy / Python-loop references."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppo import kl as kl_lib
from ppo import losses

# ----------------------------------------------------------------------------------
# NumPy references (float64, written independently of the JAX code)
# ----------------------------------------------------------------------------------


def gae_reference(rewards, values, mask, gamma, lam):
    """Literal double loop of the GAE formula with m_{t+1} bootstrapping (prefix masks)."""
    batch, length = rewards.shape
    advantages = np.zeros((batch, length))
    for b in range(batch):
        next_adv = 0.0
        for t in reversed(range(length)):
            m_next = mask[b, t + 1] if t + 1 < length else 0.0
            v_next = values[b, t + 1] if t + 1 < length else 0.0
            delta = rewards[b, t] + gamma * v_next * m_next - values[b, t]
            next_adv = delta + gamma * lam * m_next * next_adv
            advantages[b, t] = next_adv * mask[b, t]
    returns = (advantages + values) * mask
    return advantages, returns


def gae_squeezed_reference(rewards, values, mask, gamma, lam):
    """Non-prefix masks: squeeze out masked positions, run the loop, scatter back."""
    advantages = np.zeros(rewards.shape)
    for b in range(rewards.shape[0]):
        idx = np.flatnonzero(mask[b])
        r, v = rewards[b, idx][None], values[b, idx][None]
        adv, _ = gae_reference(r, v, np.ones_like(r), gamma, lam)
        advantages[b, idx] = adv[0]
    return advantages, (advantages + values) * mask


def log_softmax_np(logits):
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def ragged_mask(lengths, length):
    return (np.arange(length)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


RNG = np.random.default_rng(0)
B, T, V = 5, 7, 11
LENGTHS = [7, 3, 0, 1, 5]  # full row, ragged, all-zero row, length-1 row


def _random(*shape, scale=1.0):
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


# ----------------------------------------------------------------------------------
# GAE
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0), (0.95, 0.7)])
def test_gae_matches_loop_reference(gamma, lam):
    rewards, values = _random(B, T), _random(B, T)
    mask = ragged_mask(LENGTHS, T)
    adv, ret = losses.gae(rewards, values, mask, gamma=gamma, lam=lam)
    ref_adv, ref_ret = gae_reference(rewards, values, mask, gamma, lam)
    np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-5)
    assert adv.dtype == jnp.float32 and ret.dtype == jnp.float32
    assert np.all(np.asarray(adv)[mask == 0] == 0) and np.all(np.asarray(ret)[mask == 0] == 0)
    assert np.all(np.asarray(adv)[2] == 0)  # the all-zero row


def test_gae_hand_cases():
    # gamma = lam = 1: returns are the undiscounted reward-to-go (value cancels out).
    rewards = np.array([[0.0, 0.0, 1.0, 9.0]], np.float32)
    values = np.array([[0.5, -1.0, 2.0, 7.0]], np.float32)
    mask = np.array([[1, 1, 1, 0]], np.float32)
    _, ret = losses.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    np.testing.assert_allclose(ret, [[1.0, 1.0, 1.0, 0.0]], atol=1e-6)
    # lam = 0: A_t = one-step TD error, bootstrap 0 after the last valid token.
    adv, _ = losses.gae(rewards, values, mask, gamma=0.5, lam=0.0)
    np.testing.assert_allclose(adv, [[0 + 0.5 * -1.0 - 0.5, 0 + 0.5 * 2.0 + 1.0, 1.0 - 2.0, 0.0]], atol=1e-6)


def test_gae_non_prefix_mask_treats_masked_as_absent():
    rewards, values = _random(4, 8), _random(4, 8)
    mask = np.array(
        [
            [0, 0, 1, 1, 1, 0, 0, 0],  # left padding
            [1, 1, 0, 1, 0, 1, 1, 0],  # holes
            [0, 0, 0, 0, 0, 0, 0, 1],  # single token at the end
            [1, 1, 1, 1, 1, 1, 1, 1],
        ],
        np.float32,
    )
    adv, ret = losses.gae(rewards, values, mask, gamma=0.97, lam=0.9)
    ref_adv, ref_ret = gae_squeezed_reference(rewards, values, mask, 0.97, 0.9)
    np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-5)
    # Garbage (even nan) at masked positions must not leak.
    bad_rewards = np.where(mask == 0, np.nan, rewards).astype(np.float32)
    adv2, _ = losses.gae(bad_rewards, values, mask, gamma=0.97, lam=0.9)
    np.testing.assert_allclose(adv2, ref_adv, rtol=1e-5, atol=1e-5)


def test_gae_jit_traced_hyperparams_and_bf16():
    rewards, values = _random(B, T), _random(B, T)
    mask = ragged_mask(LENGTHS, T).astype(bool)
    fn = jax.jit(lambda r, v, m, g, l: losses.gae(r, v, m, gamma=g, lam=l))
    adv, _ = fn(rewards, values, mask, 0.99, 0.95)
    ref_adv, _ = gae_reference(rewards, values, mask.astype(np.float64), 0.99, 0.95)
    np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
    r16, v16 = jnp.asarray(rewards, jnp.bfloat16), jnp.asarray(values, jnp.bfloat16)
    adv16, _ = fn(r16, v16, mask, 0.99, 0.95)
    assert adv16.dtype == jnp.float32
    ref16, _ = gae_reference(
        np.asarray(r16, np.float64), np.asarray(v16, np.float64), mask.astype(np.float64), 0.99, 0.95
    )
    np.testing.assert_allclose(adv16, ref16, rtol=1e-5, atol=1e-5)


def test_gae_shape_errors():
    with pytest.raises(ValueError, match="equal shapes"):
        losses.gae(np.zeros((2, 3)), np.zeros((2, 4)), np.ones((2, 3)), gamma=1.0, lam=1.0)


# ----------------------------------------------------------------------------------
# Log-probs and entropy
# ----------------------------------------------------------------------------------


def test_logprobs_and_entropy_match_numpy():
    logits = _random(B, T, V, scale=3.0)
    tokens = RNG.integers(0, V, size=(B, T))
    ref_logp_all = log_softmax_np(logits)
    ref_logp = np.take_along_axis(ref_logp_all, tokens[..., None], -1)[..., 0]
    ref_entropy = -(np.exp(ref_logp_all) * ref_logp_all).sum(-1)
    np.testing.assert_allclose(losses.logprobs_from_logits(logits, tokens), ref_logp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(losses.entropy_from_logits(logits), ref_entropy, rtol=1e-5, atol=1e-5)
    # bf16 logits: cast to f32 inside, so the result equals the f32 computation on the
    # bf16-rounded values.
    logits16 = jnp.asarray(logits, jnp.bfloat16)
    logp16 = jax.jit(losses.logprobs_from_logits)(logits16, tokens)
    assert logp16.dtype == jnp.float32
    ref16 = np.take_along_axis(log_softmax_np(np.asarray(logits16, np.float64)), tokens[..., None], -1)[..., 0]
    np.testing.assert_allclose(logp16, ref16, rtol=1e-5, atol=1e-5)


def test_entropy_handles_masked_vocab():
    logits = np.array([[[0.0, 0.0, -np.inf, -np.inf]]], np.float32)
    entropy = losses.entropy_from_logits(logits)
    np.testing.assert_allclose(entropy, [[np.log(2.0)]], rtol=1e-6)
    grad = jax.grad(lambda x: losses.entropy_from_logits(x).sum())(jnp.asarray(logits))
    assert np.all(np.isfinite(grad))


# ----------------------------------------------------------------------------------
# Masked statistics
# ----------------------------------------------------------------------------------


def test_masked_mean_and_var():
    x = _random(B, T)
    mask = ragged_mask(LENGTHS, T)
    valid = x[mask == 1].astype(np.float64)
    np.testing.assert_allclose(losses.masked_mean(x, mask), valid.mean(), rtol=1e-5)
    np.testing.assert_allclose(losses.masked_var(x, mask), valid.var(ddof=1), rtol=1e-5)
    np.testing.assert_allclose(losses.masked_var(x, mask, unbiased=False), valid.var(), rtol=1e-5)
    row_means = losses.masked_mean(x, mask, axis=1)
    for b, n in enumerate(LENGTHS):
        np.testing.assert_allclose(row_means[b], x[b, :n].mean() if n else 0.0, rtol=1e-5)
    # Empty mask: 0 with a finite (zero) gradient, not nan.
    zero = np.zeros_like(mask)
    assert float(losses.masked_mean(x, zero)) == 0.0
    grad = jax.grad(lambda y: losses.masked_mean(y, zero))(jnp.asarray(x))
    assert np.all(grad == 0)
    # Padding holding inf/nan does not leak.
    x_bad = np.where(mask == 0, np.inf, x)
    np.testing.assert_allclose(losses.masked_mean(x_bad, mask), valid.mean(), rtol=1e-5)


def test_masked_whiten():
    x = _random(B, T, scale=3.0) + 2.0
    mask = ragged_mask(LENGTHS, T)
    valid = x[mask == 1].astype(np.float64)
    white = np.asarray(losses.masked_whiten(x, mask))
    expected = (valid - valid.mean()) / np.sqrt(valid.var(ddof=1) + 1e-8)
    np.testing.assert_allclose(white[mask == 1], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(white[mask == 1].mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(white[mask == 1].std(ddof=1), 1.0, rtol=1e-5)
    assert np.all(white[mask == 0] == 0)
    kept = np.asarray(losses.masked_whiten(x, mask, shift_mean=False))
    np.testing.assert_allclose(kept[mask == 1], expected + valid.mean(), rtol=1e-5, atol=1e-5)
    assert np.all(kept[mask == 0] == 0)


# ----------------------------------------------------------------------------------
# KL estimators
# ----------------------------------------------------------------------------------


def test_kl_estimators_match_numpy():
    logp = _random(B, T, scale=2.0) - 3.0
    ref_logp = _random(B, T, scale=2.0) - 3.0
    l = ref_logp.astype(np.float64) - logp.astype(np.float64)
    expected = {"k1": -l, "k2": 0.5 * l**2, "k3": np.exp(l) - 1.0 - l}
    for name, ref in expected.items():
        got = losses.kl_penalty(logp, ref_logp, estimator=name)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5, err_msg=name)
    # k3 and k2 are non-negative everywhere, including tiny and large log-ratios.
    l_grid = np.concatenate([np.linspace(-20, 20, 401), np.logspace(-8, -1, 50), -np.logspace(-8, -1, 50)]).astype(
        np.float32
    )
    k3 = np.asarray(losses.kl_penalty(np.zeros_like(l_grid), l_grid, estimator="k3"))
    assert np.all(k3 >= 0)
    l64 = l_grid.astype(np.float64)
    # Full relative precision even where exp(l) - 1 - l cancels (|l| down to 1e-8).
    np.testing.assert_allclose(k3, np.expm1(l64) - l64, rtol=1e-5, atol=0)
    assert np.all(np.asarray(losses.kl_penalty(np.zeros_like(l_grid), l_grid, estimator="k2")) >= 0)
    # Default is k1 and bf16 inputs come out in f32.
    got = losses.kl_penalty(jnp.asarray(logp, jnp.bfloat16), jnp.asarray(ref_logp, jnp.bfloat16))
    assert got.dtype == jnp.float32
    with pytest.raises(ValueError, match="k1, k2, k3"):
        losses.kl_penalty(logp, ref_logp, estimator="k4")


# ----------------------------------------------------------------------------------
# PPO losses
# ----------------------------------------------------------------------------------


def policy_loss_reference(logp, old_logp, adv, mask, eps):
    logp, old_logp, adv = (a.astype(np.float64) for a in (logp, old_logp, adv))
    ratio = np.exp(logp - old_logp)
    unclipped, clipped = -adv * ratio, -adv * np.clip(ratio, 1 - eps, 1 + eps)
    n = mask.sum()
    mean = lambda a: (a * mask).sum() / n
    grad = np.where(unclipped >= clipped, -adv * ratio, 0.0) * mask / n  # d loss / d logp
    return (
        mean(np.maximum(unclipped, clipped)),
        {
            "clipfrac": mean((clipped > unclipped).astype(np.float64)),
            "approxkl": mean(0.5 * (logp - old_logp) ** 2),
            "ratio_mean": mean(ratio),
        },
        grad,
    )


def test_policy_loss_matches_numpy():
    mask = ragged_mask(LENGTHS, T)
    old_logp = _random(B, T) - 2.0
    logp = old_logp + _random(B, T, scale=0.3)  # ratios spread around 1, many clipped
    adv = _random(B, T)
    eps = 0.2
    loss, metrics = losses.policy_loss(logp, old_logp, adv, mask, clip_eps=eps)
    ref_loss, ref_metrics, ref_grad = policy_loss_reference(logp, old_logp, adv, mask, eps)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert set(metrics) == set(ref_metrics)
    for key in ref_metrics:
        np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, err_msg=key)
    assert 0.0 < float(metrics["clipfrac"]) < 1.0  # the test exercises both branches
    grad = jax.grad(lambda x: losses.policy_loss(x, old_logp, adv, mask, clip_eps=eps)[0])(jnp.asarray(logp))
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-7)
    # Garbage (-inf log-probs of pad tokens) at padded positions does not leak.
    logp_bad = np.where(mask == 0, -np.inf, logp).astype(np.float32)
    loss_bad, _ = losses.policy_loss(logp_bad, old_logp, adv, mask, clip_eps=eps)
    np.testing.assert_allclose(loss_bad, ref_loss, rtol=1e-5)
    grad_bad = jax.grad(lambda x: losses.policy_loss(x, old_logp, adv, mask, clip_eps=eps)[0])(jnp.asarray(logp_bad))
    np.testing.assert_allclose(grad_bad, ref_grad, rtol=1e-4, atol=1e-7)


def test_policy_loss_at_old_policy():
    # At logp == logp_old: ratio 1, loss = -mean(A), nothing clipped, approxkl 0.
    mask = ragged_mask(LENGTHS, T)
    logp, adv = _random(B, T), _random(B, T)
    loss, metrics = losses.policy_loss(logp, logp, adv, mask, clip_eps=0.2)
    np.testing.assert_allclose(loss, -adv[mask == 1].astype(np.float64).mean(), rtol=1e-5)
    assert float(metrics["clipfrac"]) == 0.0 and float(metrics["approxkl"]) == 0.0
    np.testing.assert_allclose(metrics["ratio_mean"], 1.0, rtol=1e-6)


def test_value_loss_matches_numpy():
    mask = ragged_mask(LENGTHS, T)
    old_values = _random(B, T)
    values = old_values + _random(B, T, scale=0.4)
    returns = _random(B, T)
    eps = 0.2
    loss, metrics = losses.value_loss(values, old_values, returns, mask, clip_eps=eps)
    v, vo, r = (a.astype(np.float64) for a in (values, old_values, returns))
    unclipped = (v - r) ** 2
    clipped = (vo + np.clip(v - vo, -eps, eps) - r) ** 2
    n = mask.sum()
    np.testing.assert_allclose(loss, 0.5 * (np.maximum(unclipped, clipped) * mask).sum() / n, rtol=1e-5)
    ref_clipfrac = ((clipped > unclipped) * mask).sum() / n
    np.testing.assert_allclose(metrics["vf_clipfrac"], ref_clipfrac, rtol=1e-5)
    assert 0.0 < ref_clipfrac < 1.0
    # Gradient: (V - R) / n where the unclipped error is the max, else 0 if V is clipped.
    in_range = np.abs(v - vo) <= eps
    ref_grad = (
        np.where(unclipped >= clipped, v - r, np.where(in_range, vo + np.clip(v - vo, -eps, eps) - r, 0.0)) * mask / n
    )
    grad = jax.grad(lambda x: losses.value_loss(x, old_values, returns, mask, clip_eps=eps)[0])(jnp.asarray(values))
    np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-7)


def test_losses_jit_and_bf16_match_eager():
    mask = ragged_mask(LENGTHS, T)
    old_logp = _random(B, T) - 2.0
    logp = old_logp + _random(B, T, scale=0.3)
    adv = _random(B, T)
    values, old_values, returns = _random(B, T), _random(B, T), _random(B, T)

    def everything(logp, old_logp, adv, values, old_values, returns, mask):
        pg, pg_m = losses.policy_loss(logp, old_logp, adv, mask, clip_eps=0.2)
        vf, vf_m = losses.value_loss(values, old_values, returns, mask, clip_eps=0.2)
        white = losses.masked_whiten(adv, mask)
        kl = losses.kl_penalty(logp, old_logp, estimator="k3")
        return pg, pg_m, vf, vf_m, white, kl

    args = (logp, old_logp, adv, values, old_values, returns, mask)
    eager = everything(*args)
    jitted = jax.jit(everything)(*args)
    for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # bf16 inputs: same as f32 maths on the bf16-rounded values, outputs f32.
    args16 = tuple(jnp.asarray(a, jnp.bfloat16) for a in args[:-1]) + (mask,)
    rounded = tuple(np.asarray(a, np.float32) for a in args16[:-1]) + (mask,)
    out16 = jax.jit(everything)(*args16)
    ref16 = everything(*rounded)
    for a, b in zip(jax.tree_util.tree_leaves(out16), jax.tree_util.tree_leaves(ref16)):
        assert a.dtype == jnp.float32
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------
# KL controllers
# ----------------------------------------------------------------------------------


def test_adaptive_controller_trajectory_matches_hand_loop():
    target, horizon, n_steps, beta0 = 6.0, 10000.0, 512, 0.05
    # KL far above target (e clipped at +0.2), far below (clipped at -0.2), and in between.
    kls = [20.0, 15.0, 7.0, 6.5, 6.0, 5.0, 0.5, 0.0, 1.0, 4.9, 7.19, 30.0, 6.1, 5.9, 2.0, 9.0, 4.0, 8.0, 0.1, 6.0]
    controller = kl_lib.AdaptiveKLController(beta0, target=target, horizon=horizon)
    beta, clipped_up, clipped_down = beta0, 0, 0
    for step, kl in enumerate(kls):
        raw_error = kl / target - 1.0
        error = min(max(raw_error, -0.2), 0.2)
        clipped_up += raw_error > 0.2
        clipped_down += raw_error < -0.2
        beta = beta * (1.0 + error * n_steps / horizon)
        got = controller.update(np.float32(kl) if step % 2 else kl, n_steps)
        assert got == controller.value
        np.testing.assert_allclose(controller.value, beta, rtol=1e-6, err_msg=f"step {step}")
        assert isinstance(controller.value, float)
    assert clipped_up >= 3 and clipped_down >= 3
    # The pure function agrees, also under jit.
    pure = jax.jit(lambda b, k: kl_lib.adaptive_kl_update(b, kl=k, target=target, horizon=horizon, n_steps=n_steps))
    b = beta0
    for kl in kls:
        b = pure(b, kl)
    np.testing.assert_allclose(float(b), beta, rtol=1e-5)
    assert isinstance(kl_lib.adaptive_kl_update(0.1, kl=7.0, target=6.0, horizon=10000, n_steps=256), float)


def test_controller_state_dict_roundtrip_and_errors():
    first = kl_lib.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    for kl in (9.0, 8.0, 1.0):
        first.update(kl, 1024)
    state = first.state_dict()
    # Checkpoints may hand back NumPy scalars instead of Python floats.
    resumed = kl_lib.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    resumed.load_state_dict({k: np.asarray(v) for k, v in state.items()})
    assert resumed.value == first.value
    for kl in (3.0, 12.0):
        assert resumed.update(kl, 1024) == first.update(kl, 1024)

    fixed = kl_lib.FixedKLController(0.05)
    assert fixed.update(100.0, 512) == 0.05 and fixed.value == 0.05
    other = kl_lib.FixedKLController(0.5)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.05

    with pytest.raises(ValueError, match="'value'"):
        resumed.load_state_dict({"beta": 0.1})
    with pytest.raises(ValueError, match="'value'"):
        resumed.load_state_dict({"value": float("nan")})
    with pytest.raises(ValueError, match="finite"):
        resumed.update(float("nan"), 10)


def test_make_kl_controller():
    fixed = kl_lib.make_kl_controller(init_beta=0.05)
    assert isinstance(fixed, kl_lib.FixedKLController) and fixed.value == 0.05
    adaptive = kl_lib.make_kl_controller(kind="adaptive", init_beta=0.1, target=6.0)
    assert isinstance(adaptive, kl_lib.AdaptiveKLController)
    assert adaptive.horizon == 10000 and adaptive.target == 6.0
    with pytest.raises(ValueError, match="target"):
        kl_lib.make_kl_controller(kind="adaptive", init_beta=0.1)
    with pytest.raises(ValueError, match="fixed, adaptive"):
        kl_lib.make_kl_controller(kind="pid", init_beta=0.1)
    with pytest.raises(ValueError, match="horizon"):
        kl_lib.make_kl_controller(kind="adaptive", init_beta=0.1, target=6.0, horizon=0)
    with pytest.raises(ValueError, match="beta"):
        kl_lib.make_kl_controller(kind="fixed", init_beta=-1.0)
