"""scan_layers: the transformer's layers held stacked [G, ...] per period position and run by one scan.

With `TransformerConfig.scan_layers`, layers 0 .. G*P-1 (P = `config.layer_period()`, G =
n_layers // P) live in the param tree as

  layers_stacked/p{j}/<block tree>   every leaf with a leading [G] axis: layers j, j+P, j+2P, ...

and the remaining n_layers mod P layers stay `layers_{i}` (unrolled). The forward runs one
`nn.scan` over the G groups (each group = P blocks, position j keeping layer j's window and RoPE
kind), reading the stacked leaves in place: no per-forward stacking copy of the weights, and the
gradients come out stacked too. The layout is a property of the run, not of the checkpoint:
`stack_layers` / `unstack_layers` / `match_layout` convert any tree holding a Transformer param
tree (bare, or nested as {'backbone': ...}), and the Hugging Face export unstacks (models/hf.py).

KV-cache decoding scans too: the cache of the stacked layers is {'stacked': [P x {'k','v'} of
[G, B, Hkv, S, D]], 'layers': [remainder layers' {'k','v'}]}; each scan step reads layer g's slice
and writes it back in place (no copy of the weights or of the whole cache per token).
"""

from __future__ import annotations

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models.sharding import constrain_layer_params, layer_sharding_active

STACKED = "layers_stacked"  # param-tree key of the stacked layer groups
_LAYER_KEY = re.compile(r"^layers_(\d+)$")


def layer_groups(config) -> tuple[int, int]:
    """(P, G): the period and the number of whole groups the scan covers (G may be 0)."""
    period = config.layer_period()
    return period, config.n_layers // period


def _write_slots(stack, layer_cache, g, cache_index, t):
    """stack [G, B, Hkv, S, D] with slots [cache_index, cache_index + t) of layer g taken from
    layer_cache [B, Hkv, S, D] (the block's updated cache): an in-place update of t slots."""
    index = jnp.asarray(cache_index, jnp.int32)
    new = jax.lax.dynamic_slice_in_dim(layer_cache, index, t, axis=2)[None].astype(stack.dtype)
    zero = jnp.zeros((), jnp.int32)
    return jax.lax.dynamic_update_slice(stack, new, (jnp.asarray(g, jnp.int32), zero, zero, index, zero))


class _LayerGroup(nn.Module):
    """Body of the scan: P consecutive blocks (p0 .. p{P-1}), one group of the period."""

    config: Any
    block_cls: Any
    period: int

    @nn.compact
    def __call__(self, carry, positions, attention_mask, q_slots, cache_index, segment_ids):
        x, caches, g = carry  # caches: None, or P dicts of stacked [G, B, Hkv, S, D] (the scan carry)
        new_caches = []
        for j in range(self.period):
            layer_cache = None
            if caches is not None:  # layer g of the stack; written back in place below
                layer_cache = jax.tree.map(lambda c: jax.lax.dynamic_index_in_dim(c, g, 0, keepdims=False), caches[j])
            x, layer_cache = self.block_cls(self.config, layer=j, name=f"p{j}")(
                x, positions, attention_mask, q_slots, layer_cache, cache_index, segment_ids
            )
            if caches is not None:  # write back only the T slots this step filled: [1, B, Hkv, T, D]
                new_caches.append(
                    jax.tree.map(lambda s, c: _write_slots(s, c, g, cache_index, x.shape[1]), caches[j], layer_cache)
                )
        return (x, new_caches if caches is not None else None, g + 1), None


# ----------------------------------------------------------------------------- bf16 through the scan as bits
# XLA:CPU supports bfloat16 in almost no op (FloatNormalization upcasts every bf16 op but
# tuples/while/convert), the scan's per-layer dynamic-slice of a stacked bf16 leaf included: it becomes
# dynamic-slice(convert(stack)) and the convert, loop-invariant, is hoisted out of the layer loop, a
# whole-stack float32 copy of every weight (and of the saved bf16 carries in the backward loop). The
# same bits as float16, which XLA:CPU moves natively, are sliced instead: bitcasts both ways, with
# custom VJPs that bitcast the cotangents back (no float16 arithmetic ever happens on them: the f16
# values only go through data movement, and each is consumed once). Values and gradients are
# bit-identical; GPU/TPU lose nothing (bitcasts are free).


@jax.custom_vjp
def _bf16_as_f16(x):
    return jax.lax.bitcast_convert_type(x, jnp.float16)


@jax.custom_vjp
def _f16_as_bf16(x):
    return jax.lax.bitcast_convert_type(x, jnp.bfloat16)


_bf16_as_f16.defvjp(lambda x: (_bf16_as_f16(x), None), lambda _, ct: (_f16_as_bf16(ct),))
_f16_as_bf16.defvjp(lambda x: (_f16_as_bf16(x), None), lambda _, ct: (_bf16_as_f16(ct),))


def _to_bits(tree):
    return jax.tree.map(lambda a: _bf16_as_f16(a) if a.dtype == jnp.bfloat16 else a, tree)


def _from_bits(tree):
    return jax.tree.map(lambda a: _f16_as_bf16(a) if a.dtype == jnp.float16 else a, tree)


def _uses_bits(config) -> bool:
    """bf16 params or compute, and no float16 anywhere (f16 leaves would be read back as bf16)."""
    dtypes = {jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)}
    return jnp.dtype(jnp.bfloat16) in dtypes and jnp.dtype(jnp.float16) not in dtypes


def _carry_bits(block_cls):
    """block_cls taking and returning the residual stream as float16 bits (converted inside the
    block, so under remat the saved carry is the bits)."""

    class CarryBits(block_cls):
        def __call__(self, x, *args):
            y, cache = super().__call__(_f16_as_bf16(x), *args)
            return _bf16_as_f16(y), cache

    return CarryBits


def scan_layer_groups(
    config,
    block_cls,
    x,
    positions,
    attention_mask,
    q_slots,
    cache,
    cache_index,
    segment_ids=None,
    *,
    wrap=lambda cls: cls,
    initializing=False,
):
    """Layers 0 .. G*P-1 through one nn.scan (call from the Transformer's compact __call__).

    block_cls: the layer module; wrap(cls): that class as the layers run it (remat). Training and
    scoring forwards of bf16 models pass bf16 leaves and the bf16 carry through the scan as float16
    bits (see above). Returns (x, stacked caches or None, the remainder layers' caches (list) or
    None, index of the first layer left for the unrolled loop)."""
    period, groups = layer_groups(config)
    if groups < 1:  # fewer layers than one period: the unrolled loop does it all
        return x, None, cache, 0
    stacked_cache, rest_cache = (None, None) if cache is None else (cache["stacked"], cache["layers"])
    # Only under remat: the bits -> bf16 bitcasts then run inside each block's checkpoint, so what
    # the backward pass reads is the float16 bits themselves (the scan's xs and carries), not a
    # saved bf16 copy of them.
    bits = cache is None and not initializing and config.remat and _uses_bits(config)
    carry_bits = bits and x.dtype == jnp.bfloat16
    layer_cls = _carry_bits(block_cls) if carry_bits else block_cls
    constrain = cache is None and not initializing and layer_sharding_active()
    if bits or constrain:  # each layer's slice of every leaf, inside the block: bits -> bf16, sharded
        layer_cls = nn.map_variables(
            layer_cls, "params", trans_in_fn=lambda p: constrain_layer_params(_from_bits(p) if bits else p)
        )
    scan = nn.scan(
        _LayerGroup,
        variable_axes={"params": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=(nn.broadcast,) * 5,  # positions, mask, q_slots, cache_index, segment_ids: every layer's
        length=groups,
    )
    if bits:  # the stacked leaves: bf16 -> float16 bits, outside the scan
        scan = nn.map_variables(scan, "params", trans_in_fn=_to_bits)
    scanned = scan(config, wrap(layer_cls), period, name=STACKED)
    x = _bf16_as_f16(x) if carry_bits else x
    (x, stacked_cache, _), _ = scanned(
        (x, stacked_cache, jnp.zeros((), jnp.int32)), positions, attention_mask, q_slots, cache_index, segment_ids
    )
    x = _f16_as_bf16(x) if carry_bits else x
    return x, stacked_cache, rest_cache, groups * period


def init_stacked_cache(config, layer_cache: list) -> Any:
    """Per-layer cache list (models/transformer.py init_cache) -> the scan layout, when it applies."""
    period, groups = layer_groups(config)
    if not config.scan_layers or groups < 1:
        return layer_cache
    stacked = [
        jax.tree.map(lambda *cs: jnp.stack(cs), *[layer_cache[g * period + j] for g in range(groups)])
        for j in range(period)
    ]
    return {"stacked": stacked, "layers": layer_cache[groups * period :]}


# ----------------------------------------------------------------------------- layout conversions


def _stack(leaves):
    if all(isinstance(x, np.ndarray) for x in leaves):  # NumPy (e.g. views on load) stays NumPy
        return np.stack(leaves)
    return jnp.stack(leaves)


def _is_transformer_tree(tree) -> bool:
    return isinstance(tree, dict) and (STACKED in tree or any(_LAYER_KEY.match(str(k)) for k in tree))


def _map_transformer_trees(fn, tree):
    """Copy of `tree` with fn applied to every Transformer param tree in it (bare or nested)."""
    if _is_transformer_tree(tree):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: _map_transformer_trees(fn, v) for k, v in tree.items()}
    return tree


def transformer_tree_paths(tree, prefix: tuple = ()) -> list[tuple]:
    """Key paths of the Transformer param trees in `tree` (() for a bare one), in the tree's order."""
    if _is_transformer_tree(tree):
        return [prefix]
    if isinstance(tree, dict):
        return [path for k, v in tree.items() for path in transformer_tree_paths(v, prefix + (k,))]
    return []


def is_stacked(params) -> bool:
    """Whether any Transformer tree in `params` holds stacked layers."""
    found = []
    _map_transformer_trees(lambda t: found.append(STACKED in t) or t, params)
    return any(found)


def _stack_one(tree, period, stack=_stack):
    if STACKED in tree:
        return tree
    n_layers = sum(1 for k in tree if _LAYER_KEY.match(str(k)))
    groups = n_layers // period
    if groups < 1:
        return tree
    out = {k: v for k, v in tree.items() if not _LAYER_KEY.match(str(k))}
    out[STACKED] = {
        f"p{j}": jax.tree.map(lambda *xs: stack(xs), *[tree[f"layers_{g * period + j}"] for g in range(groups)])
        for j in range(period)
    }
    for i in range(groups * period, n_layers):
        out[f"layers_{i}"] = tree[f"layers_{i}"]
    return out


def _unstack_one(tree):
    if STACKED not in tree:
        return tree
    stacked = tree[STACKED]
    period = len(stacked)
    if sorted(stacked) != [f"p{j}" for j in range(period)]:
        raise ValueError(f"{STACKED} must hold p0 .. p{period - 1}; has {sorted(stacked)}")
    groups = jax.tree.leaves(stacked["p0"])[0].shape[0]
    out = {k: v for k, v in tree.items() if k != STACKED}
    for g in range(groups):
        for j in range(period):
            out[f"layers_{g * period + j}"] = jax.tree.map(lambda x, g=g: x[g], stacked[f"p{j}"])
    return out


def stack_layers(params, config, *, stack=_stack):
    """Per-layer `layers_{i}` trees -> `layers_stacked/p{j}` [G, ...] (+ the remainder unrolled).

    Works on any tree holding Transformer param trees (LoRA and int8 leaves stack like any
    other); an already stacked tree is returned as is. NumPy leaves stay NumPy; `stack` (a
    function of the list of G leaves) lets the loader stack lazily (models/hf.py)."""
    period, _ = layer_groups(config)
    return _map_transformer_trees(lambda t: _stack_one(t, period, stack), params)


def unstack_layers(params):
    """Inverse of `stack_layers`: `layers_{g*P+j}` = layers_stacked/p{j}[g]; unstacked trees unchanged."""
    return _map_transformer_trees(_unstack_one, params)


def match_layout(params, config):
    """`params` in the layout `config` runs with: stacked when config.scan_layers, else per layer."""
    return stack_layers(params, config) if config.scan_layers else unstack_layers(params)
