"""sequential_value_update: the policy's and the value model's steps, each with its own optimizer and
clipping norm, against two hand-built optax steps on the joint loss's two gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from common.optim import make_optimizer
from models.transformer import TransformerConfig, init_params
from ppo.rollout import ModelSpecs
from ppo.update import ppo_loss, ppo_update, separate_optimizers
from rm.model import init_head

B, P, N, V = 4, 3, 5, 29
EPOCHS, MINIBATCHES = 1, 2
CONFIG = TransformerConfig(
    family="llama", vocab_size=V, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32
)
LOSS = dict(temperature=0.7, clip_eps=0.2, vf_clip_eps=0.2, vf_coef=0.1)


def _rollout():
    ks = jax.random.split(jax.random.key(7), 5)
    return {
        "query_ids": jax.random.randint(ks[0], (B, P), 0, V),
        "query_mask": jnp.ones((B, P), jnp.int32).at[0, 0].set(0),
        "response_ids": jax.random.randint(ks[1], (B, N), 0, V),
        "response_mask": jnp.ones((B, N), jnp.int32).at[1, N - 2 :].set(0),
        "logprobs": -jax.random.uniform(ks[2], (B, N)) * 3,
        "values": jax.random.normal(ks[3], (B, N)),
        "advantages": jax.random.normal(ks[4], (B, N)),
        "returns": jax.random.normal(ks[4], (B, N)) + 1,
    }


def _setup(max_grad_norm):
    params = {
        "policy": init_params(CONFIG, jax.random.key(0)),
        "value": {"backbone": init_params(CONFIG, jax.random.key(1)), "head": init_head(CONFIG, jax.random.key(2))},
    }
    # eps 1e-4: Adam divides by |g| + eps, which would blow float32 rounding of tiny gradients up to the rate
    tx, _ = make_optimizer(learning_rate=1e-2, total_steps=10, warmup_steps=0, max_grad_norm=max_grad_norm, eps=1e-4)
    loss_fn = functools.partial(ppo_loss, specs=ModelSpecs(policy=CONFIG, reward=CONFIG, value=CONFIG), **LOSS)
    rng = jax.random.key_data(jax.random.key(3))
    return params, tx, loss_fn, rng


def _update(params, tx, loss_fn, rng, *, sequential):
    tx = separate_optimizers(tx) if sequential else tx
    state = {"params": params, "opt_state": tx.init(params), "rng": rng, "step": jnp.asarray(0, jnp.int32)}
    update = functools.partial(
        ppo_update,
        tx=tx,
        loss_fn=loss_fn,
        ppo_epochs=EPOCHS,
        num_minibatches=MINIBATCHES,
        accum_steps=1,
        sequential_value_update=sequential,
    )
    return jax.jit(update)(state, _rollout())


def _reference(params, tx, loss_fn, rng):
    """Two optax optimizers, one per model, stepped on the joint loss's gradient w.r.t. each model."""
    key = jax.random.fold_in(jax.random.wrap_key_data(rng), 0)
    perms = jax.vmap(lambda k: jax.random.permutation(k, B))(jax.random.split(jax.random.fold_in(key, 1), EPOCHS))
    order = perms.reshape(EPOCHS * MINIBATCHES, B // MINIBATCHES)

    @functools.partial(jax.jit, static_argnums=0)
    def step(name, params, opt, batch, micro_rng):
        grads = jax.grad(lambda own: loss_fn(dict(params, **{name: own}), batch, micro_rng)[0])(params[name])
        updates, opt = tx.update(grads, opt, params[name])
        return dict(params, **{name: optax.apply_updates(params[name], updates)}), opt

    opt = {k: tx.init(v) for k, v in params.items()}
    rollout = _rollout()
    for i, idx in enumerate(np.asarray(order)):
        batch = jax.tree.map(lambda x: x[idx], rollout)
        micro_rng = jax.random.fold_in(jax.random.fold_in(key, i), 0)
        for name in ("policy", "value"):
            params, opt[name] = step(name, params, opt[name], batch, micro_rng)
    return params


def _max_diff(a, b):
    return max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_sequential_update_equals_two_optimizers():
    params, tx, loss_fn, rng = _setup(max_grad_norm=0.05)  # small enough that every step clips
    (state, metrics) = _update(params, tx, loss_fn, rng, sequential=True)
    reference = _reference(params, tx, loss_fn, rng)
    assert _max_diff(state["params"], reference) < 1e-6
    assert _max_diff(state["params"], params) > 1e-3  # the step moved the params
    assert float(metrics["policy/grad_norm"]) > 0.05 and float(metrics["val/grad_norm"]) > 0.05  # both clipped
    # The joint update clips the two gradients by one global norm: different params.
    joint, _ = _update(params, tx, loss_fn, rng, sequential=False)
    assert _max_diff(joint["params"], reference) > 1e-4


def test_sequential_update_refuses_a_shared_backbone():
    params, tx, loss_fn, rng = _setup(max_grad_norm=1.0)
    params = {"policy": params["policy"], "value_head": params["value"]["head"]}
    with pytest.raises(ValueError, match="separate value model"):
        _update(params, tx, loss_fn, rng, sequential=True)


def test_sequential_update_holds_no_shared_zero_stack(monkeypatch):
    """Each model's gradient pass in its own computation: the compiled update's temp is at least one
    stack of saved carries [L, B, T, d] float32 below the same update with the two passes in one
    computation, where XLA merges their zero buffers (see ppo/update.py `_in_own_computation`)."""
    import ppo.update as update_module
    from benchmarks.memory import compiler_options
    from benchmarks.memory_setup import parse_variant, ppo_setup

    dims = dict(
        vocab_size=128,
        d_model=128,
        n_layers=2,
        n_heads=2,
        n_kv_heads=1,
        head_dim=64,
        d_ff=256,
        tie_embeddings=True,
        logits_chunk=32,
        scan_layers=True,
    )
    workload = dict(rm_pairs=2, rm_len=64, ppo_rollouts=4, prompt_len=64, response_len=64)

    def temp_bytes():
        step, build = ppo_setup(dims, parse_variant("lora+remat"), workload, sequential_value_update=True)
        compiled = step.lower(*jax.eval_shape(build)).compile(compiler_options("memory"))
        return compiled.memory_analysis().temp_size_in_bytes

    isolated = temp_bytes()
    monkeypatch.setattr(update_module, "_in_own_computation", lambda fn, *args, opaque_true: fn(*args))
    shared = temp_bytes()
    carries_stack = 2 * 4 * 128 * 128 * 4  # [L, B, P + N, d] float32
    assert shared - isolated >= carries_stack, (shared, isolated)
