"""The PPO update: the clipped loss of one micro-batch and all epochs over minibatches as one pure step.

`ppo_update(state, rollout, frozen)` is what ppo/train.py jits (state donated); the benchmarks
(benchmarks/gpu.py, benchmarks/memory.py) and the sharding tests jit the same function.

sequential_value_update (train.sequential_value_update): per minibatch the policy's gradients are
computed and applied, then the value model's, each by its own copy of the optimizer
(`separate_optimizers`: own Adam moments, clipped on its own norm, as OpenRLHF's separate actor and
critic optimizers do), so only one model's gradients are ever live. Needs a separate value model:
its loss then does not depend on the policy's params (a value head on the policy's backbone does).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from common.optim import accumulate_gradients
from models.lora import combine_params
from ppo import algorithms as algos
from ppo import losses as L
from ppo.rollout import response_logprobs_and_values, response_values

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


def ppo_loss(
    params,
    batch,
    rng,
    *,
    specs,
    temperature,
    clip_eps,
    vf_clip_eps,
    vf_coef,
    variant=None,
    kl_in_loss=False,
    part="both",
):
    """Clipped policy loss + vf_coef * clipped value loss on one micro-batch (LoRA dropout uses `rng`).

    variant: None = the PPO policy loss; else the keyword arguments of ppo/objectives.py's
    policy_objective (clip variants, aggregation; the KL term with kl_in_loss), see ppo/algorithms.py.
    Without a critic (specs.critic False) there is no value loss.
    part: 'both' (the sum above); 'policy' (the policy terms alone: no value forward) or 'value'
    (vf_coef * value loss alone: only the separate value model's forward), for sequential_value_update.
    """
    if part not in ("both", "policy", "value"):
        raise ValueError(f"ppo_loss: part={part!r}; one of 'both', 'policy', 'value'")
    if part != "both" and (specs.value_head_on_policy or not specs.critic):
        raise ValueError(f"ppo_loss: part={part!r} needs a separate value model (value.init='reward' and a critic)")
    maskf = batch["response_mask"].astype(jnp.float32)
    sequences = tuple(batch[k] for k in ("query_ids", "query_mask", "response_ids", "response_mask"))
    if part == "value":
        values = response_values(specs, params, *sequences, dropout_rng=rng)
        vf_loss, vf_m = L.value_loss(values, batch["values"], batch["returns"], maskf, clip_eps=vf_clip_eps)
        return vf_coef * vf_loss, {"val/vf_loss": vf_loss, "val/clipfrac": vf_m["vf_clipfrac"]}
    if part == "policy":  # the same forward without the value model's
        specs = specs.replace(critic=False)
    logprobs, token_entropy, values = response_logprobs_and_values(
        specs, params, *sequences, dropout_rng=rng, temperature=temperature
    )
    if variant is not None:
        loss, metrics = algos.policy_gradient_loss(logprobs, batch, maskf, variant=variant, kl_in_loss=kl_in_loss)
        metrics["policy/entropy"] = L.masked_mean(token_entropy, maskf)
        if specs.critic:
            vf_loss, vf_m = L.value_loss(values, batch["values"], batch["returns"], maskf, clip_eps=vf_clip_eps)
            loss = loss + vf_coef * vf_loss
            metrics.update({"val/vf_loss": vf_loss, "val/clipfrac": vf_m["vf_clipfrac"]})
        return loss, metrics
    pg_loss, pg_m = L.policy_loss(logprobs, batch["logprobs"], batch["advantages"], maskf, clip_eps=clip_eps)
    entropy = L.masked_mean(token_entropy, maskf)
    metrics = {
        "policy/pg_loss": pg_loss,
        "policy/approxkl": pg_m["approxkl"],
        "policy/clipfrac": pg_m["clipfrac"],
        "policy/entropy": entropy,
        "policy/ratio": pg_m["ratio_mean"],
    }
    if part == "policy":
        return pg_loss, metrics
    vf_loss, vf_m = L.value_loss(values, batch["values"], batch["returns"], maskf, clip_eps=vf_clip_eps)
    loss = pg_loss + vf_coef * vf_loss
    return loss, dict(metrics, **{"val/vf_loss": vf_loss, "val/clipfrac": vf_m["vf_clipfrac"]})


def separate_optimizers(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """One independent copy of `tx` per top-level key of the params ({'policy', 'value'}).

    init(params) -> {key: tx.init(params[key])}. update(grads, state, params) updates the keys
    present in `grads` only (the others keep their state), so each model can be stepped on its
    own; clipping by global norm then measures each model's gradients alone."""

    def init(params):
        return {key: tx.init(value) for key, value in params.items()}

    def update(grads, state, params=None):
        updates, new_state = {}, dict(state)
        for key in grads:
            updates[key], new_state[key] = tx.update(grads[key], state[key], None if params is None else params[key])
        return updates, new_state

    return optax.GradientTransformation(init, update)


def _in_own_computation(fn, *args, opaque_true):
    """fn(*args), traced as the taken branch of a conditional XLA cannot fold (`opaque_true` is
    True at run time but not provably so), so its ops live in their own HLO computation.

    Why: JAX's lax.scan starts every stacked output (a layer scan's saved carries, the backward
    scan's stacked weight gradients) from a zero broadcast, and XLA merges identical broadcasts
    of one computation. With the policy and value model of the same shape in one computation,
    one zero buffer then feeds both models' loops and lives from the first model's forward to
    the second model's: a whole stack of carries and gradients of zeros held through the first
    model's backward pass (benchmarks/memory_peak.py). Branches are not merged across."""
    out = jax.eval_shape(fn, *args)
    return jax.lax.cond(opaque_true, fn, lambda *_: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), out), *args)


def _apply(tx, grads, opt_state, params):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def ppo_update(
    state,
    rollout: dict,
    frozen=None,
    *,
    tx,
    loss_fn,
    ppo_epochs,
    num_minibatches,
    accum_steps,
    group_size=1,
    sequential_value_update=False,
):
    """All PPO epochs over shuffled minibatches of one rollout batch, as one pure function.

    group_size K > 1: rows [g*K, (g+1)*K) are one prompt's group and are shuffled as a unit
    (ppo/algorithms.py minibatch_order); K = 1 shuffles rows as always.

    rollout: dict of UPDATE_KEYS arrays with leading dim B. frozen: the non-trainable part of
    the params (LoRA bases; None or {} without LoRA), joined with state['params'] inside the
    loss so gradients are taken w.r.t. the trainable part only. Returns (state, mean metrics).

    sequential_value_update: per minibatch, the policy's gradients of loss_fn(part='policy') are
    computed and applied, then the value model's of loss_fn(part='value') (see the module
    docstring); `tx` must be `separate_optimizers(...)` (state['opt_state'] keyed by model) and
    the params {'policy', 'value'}. Metrics then add 'val/grad_norm' and 'policy/grad_norm' is the
    policy's alone.
    """
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    frozen = frozen or {}
    if sequential_value_update and set(state["params"]) != {"policy", "value"}:
        raise ValueError(
            "ppo_update: sequential_value_update (config train.sequential_value_update) needs a separate value "
            f"model (value.init='reward' and a critic: params {{'policy', 'value'}}); got params "
            f"{sorted(state['params'])} (a value head on the policy shares its backbone: use the joint update)"
        )
    if sequential_value_update and not (
        isinstance(state["opt_state"], dict) and set(state["opt_state"]) == {"policy", "value"}
    ):
        raise ValueError(
            "ppo_update: sequential_value_update needs one optimizer state per model; build the state with "
            "tx = ppo.update.separate_optimizers(tx)"
        )

    def trainable_loss(params, batch, micro_rng, **kwargs):
        return loss_fn(combine_params(params, frozen), batch, micro_rng, **kwargs)

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
        if sequential_value_update:
            return sequential_minibatch(params, opt_state, i, batch)
        _, aux, grads = accumulate_gradients(
            trainable_loss, params, batch, jax.random.fold_in(rng, i), accum_steps=accum_steps
        )
        params, opt_state = _apply(tx, grads, opt_state, params)
        aux = dict(aux, **{"policy/grad_norm": optax.tree.norm(grads)})
        return (params, opt_state, i + 1), aux

    def sequential_minibatch(params, opt_state, i, batch):
        """The policy's gradients computed and applied, then the value model's (never both live)."""
        minibatch_rng = jax.random.fold_in(rng, i)
        aux = {}
        for key, prefix in (("policy", "policy"), ("value", "val")):

            def part_loss(own, batch, micro_rng, key=key):  # loss_fn(part=key) reads params[key] alone
                return trainable_loss({key: own}, batch, micro_rng, part=key)

            _, part_aux, grads = _in_own_computation(
                lambda p, b, r, part_loss=part_loss: accumulate_gradients(part_loss, p, b, r, accum_steps=accum_steps),
                params[key],
                batch,
                minibatch_rng,
                opaque_true=state["step"] >= 0,
            )
            new, opt_state = _apply(tx, {key: grads}, opt_state, {key: params[key]})
            params = dict(params, **new)
            aux.update(part_aux, **{f"{prefix}/grad_norm": optax.tree.norm(grads)})
        return (params, opt_state, i + 1), aux

    (params, opt_state, _), aux = jax.lax.scan(one_minibatch, (state["params"], state["opt_state"], 0), order)
    metrics = jax.tree.map(jnp.mean, aux)
    return dict(state, params=params, opt_state=opt_state, step=state["step"] + 1), metrics
