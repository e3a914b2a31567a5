"""LoRA adapters (Hu et al. 2021) as param-tree transforms: add, strip, merge, split trainable/frozen.

A projection named in `config.lora_targets` (module names: q_proj, v_proj, ...) becomes a
`LoRADense` (models/projections.py) when `config.lora_rank > 0`. Its parameters are those of `nn.Dense` plus two
small matrices next to them:

  layers_0/attn/q_proj/kernel  [in, out]   frozen base weight (or qvalue/scale, models/quant.py)
  layers_0/attn/q_proj/bias    [out]       frozen, when the projection has one
  layers_0/attn/q_proj/lora_a  [in, r]     trainable, init U(-1/sqrt(in), 1/sqrt(in))
  layers_0/attn/q_proj/lora_b  [r, out]    trainable, init 0

  y = x @ W + b + (alpha / r) * (dropout(x) @ A) @ B

The low-rank path is computed as two thin matmuls; W + AB is never formed. B starts at zero,
so a freshly adapted model computes exactly what the base model computes.

Typical use (the trainers go through models/adapters.py: add_lora_and_quant, split_trainable):

  config = base_config.replace(lora_rank=8, lora_alpha=16.0, lora_targets=("q_proj", "v_proj"))
  params = add_lora_params(base_params, config, rng)            # e.g. base from load_hf_checkpoint
  trainable, frozen = partition_params(params, lora_trainable)  # optimizer state for `trainable` only
  ...
  ref_logits = Transformer(config.replace(lora_rank=0)).apply({'params': strip_lora(params)}, ...)
  merged, export_config = merge_lora(params, config)              # -> models.hf.save_hf_checkpoint

Reference policy = "the policy with adapters switched off": `Transformer(config.replace(
lora_rank=0))` builds plain `nn.Dense` projections that read only `kernel`/`bias`, so applying
it to the LoRA tree gives the base model exactly. Flax Linen ignores parameters that no module
asks for, so passing the LoRA tree unchanged works too (tests check both); `strip_lora` makes
the intent explicit and avoids handing the adapters to the reference forward at all.

Dropout on the LoRA input path (`lora_dropout > 0`) needs no new call argument: it is active
only when the caller passes a 'dropout' rng (`apply(..., rngs={'dropout': key})`) and is the
identity otherwise (inference, rollouts, the reference forward, `init`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from models.projections import lora_a_init
from models.quant import dequantize_params
from models.transformer import TransformerConfig

__all__ = [
    "LORA_LEAVES",
    "HEAD_NAMES",
    "lora_trainable",
    "add_lora_params",
    "strip_lora",
    "merge_lora",
    "partition_params",
    "combine_params",
]

LORA_LEAVES = ("lora_a", "lora_b")
HEAD_NAMES = ("head", "value_head")  # reward/value heads (rm/model.py, ppo/train.py)

# ----------------------------------------------------------------------------- param transforms


def _parts(path: str) -> list[str]:
    return [p for p in str(path).split("/") if p]


def lora_trainable(path: str) -> bool:
    """The predicate of what trains in a LoRA'd model ('/'-joined param path -> bool).

    Used by `models.adapters.split_trainable` (and accepted by `common.optim.make_optimizer(trainable=...)`).

    True for LoRA leaves ('.../lora_a', '.../lora_b') and for scalar reward/value heads: any
    path component named 'head' or 'value_head' (so 'head/kernel', 'value/head/bias' and
    'value_head/kernel' train). Everything else -- base kernels, int8 qvalue/scale, norms,
    embeddings, lm_head -- is frozen and gets no Adam moments.
    """
    parts = _parts(path)
    return any(p in LORA_LEAVES or p in HEAD_NAMES for p in parts)


def _is_layer_path(prefix: tuple) -> bool:
    return any(str(p).startswith("layers_") for p in prefix)


def _walk_modules(tree: Any, prefix: tuple = ()):
    """Yields (path tuple, dict) for every dict in `tree` (depth first, sorted keys)."""
    if isinstance(tree, dict):
        yield prefix, tree
        for key in sorted(tree):
            yield from _walk_modules(tree[key], prefix + (key,))


def _rebuild(tree: Any, fn: Callable[[tuple, dict], dict], prefix: tuple = ()) -> Any:
    """Copy of a nested-dict tree where every dict d at path p is replaced by fn(p, d) (bottom up)."""
    if not isinstance(tree, dict):
        return tree
    children = {k: _rebuild(v, fn, prefix + (k,)) for k, v in tree.items()}
    return fn(prefix, children)


def add_lora_params(params: dict, config: TransformerConfig, rng: jax.Array) -> dict:
    """Base-model params (e.g. from `load_hf_checkpoint`) + fresh adapters for `config`'s targets.

    Every module dict under a 'layers_*' component whose name is in `config.lora_targets` and
    that holds a 'kernel' (float) or 'qvalue' (int8 base) gets 'lora_a' [in, r] ~ lora_a_init
    and 'lora_b' [r, out] = 0, in `config.param_dtype`. Works on a bare Transformer tree or one
    nested inside another ({'backbone': ...}). The result has the structure
    `Transformer(config).init(...)` produces.
    """
    rank = int(config.lora_rank)
    if rank <= 0:
        raise ValueError(f"add_lora_params: config.lora_rank must be > 0, got {rank}")
    pdtype = jnp.dtype(config.param_dtype)
    targets = set(config.lora_targets)
    sites = [
        p
        for p, d in _walk_modules(params)
        if p and p[-1] in targets and _is_layer_path(p[:-1]) and ("kernel" in d or "qvalue" in d)
    ]
    if not sites:
        raise ValueError(
            f"add_lora_params: no projection named {sorted(targets)} under a 'layers_*' "
            "module holds a 'kernel' or 'qvalue'; is this a Transformer param tree?"
        )
    keys = dict(zip(sites, jax.random.split(rng, len(sites))))

    def add(prefix, d):
        if prefix not in keys:
            return d
        present = [k for k in LORA_LEAVES if k in d]
        if present:
            raise ValueError(f"add_lora_params: {'/'.join(prefix)} already has {present}; strip_lora first")
        w = d["kernel"] if "kernel" in d else d["qvalue"]  # [..., in, out] ([G, in, out] when stacked)
        lead, n_in, n_out = tuple(w.shape[:-2]), w.shape[-2], w.shape[-1]
        return dict(
            d,
            lora_a=lora_a_init(keys[prefix], lead + (n_in, rank), pdtype),
            lora_b=jnp.zeros(lead + (rank, n_out), pdtype),
        )

    return _rebuild(params, add)


def strip_lora(params: Any) -> Any:
    """Copy of `params` without any 'lora_a'/'lora_b' leaves (the base model's tree)."""
    return _rebuild(params, lambda _, d: {k: v for k, v in d.items() if k not in LORA_LEAVES})


def partition_params(params: dict, trainable: Callable[[str], bool] = lora_trainable) -> tuple[dict, dict]:
    """Splits a nested-dict tree into (trainable leaves, frozen leaves) by '/'-joined path.

    Differentiate only the first part: `jax.grad(lambda t: loss(combine_params(t, frozen)))(t)`.
    Needed with an int8 base, because jax.grad refuses integer leaves (qvalue); with a float
    base it also keeps the frozen kernels' gradients from being computed and stored at all.
    Empty dicts are dropped from each part.
    """

    def split(tree, prefix):
        train, frozen = {}, {}
        for key, value in tree.items():
            path = prefix + (str(key),)
            if isinstance(value, dict):
                t, f = split(value, path)
                if t:
                    train[key] = t
                if f:
                    frozen[key] = f
            elif trainable("/".join(path)):
                train[key] = value
            else:
                frozen[key] = value
        return train, frozen

    return split(params, ())


def combine_params(first: dict, second: dict) -> dict:
    """Union of two nested-dict trees with disjoint leaves (inverse of `partition_params`)."""
    out = dict(first)
    for key, value in second.items():
        if key not in out:
            out[key] = value
        elif isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = combine_params(out[key], value)
        else:
            raise ValueError(f"combine_params: leaf {key!r} is in both trees")
    return out


def merge_lora(params: dict, config: TransformerConfig) -> tuple[dict, TransformerConfig]:
    """Folds adapters into the base weights: (plain params, config with lora_rank=0) for export.

    W' = W + (alpha / r) A @ B, computed in float32 and cast back to W's dtype. An int8 base
    (config.quant == 'int8') is dequantised first (models.quant.dequantize_params), so the
    result is a float model (quant='') that `models.hf.save_hf_checkpoint` can write.
    """
    has_lora = any(k in d for _, d in _walk_modules(params) for k in LORA_LEAVES)
    if not has_lora:
        return params, config.replace(lora_rank=0)
    if config.lora_rank <= 0:
        raise ValueError(
            "merge_lora: params hold lora_a/lora_b leaves but config.lora_rank is 0; pass "
            "the config the adapters were trained with (its lora_alpha / lora_rank scale them)"
        )
    if config.quant:
        params, config = dequantize_params(params, config)
    scale = float(config.lora_alpha) / float(config.lora_rank)

    def merge(prefix, d):
        if not any(k in d for k in LORA_LEAVES):
            return d
        where = "/".join(prefix)
        if not all(k in d for k in LORA_LEAVES) or "kernel" not in d:
            raise ValueError(f"merge_lora: {where} needs 'kernel', 'lora_a' and 'lora_b'; has {sorted(d)}")
        a, b, w = (jnp.asarray(d[k], jnp.float32) for k in ("lora_a", "lora_b", "kernel"))
        if a.shape[-1] != config.lora_rank:
            raise ValueError(
                f"merge_lora: {where}/lora_a has rank {a.shape[-1]}, config.lora_rank is {config.lora_rank}"
            )
        delta = jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)  # [..., in, out]; full f32 on TPU/GPU too
        merged = (w + scale * delta).astype(d["kernel"].dtype)
        out = {k: v for k, v in d.items() if k not in LORA_LEAVES}
        out["kernel"] = merged
        return out

    return _rebuild(params, merge), config.replace(lora_rank=0)
