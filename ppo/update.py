"""The PPO update: the clipped loss of one micro-batch and all epochs over minibatches as one pure step.

`ppo_update(state, rollout, frozen)` is what ppo/train.py jits (state donated); the benchmarks
(benchmarks/gpu.py, benchmarks/memory.py) and the sharding tests jit the same function.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from common.optim import accumulate_gradients
from models.lora import combine_params
from ppo import algorithms as algos
from ppo import losses as L
from ppo.rollout import response_logprobs_and_values

UPDATE_KEYS = (
    "query_ids",
    "query_mask",
    "response_ids",
    "response_mask",
    "logprobs",
    "values",
    "advantages",
    "returns",
)


def ppo_loss(params, batch, rng, *, specs, temperature, clip_eps, vf_clip_eps, vf_coef, variant=None, kl_in_loss=False):
    """Clipped policy loss + vf_coef * clipped value loss on one micro-batch (LoRA dropout uses `rng`).

    variant: None = the PPO policy loss; else the keyword arguments of ppo/objectives.py's
    policy_objective (clip variants, aggregation; the KL term with kl_in_loss), see ppo/algorithms.py.
    Without a critic (specs.critic False) there is no value loss.
    """
    logprobs, token_entropy, values = response_logprobs_and_values(
        specs,
        params,
        batch["query_ids"],
        batch["query_mask"],
        batch["response_ids"],
        batch["response_mask"],
        dropout_rng=rng,
        temperature=temperature,
    )
    maskf = batch["response_mask"].astype(jnp.float32)
    if variant is not None:
        loss, metrics = algos.policy_gradient_loss(logprobs, batch, maskf, variant=variant, kl_in_loss=kl_in_loss)
        metrics["policy/entropy"] = L.masked_mean(token_entropy, maskf)
        if specs.critic:
            vf_loss, vf_m = L.value_loss(values, batch["values"], batch["returns"], maskf, clip_eps=vf_clip_eps)
            loss = loss + vf_coef * vf_loss
            metrics.update({"val/vf_loss": vf_loss, "val/clipfrac": vf_m["vf_clipfrac"]})
        return loss, metrics
    pg_loss, pg_m = L.policy_loss(logprobs, batch["logprobs"], batch["advantages"], maskf, clip_eps=clip_eps)
    vf_loss, vf_m = L.value_loss(values, batch["values"], batch["returns"], maskf, clip_eps=vf_clip_eps)
    entropy = L.masked_mean(token_entropy, maskf)
    loss = pg_loss + vf_coef * vf_loss
    return loss, {
        "policy/pg_loss": pg_loss,
        "val/vf_loss": vf_loss,
        "policy/approxkl": pg_m["approxkl"],
        "policy/clipfrac": pg_m["clipfrac"],
        "val/clipfrac": vf_m["vf_clipfrac"],
        "policy/entropy": entropy,
        "policy/ratio": pg_m["ratio_mean"],
    }


def ppo_update(
    state, rollout: dict, frozen=None, *, tx, loss_fn, ppo_epochs, num_minibatches, accum_steps, group_size=1
):
    """All PPO epochs over shuffled minibatches of one rollout batch, as one pure function.

    group_size K > 1: rows [g*K, (g+1)*K) are one prompt's group and are shuffled as a unit
    (ppo/algorithms.py minibatch_order); K = 1 shuffles rows as always.

    rollout: dict of UPDATE_KEYS arrays with leading dim B. frozen: the non-trainable part of
    the params (LoRA bases; None or {} without LoRA), joined with state['params'] inside the
    loss so gradients are taken w.r.t. the trainable part only. Returns (state, mean metrics).
    """
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    frozen = frozen or {}

    def trainable_loss(params, batch, micro_rng):
        return loss_fn(combine_params(params, frozen), batch, micro_rng)

    b = rollout["query_ids"].shape[0]
    mb = b // num_minibatches
    if group_size > 1:
        order = algos.minibatch_order(
            jax.random.fold_in(rng, 1),
            batch=b,
            group_size=group_size,
            ppo_epochs=ppo_epochs,
            num_minibatches=num_minibatches,
        )
    else:
        perms = jax.vmap(lambda k: jax.random.permutation(k, b))(
            jax.random.split(jax.random.fold_in(rng, 1), ppo_epochs)
        )
        order = perms.reshape(ppo_epochs * num_minibatches, mb)  # [E*M, mb] row indices

    def one_minibatch(carry, idx):
        params, opt_state, i = carry
        batch = jax.tree.map(lambda x: jnp.take(x, idx, axis=0), rollout)
        _, aux, grads = accumulate_gradients(
            trainable_loss, params, batch, jax.random.fold_in(rng, i), accum_steps=accum_steps
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        aux = dict(aux, **{"policy/grad_norm": optax.tree.norm(grads)})
        return (params, opt_state, i + 1), aux

    (params, opt_state, _), aux = jax.lax.scan(one_minibatch, (state["params"], state["opt_state"], 0), order)
    metrics = jax.tree.map(jnp.mean, aux)
    return dict(state, params=params, opt_state=opt_state, step=state["step"] + 1), metrics
