"""Critic-free estimators (ppo/advantages.py), policy-loss variants and aggregation (ppo/objectives.py) and
the algorithm switch (ppo/algorithms.py) against NumPy loop references and hand sums."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs.ppo as ppo_config
from ppo import advantages as A
from ppo import algorithms as algos
from ppo import objectives as O

# ----------------------------------------------------------------------------- NumPy references (float64 loops)


def group_reference(scores, valid, k, kind, eps=1e-6):
    out = np.zeros(len(scores))
    for g in range(len(scores) // k):
        members = [i for i in range(g * k, (g + 1) * k) if valid[i]]
        if len(members) < 2:
            continue
        r = np.array([scores[i] for i in members])
        for pos, i in enumerate(members):
            if kind == "rloo":
                others = [r[j] for j in range(len(r)) if j != pos]
                out[i] = r[pos] - sum(others) / len(others)
            elif kind == "grpo":
                out[i] = (r[pos] - r.mean()) / (r.std(ddof=1) + eps)
            else:  # dr_grpo, reinforce_baseline
                out[i] = r[pos] - r.mean()
    return out


def returns_reference(rewards, mask, gamma):
    out = np.zeros(rewards.shape)
    for b in range(rewards.shape[0]):
        acc = 0.0
        for t in reversed(range(rewards.shape[1])):
            if mask[b, t]:
                acc = rewards[b, t] + gamma * acc
                out[b, t] = acc
    return out


def critic_free_reference(kind, scores, kl, mask, beta, k):
    lengths = mask.sum(1).astype(int)
    if kind in ("rloo", "grpo", "dr_grpo"):
        seq = np.array([scores[b] - beta * sum(kl[b, t] for t in range(lengths[b])) for b in range(len(scores))])
        adv = group_reference(seq, np.ones(len(scores), bool), k, kind)
        return adv[:, None] * mask, seq[:, None] * mask
    final = group_reference(scores, np.ones(len(scores), bool), k, kind) if kind == "reinforce_baseline" else scores
    rewards = np.zeros(kl.shape)
    for b in range(len(scores)):
        for t in range(lengths[b]):
            rewards[b, t] = -beta * kl[b, t] + (final[b] if t == lengths[b] - 1 else 0.0)
    returns = returns_reference(rewards, mask, 1.0)
    vals = returns[mask > 0]
    whitened = (returns - vals.mean()) / np.sqrt(vals.var(ddof=1) + 1e-8) * mask
    return whitened, returns


def ragged_batch(seed, groups=4, k=3, t=7):
    rs = np.random.RandomState(seed)
    b = groups * k
    lengths = rs.randint(1, t + 1, size=b)  # members of one group differ in length
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
    scores = rs.normal(size=b).astype(np.float32)
    kl = (rs.normal(size=(b, t)) * 0.3).astype(np.float32)
    kl = np.where(mask > 0, kl, np.nan)  # padding may hold garbage
    return scores, kl, mask


# ----------------------------------------------------------------------------- estimators


@pytest.mark.parametrize("kind", A.GROUP_KINDS)
def test_group_advantages_with_invalid_members(kind):
    rs = np.random.RandomState(1)
    k = 4
    scores = rs.normal(size=5 * k).astype(np.float32)
    valid = np.ones(5 * k, bool)
    valid[[1, 6, 7]] = False  # groups 0 and 1 lose members
    valid[[8, 9, 10]] = False  # group 2 keeps a single member: no baseline, advantage 0
    scores[~valid] = np.nan  # invalid slots may hold anything
    scores[16:20] = 0.7  # group 4: all equal (grpo: 0 / (0 + eps) = 0)
    got = np.asarray(A.group_advantages(scores, group_size=k, kind=kind, valid=valid))
    want = group_reference(scores, valid, k, kind)
    np.testing.assert_allclose(got, want, atol=2e-5)
    assert np.all(got[~valid] == 0) and np.all(got[8:12] == 0) and np.all(got[16:20] == 0)
    if kind in ("rloo", "dr_grpo"):
        assert abs(got[:4].sum()) < 1e-5  # centred over the valid members


@pytest.mark.parametrize("kind", A.CRITIC_FREE)
def test_critic_free_advantages_on_ragged_groups(kind):
    scores, kl, mask = ragged_batch(seed=2)
    beta = 0.3
    adv, ret = A.critic_free_advantages(kind=kind, scores=scores, kl=kl, mask=mask, beta=beta, group_size=3)
    want_adv, want_ret = critic_free_reference(kind, scores, np.nan_to_num(kl), mask, beta, 3)
    np.testing.assert_allclose(np.asarray(ret), want_ret, atol=2e-5)
    np.testing.assert_allclose(np.asarray(adv), want_adv, atol=2e-5)
    assert np.all(np.isfinite(np.asarray(adv)))


def test_discounted_returns_and_group_size_errors():
    rs = np.random.RandomState(3)
    rewards = rs.normal(size=(4, 6)).astype(np.float32)
    mask = (rs.uniform(size=(4, 6)) > 0.3).astype(np.float32)  # non-prefix: masked steps are skipped
    np.testing.assert_allclose(
        np.asarray(A.discounted_returns(rewards, mask, gamma=0.9)), returns_reference(rewards, mask, 0.9), atol=1e-5
    )
    with pytest.raises(ValueError, match="group_size=3"):
        A.group_advantages(np.zeros(8), group_size=3, kind="rloo")


# ----------------------------------------------------------------------------- losses


def clip_reference(logp, old, adv, mask, low, high, c):
    """Per-token loss and d loss / d logp by hand (float64)."""
    loss, grad = np.zeros(logp.shape), np.zeros(logp.shape)
    for i in np.ndindex(logp.shape):
        if not mask[i]:
            continue
        r, a = np.exp(logp[i] - old[i]), adv[i]
        unclipped, clipped = -a * r, -a * min(max(r, 1 - low), 1 + high)
        value, g = (unclipped, -a * r) if unclipped >= clipped else (clipped, 0.0)
        if c and a < 0 and value > -c * a:
            value, g = -c * a, 0.0
        loss[i], grad[i] = value, g
    return loss, grad


@pytest.mark.parametrize("low,high,c", [(0.2, 0.2, 0.0), (0.2, 0.28, 0.0), (0.1, 0.3, 3.0)])
def test_asymmetric_and_dual_clip_values_and_gradients(low, high, c):
    rs = np.random.RandomState(4)
    shape = (6, 9)
    old = rs.normal(size=shape).astype(np.float32)
    # log-ratios spread over [-2, 2]: inside and outside both clip bounds and past the dual-clip cap
    logp = (old + rs.uniform(-2, 2, size=shape)).astype(np.float32)
    adv = rs.normal(size=shape).astype(np.float32)
    mask = (np.arange(9)[None] < rs.randint(2, 10, size=6)[:, None]).astype(np.float32)
    want, want_grad = clip_reference(logp, old, adv, mask, low, high, c)

    def total(lp):
        token_loss, _ = O.clipped_token_losses(
            lp, old, adv, mask, clip_eps_low=low, clip_eps_high=high, dual_clip_c=c or None
        )
        return jnp.sum(token_loss), token_loss

    (_, token_loss), grad = jax.value_and_grad(total, has_aux=True)(jnp.asarray(logp))
    np.testing.assert_allclose(np.asarray(token_loss), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-5, atol=1e-5)
    if c:  # the cap is really exercised
        assert np.sum((adv < 0) & (mask > 0) & np.isclose(want, -c * adv)) > 0


def test_aggregation_modes_against_hand_sums():
    loss = np.array([[1.0, 2.0, 3.0, 99.0], [4.0, 99.0, 99.0, 99.0], [5.0, 6.0, 99.0, 99.0]], np.float32)
    mask = np.array([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]], np.float32)
    hand = {
        "token_mean": (1 + 2 + 3 + 4 + 5 + 6) / 6,
        "seq_mean_token_mean": ((1 + 2 + 3) / 3 + 4 / 1 + (5 + 6) / 2) / 3,
        "seq_mean_token_sum": (6 + 4 + 11) / 3,
        "seq_mean_token_sum_norm": (6 + 4 + 11) / 3 / 4,
    }  # constant = T = 4
    for mode, value in hand.items():
        np.testing.assert_allclose(float(O.aggregate_loss(loss, mask, mode=mode)), value, rtol=1e-6)
    np.testing.assert_allclose(
        float(O.aggregate_loss(loss, mask, mode="seq_mean_token_sum_norm", norm_constant=10.0)), 21 / 3 / 10, rtol=1e-6
    )
    with pytest.raises(ValueError, match="mode='mean'"):
        O.aggregate_loss(loss, mask, mode="mean")


@pytest.mark.parametrize("estimator", ["k3", "k2"])
def test_kl_loss_term_value_and_gradient(estimator):
    rs = np.random.RandomState(5)
    shape = (3, 5)
    logp = rs.normal(size=shape).astype(np.float32) - 2
    ref = (logp + rs.normal(size=shape) * 0.5).astype(np.float32)
    mask = np.array([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], np.float32)
    beta = 0.7
    adv = np.zeros(shape, np.float32)  # no policy-gradient part: the loss is the KL term alone

    def loss_fn(lp):
        return O.policy_objective(
            lp,
            logp,
            adv,
            mask,
            clip_eps_low=0.2,
            clip_eps_high=0.2,
            aggregation="seq_mean_token_mean",
            ref_logprobs=ref,
            kl_coef=beta,
            kl_estimator=estimator,
        )[0]

    value, grad = jax.value_and_grad(loss_fn)(jnp.asarray(logp))
    l = ref.astype(np.float64) - logp
    tok = np.exp(l) - 1 - l if estimator == "k3" else 0.5 * l**2
    dtok = 1 - np.exp(l) if estimator == "k3" else -l  # d kl_t / d logp_t
    lengths = mask.sum(1, keepdims=True)
    np.testing.assert_allclose(float(value), beta * np.mean((tok * mask).sum(1) / lengths[:, 0]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), beta * dtok * mask / lengths / 3, rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------- the algorithm switch


def test_resolve_defaults_and_estimators():
    c = ppo_config.get_config("size=tiny")
    a = algos.resolve(c)
    assert a.variant is None and a.critic and not a.kl_in_loss and a.group_size == 1  # PPO exactly as before
    c.algo.advantage, c.rollout.samples_per_prompt = "grpo", 4
    a = algos.resolve(c)
    assert not a.critic and a.kl_in_loss and a.variant["aggregation"] == "seq_mean_token_mean"
    c.algo.advantage = "dr_grpo"
    a = algos.resolve(c)
    assert a.variant["aggregation"] == "seq_mean_token_sum_norm" and a.variant["norm_constant"] == 16
    c.algo.advantage, c.algo.clip_eps_high, c.algo.dual_clip_c = "reinforce_pp", 0.28, 3.0
    a = algos.resolve(c)
    assert not a.kl_in_loss and a.variant["clip_eps_high"] == 0.28 and a.variant["clip_eps_low"] == 0.2
    c.rollout.samples_per_prompt = 1
    c.algo.advantage = "rloo"
    with pytest.raises(ValueError, match="samples_per_prompt >= 2"):
        algos.resolve(c)
    c.algo.advantage = "ppo"
    with pytest.raises(ValueError, match="config.algo.advantage='ppo'"):
        algos.resolve(c)


def test_minibatch_order_keeps_groups_together():
    order = np.asarray(
        algos.minibatch_order(jax.random.key(0), batch=24, group_size=4, ppo_epochs=3, num_minibatches=2)
    )
    assert order.shape == (6, 12)
    for epoch in order.reshape(3, 24):
        assert sorted(epoch) == list(range(24))  # every row once per epoch
        groups = epoch.reshape(6, 4)
        assert np.all(groups // 4 == groups[:, :1] // 4) and np.all(groups % 4 == np.arange(4))
    assert len({tuple(e) for e in order.reshape(3, 24)}) > 1  # shuffled differently per epoch
