"""Rematerialisation (jax.checkpoint on blocks) changes memory, not maths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.transformer import TransformerConfig
from rm.model import RewardModel


@pytest.mark.parametrize("family,policy", [("gpt2", "nothing_saveable"), ("llama", "dots_saveable")])
def test_remat_gives_same_gradients(family, policy):
    cfg = TransformerConfig(
        family=family,
        vocab_size=50,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2 if family == "llama" else 4,
        head_dim=8,
        d_ff=64,
        qkv_bias=family == "gpt2",
        o_bias=family == "gpt2",
        mlp_bias=family == "gpt2",
        activation="gelu_new" if family == "gpt2" else "silu",
    )
    ids = jax.random.randint(jax.random.key(0), (3, 9), 0, 50)
    mask = jnp.ones((3, 9), jnp.int32).at[1, 6:].set(0)
    params = RewardModel(cfg).init(jax.random.key(1), ids, mask)["params"]

    def loss(p, c):
        return jnp.sum(jnp.sin(RewardModel(c).apply({"params": p}, ids, mask)))

    plain = jax.jit(jax.grad(loss), static_argnums=1)(params, cfg)
    remat_cfg = cfg.replace(remat=True, remat_policy=policy)
    remat = jax.jit(jax.grad(loss), static_argnums=1)(params, remat_cfg)
    # The remat program really recomputes: its jaxpr holds a checkpoint (remat) primitive.
    jaxpr = str(jax.make_jaxpr(loss, static_argnums=1)(params, remat_cfg))
    assert "checkpoint" in jaxpr or "remat" in jaxpr
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6), plain, remat
    )
