"""Optimizers, learning-rate schedules and gradient accumulation.

schedule = make_schedule(learning_rate=1e-5, total_steps=1000, warmup_steps=50)
tx, schedule = make_optimizer(learning_rate=1e-5, total_steps=1000,
                              warmup_steps=50, weight_decay=0.01,
                              trainable=lambda path: 'lora' in path)
loss, aux, grads = accumulate_gradients(loss_fn, params, batch, rng, accum_steps=4)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from models.sharding import param_path

__all__ = ["make_schedule", "make_optimizer", "optimizer_from_config", "accumulate_gradients"]

_TRAIN, _FREEZE = "trainable", "frozen"


def make_schedule(
    *, learning_rate: float, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0
) -> optax.Schedule:
    """Linear warmup from 0 to `learning_rate`, then cosine decay to the floor.

    lr(t) = learning_rate * t / warmup_steps                      for t < warmup
    lr(t) = floor + (learning_rate - floor) * (1 + cos(pi * p)) / 2 otherwise,
            p = min(1, (t - warmup_steps) / (total_steps - warmup_steps)),
            floor = min_lr_ratio * learning_rate.

    `t` counts optimizer updates from 0. With warmup_steps=0 the first update
    already uses the full learning rate.
    """
    total_steps, warmup_steps = int(total_steps), int(warmup_steps)
    if warmup_steps < 0:
        raise ValueError(f"make_schedule: warmup_steps must be >= 0, got {warmup_steps}.")
    if total_steps <= warmup_steps:
        raise ValueError(
            f"make_schedule: total_steps ({total_steps}) must be larger than warmup_steps ({warmup_steps})."
        )
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"make_schedule: min_lr_ratio must be in [0, 1], got {min_lr_ratio}.")
    # optax counts decay_steps from step 0, warmup included.
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,
        end_value=min_lr_ratio * learning_rate,
    )


def _decay_mask(params: Any) -> Any:
    """Weight decay on matrices only: 1-D leaves (biases, norm scales) are skipped."""
    return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def _trainable_labels(trainable: Any) -> Callable[[Any], Any]:
    """Builds optax.multi_transform's labeller from a bool pytree or a path predicate."""

    def labels(params):
        if callable(trainable):
            return jax.tree_util.tree_map_with_path(
                lambda path, _: _TRAIN if trainable(param_path(path)) else _FREEZE, params
            )
        params_structure = jax.tree.structure(params)
        mask_structure = jax.tree.structure(trainable)
        if params_structure != mask_structure:
            raise ValueError(
                "make_optimizer: `trainable` must be a pytree of bools with the same "
                f"structure as the params.\n  params:    {params_structure}\n"
                f"  trainable: {mask_structure}"
            )
        return jax.tree.map(lambda flag: _TRAIN if bool(flag) else _FREEZE, trainable)

    return labels


def make_optimizer(
    *,
    learning_rate: float,
    total_steps: int,
    warmup_steps: int,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    max_grad_norm: float = 1.0,
    min_lr_ratio: float = 0.0,
    trainable: Any = None,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with warmup+cosine schedule, global-norm clipping and a trainable mask.

    Args:
      learning_rate, total_steps, warmup_steps, min_lr_ratio: see `make_schedule`.
      weight_decay: decoupled (AdamW) decay, applied to leaves with ndim > 1 only.
      b1, b2, eps: Adam hyperparameters.
      max_grad_norm: clip the global gradient norm (of trainable leaves only) to
        this value; <= 0 disables clipping.
      trainable: None (train everything), a pytree of bools with the params'
        structure, or a callable `path -> bool` taking the '/'-joined parameter
        path (see `param_path`). Frozen leaves get zero updates and carry no
        Adam moments (their slots in the optimizer state are empty
        `optax.MaskedNode`s). For code that keeps one tree; the trainers instead
        split their params (models.adapters.split_trainable) and optimize the
        trainable half alone, so they pass None.

    Returns:
      (tx, schedule): the optax transformation and the schedule, to log the
      learning rate as `schedule(step)`.
    """
    schedule = make_schedule(
        learning_rate=learning_rate, total_steps=total_steps, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio
    )
    parts = []
    if max_grad_norm and max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(max_grad_norm))
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=_decay_mask))
    tx = optax.chain(*parts)
    if trainable is None:
        return tx, schedule
    # Clipping sits inside the trainable branch so the global norm is measured
    # over the trainable gradients only: frozen gradients never move anything.
    tx = optax.multi_transform({_TRAIN: tx, _FREEZE: optax.set_to_zero()}, _trainable_labels(trainable))
    return tx, schedule


def optimizer_from_config(train_config: Any, *, total_steps: int):
    """`make_optimizer` from a trainer's `train` ConfigDict (learning_rate, warmup_steps,
    weight_decay, max_grad_norm, min_lr_ratio, adam_eps; adam_b1/adam_b2 where the config has
    them). Warmup is capped at total_steps - 1 so a short run still reaches its peak rate.

    No trainable mask: the trainers hand the optimizer the trainable half of their params only
    (models.adapters.split_trainable), so every leaf it sees trains."""
    tc = train_config
    return make_optimizer(
        learning_rate=tc.learning_rate,
        total_steps=total_steps,
        warmup_steps=min(tc.warmup_steps, max(total_steps - 1, 0)),
        weight_decay=tc.weight_decay,
        max_grad_norm=tc.max_grad_norm,
        min_lr_ratio=tc.min_lr_ratio,
        b1=tc.get("adam_b1", 0.9),
        b2=tc.get("adam_b2", 0.999),
        eps=tc.adam_eps,
    )


def _split_microbatches(batch: Any, accum_steps: int) -> Any:
    """[B, ...] -> [accum_steps, B // accum_steps, ...] for every batch leaf."""

    def split(path, leaf):
        name = param_path(path) or "<batch>"
        if jnp.ndim(leaf) == 0:
            raise ValueError(
                f"accumulate_gradients: batch leaf {name!r} is a scalar; every leaf needs a leading batch dimension."
            )
        size = leaf.shape[0]
        if size % accum_steps:
            raise ValueError(
                f"accumulate_gradients: batch leaf {name!r} has batch size {size}, which is "
                f"not divisible by accum_steps={accum_steps}."
            )
        return jnp.reshape(leaf, (accum_steps, size // accum_steps) + leaf.shape[1:])

    return jax.tree_util.tree_map_with_path(split, batch)


def accumulate_gradients(
    loss_fn: Callable[[Any, Any, jax.Array], tuple[jax.Array, Mapping[str, jax.Array]]],
    params: Any,
    batch: Any,
    rng: jax.Array | None,
    *,
    accum_steps: int,
) -> tuple[jax.Array, dict[str, jax.Array], Any]:
    """Mean loss, aux and gradients over `accum_steps` sequential micro-batches.

    Micro-batch i is rows [i*m, (i+1)*m) of every batch leaf (m = B / accum_steps)
    and sees the key `fold_in(rng, i)` (also when accum_steps == 1). Loss, aux
    and gradients are averaged over micro-batches, so for a loss that is a mean
    over examples the result equals the full-batch value (a per-token mean with
    uneven token counts per micro-batch is only approximately equal). Peak memory
    is that of one micro-batch: they run one after another under `lax.scan`.

    Args:
      loss_fn: `(params, microbatch, rng) -> (scalar_loss, aux)`, aux a dict of
        scalars.
      params: differentiated pytree.
      batch: pytree whose leaves all have leading batch dimension B.
      rng: PRNG key (typed or raw) or None.
      accum_steps: number of micro-batches; must divide B.

    Returns:
      (loss, aux, grads), with grads in the params' dtypes.
    """
    accum_steps = int(accum_steps)
    if accum_steps < 1:
        raise ValueError(f"accumulate_gradients: accum_steps must be >= 1, got {accum_steps}.")
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def micro_rng(i):
        return None if rng is None else jax.random.fold_in(rng, i)

    if accum_steps == 1:
        _split_microbatches(batch, 1)  # Same input checks as the scanned path.
        (loss, aux), grads = grad_fn(params, batch, micro_rng(0))
        return loss, aux, grads

    microbatches = _split_microbatches(batch, accum_steps)

    # Sums are kept in float32 even for bf16 params so many small micro-batch
    # gradients do not lose precision when added up.
    def f32_zeros(x):
        return jnp.zeros(jnp.shape(x), jnp.promote_types(x.dtype, jnp.float32))

    first = jax.tree.map(lambda x: x[0], microbatches)
    loss_shape, aux_shape = jax.eval_shape(loss_fn, params, first, micro_rng(0))
    init = (f32_zeros(loss_shape), jax.tree.map(f32_zeros, aux_shape), jax.tree.map(f32_zeros, params))

    def body(carry, inputs):
        index, microbatch = inputs
        (loss, aux), grads = grad_fn(params, microbatch, micro_rng(index))
        carry = jax.tree.map(lambda total, x: total + x, carry, (loss, aux, grads))
        return carry, None

    (loss_sum, aux_sum, grad_sum), _ = jax.lax.scan(body, init, (jnp.arange(accum_steps), microbatches))

    def mean(total, like):
        # Float results go back to their own dtype; integer aux (counts) stay float.
        total = total / accum_steps
        return total.astype(like.dtype) if jnp.issubdtype(like.dtype, jnp.floating) else total

    loss = mean(loss_sum, loss_shape)
    aux = jax.tree.map(mean, aux_sum, aux_shape)
    grads = jax.tree.map(mean, grad_sum, params)
    return loss, aux, grads
