"""reward.objective inside PPO's rollout: K stacked reward models, normalised per member, combined (vs NumPy)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.transformer import TransformerConfig, init_params
from ppo.rollout import ModelSpecs, make_rollout_fn
from rm.ensemble import combine_member_scores, combine_scores
from rm.model import RewardModel, compute_rewards


def test_jax_objectives_equal_numpy():
    scores = np.random.default_rng(3).normal(0, 2, (4, 7)).astype(np.float32)  # [K, B]
    for objective in ("mean", "wco", "uwo"):
        got = np.asarray(jax.jit(lambda x, o=objective: combine_member_scores(x, objective=o, uwo_lambda=0.7))(scores))
        np.testing.assert_allclose(got, combine_scores(scores, objective=objective, uwo_lambda=0.7), rtol=1e-5)
    # Hand case: members (1, 3) -> mean 2, min 1, var 1, uwo(lambda 2) = 0.
    pair = np.array([[1.0], [3.0]])
    assert [float(combine_member_scores(pair, objective=o, uwo_lambda=2.0)[0]) for o in ("mean", "wco", "uwo")] == [
        2.0,
        1.0,
        0.0,
    ]
    with pytest.raises(ValueError, match="objective"):
        combine_member_scores(pair, objective="max")


@pytest.mark.parametrize("objective", ["mean", "wco", "uwo"])
def test_rollout_scores_with_ensemble_objective(objective):
    cfg = TransformerConfig(
        family="llama", vocab_size=16, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
        pad_token_id=0, eos_token_id=3,
    )  # fmt: skip
    policy = init_params(cfg, jax.random.key(0))
    members = [
        RewardModel(cfg).init(jax.random.key(10 + k), jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))[
            "params"
        ]
        for k in range(3)
    ]
    stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *members)
    norm = np.array([[2.0, -0.5], [0.5, 0.3], [1.5, 0.0]], np.float32)  # [K, (gain, bias)]
    settings = dict(
        max_new_tokens=6, temperature=1.0, top_k=0, top_p=1.0, eos_token_id=3, stop_token_ids=(),
        missing_eos_penalty=0.0, kl_estimator="k1", gamma=1.0, lam=0.95, whiten_rewards=False,
        reward_objective=objective, uwo_lambda=0.8,
    )  # fmt: skip
    q = jnp.asarray([[0, 5, 6, 7], [8, 9, 10, 11]], jnp.int32)
    qm = (q > 0).astype(jnp.int32)
    r = jax.jit(make_rollout_fn(ModelSpecs(policy=cfg, reward=cfg, value=cfg), settings))(
        {"policy": policy, "value": members[0]}, policy, stacked, jnp.asarray(norm), 0.0, q, qm, jax.random.key(1)
    )
    ids = jnp.concatenate([q, r.response_ids], 1)
    mask = jnp.concatenate([qm, r.response_mask], 1)
    member_scores = np.stack(
        [norm[k, 0] * np.asarray(compute_rewards(cfg, members[k], ids, mask)) + norm[k, 1] for k in range(3)]
    )  # [K, B]
    want = {"mean": member_scores.mean(0), "wco": member_scores.min(0)}.get(objective)
    if want is None:
        want = member_scores.mean(0) - 0.8 * member_scores.var(0)
    np.testing.assert_allclose(np.asarray(r.scores), want, atol=1e-5)
