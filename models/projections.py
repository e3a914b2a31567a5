"""The transformer's projection layers: plain, LoRA (low-rank adapter) and int8 weight-only.

A leaf module (imports nothing from models/): models/transformer.py builds its projections from
it, and the param transforms in models/lora.py and models/quant.py name the same projections.
The adapter maths is documented in models/lora.py, the int8 scheme in models/quant.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

# Module names `_dense` builds (models/transformer.py); valid entries of config.lora_targets.
# The same names for every family: fused HF projections are split on load (models/families.py).
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Hugging Face module names of fused or differently named projections, per family, and the
# projections of ours they stand for: lora_targets may use either spelling (PEFT's names work).
# Every family's adapters live on our split names, so LoRA on the fused `query_key_value` of
# GPT-NeoX is three adapters (q, k, v), each of the same rank.
FAMILY_TARGET_ALIASES = {
    "gpt2": {"c_attn": ("q_proj", "k_proj", "v_proj"), "c_proj": ("o_proj", "down_proj"), "c_fc": ("up_proj",)},
    "gpt_neox": {
        "query_key_value": ("q_proj", "k_proj", "v_proj"),
        "dense": ("o_proj",),
        "dense_h_to_4h": ("up_proj",),
        "dense_4h_to_h": ("down_proj",),
    },
    "phi3": {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")},
}


def expand_lora_targets(family: str, targets) -> tuple:
    """lora_targets with the family's HF aliases (FAMILY_TARGET_ALIASES) replaced by our names.

    Order is kept, duplicates dropped; names that are neither ours nor aliases stay (and are
    refused by TransformerConfig with the list of valid names).
    """
    aliases = FAMILY_TARGET_ALIASES.get(family, {})
    out: list = []
    for name in targets:
        for ours in aliases.get(name, (name,)):
            if ours not in out:
                out.append(ours)
    return tuple(out)


def lora_a_init(key: jax.Array, shape: tuple, dtype: Any = jnp.float32) -> jax.Array:
    """U(-1/sqrt(in), 1/sqrt(in)) for A [in, r].

    The default of torch's nn.Linear and of PEFT's LoRA A (kaiming_uniform with a=sqrt(5)),
    so adapters trained here start from the same distribution as PEFT's. Std = 1/sqrt(3 in):
    x @ A keeps roughly the per-feature scale of x divided by sqrt(3).
    """
    bound = 1.0 / math.sqrt(shape[-2])  # [..., in, r]: stacked layers lead with [G] (scan_layers)
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)


def lora_delta(
    module: nn.Module,
    x: jax.Array,
    features: int,
    *,
    rank: int,
    alpha: float,
    dropout: float,
    dtype: Any,
    param_dtype: Any,
) -> jax.Array:
    """(alpha / r) * (dropout(x) @ A) @ B, declaring 'lora_a' and 'lora_b' on `module`.

    Call from inside `module`'s compact `__call__` (LoRADense, QuantDense). x [..., in] ->
    [..., out] in `dtype`. Dropout runs only when `module` was given a 'dropout' rng.
    """
    in_features = x.shape[-1]
    a = module.param("lora_a", lora_a_init, (in_features, rank), param_dtype)  # [in, r]
    b = module.param("lora_b", nn.initializers.zeros, (rank, features), param_dtype)  # [r, out]
    h = x.astype(dtype)
    if dropout > 0.0 and module.has_rng("dropout"):
        keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - dropout, h.shape)
        h = jnp.where(keep, h / (1.0 - dropout), jnp.zeros_like(h))
    low = jnp.dot(h, a.astype(dtype))  # [..., r]: the thin intermediate
    return jnp.dot(low, b.astype(dtype)) * jnp.asarray(alpha / rank, dtype)  # [..., out]


def dense_base(x: jax.Array, kernel: jax.Array, bias: Any, dtype: Any) -> jax.Array:
    """x @ kernel + bias computed exactly as flax's nn.Dense does (same op, same order)."""
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
    if bias is not None:
        y = y + jnp.reshape(bias.astype(dtype), (1,) * (y.ndim - 1) + (-1,))
    return y


# Output columns per weight-gradient dot in `rows_matmul`'s backward (see there).
WEIGHT_GRAD_BLOCK = 256


def _weight_grad(x: jax.Array, g: jax.Array, block: int) -> jax.Array:
    """dW = x^T g for x [N, in], g [N, out] -> [in, out], in dots of at most `block` output columns.

    XLA:CPU's matmul runs a long-contraction x^T g with a wide g (out > in: the MLP's up and gate
    projections) at about 0.55-0.7x the speed of the forward dot (its packed right-hand panel of
    N x out floats outgrows the cache); there, column blocks of g keep each panel at N x block.
    Each block is g_j^T x [block, in] (the operand order XLA:CPU ran fastest), stacked and
    transposed once (a weight-sized copy). With out <= in the single dot is faster (measured in
    benchmarks/rm_step_profile.py's notes in the README).
    """
    contract_rows = (((0,), (0,)), ((), ()))
    out = g.shape[1]
    # Measured on XLA:CPU only; other backends' matmul libraries get the single dot.
    if out <= block or out <= x.shape[1] or jax.default_backend() != "cpu":
        return jax.lax.dot_general(x, g, contract_rows)
    parts = [jax.lax.dot_general(g[:, j : j + block], x, contract_rows) for j in range(0, out, block)]
    return jnp.concatenate(parts, axis=0).T  # [out, in] -> [in, out]


@jax.custom_vjp
def rows_matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """x [N, in] @ kernel [in, out] -> [N, out]: the same dot as nn.Dense, with a backward whose
    weight gradient is computed in column blocks (`_weight_grad`); the input gradient g W^T is
    the dot autodiff would emit."""
    return jax.lax.dot_general(x, kernel, (((1,), (0,)), ((), ())))


def _rows_matmul_fwd(x, kernel):
    return rows_matmul(x, kernel), (x, kernel)


def _rows_matmul_bwd(residuals, g):
    x, kernel = residuals
    dx = jax.lax.dot_general(g, kernel, (((1,), (1,)), ((), ())))  # [N, out] x [in, out] -> [N, in]
    return dx, _weight_grad(x, g, WEIGHT_GRAD_BLOCK).astype(kernel.dtype)


rows_matmul.defvjp(_rows_matmul_fwd, _rows_matmul_bwd)


class RowsDense(nn.Module):
    """nn.Dense ('kernel' [in, out], optional 'bias'; same params, same forward numbers) for rows
    [N, in], whose backward computes the weight gradient through `rows_matmul`. Other ranks fall
    back to the plain dot."""

    features: int
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [N, in] -> [N, out]
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype) if self.use_bias else None
        if x.ndim != 2:
            return dense_base(x, kernel, bias, self.dtype)
        y = rows_matmul(x.astype(self.dtype), kernel.astype(self.dtype))
        if bias is not None:
            y = y + jnp.reshape(bias.astype(self.dtype), (1, -1))
        return y


class LoRADense(nn.Module):
    """nn.Dense ('kernel' [in, out], optional 'bias') plus a low-rank adapter ('lora_a', 'lora_b')."""

    features: int
    rank: int
    alpha: float = 16.0
    dropout: float = 0.0
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [..., in] -> [..., out]
        if self.rank <= 0:
            raise ValueError(f"LoRADense {self.name}: rank must be > 0, got {self.rank}")
        kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype) if self.use_bias else None
        y = dense_base(x, kernel, bias, self.dtype)
        return y + lora_delta(
            self,
            x,
            self.features,
            rank=self.rank,
            alpha=self.alpha,
            dropout=self.dropout,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )


# ----------------------------------------------------------------------------- int8


QMAX = 127  # symmetric int8 range [-127, 127]; -128 unused so that q and -q are both representable


def quantize_kernel(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """W [..., in, out] float -> (qvalue int8 [..., in, out], scale float32 [..., out]).

    scale = max over the input dim of |W| / 127: one scale per output channel, so a channel
    with small weights keeps its resolution whatever its neighbours hold. An all-zero
    channel gets scale 0 and qvalue 0 (the division is guarded), which dequantises exactly.
    """
    w32 = jnp.asarray(w, jnp.float32)
    scale = jnp.max(jnp.abs(w32), axis=-2) / QMAX  # [..., out]
    safe = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(w32 / safe[..., None, :]), -QMAX, QMAX).astype(jnp.int8)
    return q, scale


def dequantize(qvalue: jax.Array, scale: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
    """qvalue [..., in, out] int8, scale [..., out] -> W [..., in, out] in `dtype` (f32 maths)."""
    w = qvalue.astype(jnp.float32) * jnp.asarray(scale, jnp.float32)[..., None, :]
    return w.astype(dtype)


class QuantDense(nn.Module):
    """Dense layer reading an int8 weight ('qvalue', 'scale', optional 'bias'), optional LoRA.

    y = (x @ qvalue) * scale + b  [+ (alpha/r) (x @ A) @ B when lora_rank > 0]

    The scale multiplies the [..., out] output rather than the [in, out] weight: the same
    number, fewer multiplies, and int8 -> bf16/f32 is exact, so the matmul sees the integer
    weights unrounded. `init` draws a float kernel with `kernel_init` and quantises it, so
    a fresh int8 model (tests, `eval_shape`, sharded init) needs no float copy first.
    """

    features: int
    use_bias: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32  # of bias and adapters; qvalue is int8, scale float32
    kernel_init: Callable = nn.initializers.normal(0.02)
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:  # [..., in] -> [..., out]
        shape = (x.shape[-1], self.features)
        # qvalue and scale must come from one float kernel: both initialisers draw it from the
        # same key. (Flax also runs initialisers under eval_shape in `apply` to check shapes;
        # then no 'params' rng exists and the key flax passes in is used.)
        key = self.make_rng("params") if self.is_initializing() else None

        def draw(rng):
            return quantize_kernel(self.kernel_init(rng if key is None else key, shape, jnp.float32))

        qvalue = self.param("qvalue", lambda rng: draw(rng)[0])  # [in, out] int8
        scale = self.param("scale", lambda rng: draw(rng)[1])  # [out] f32
        if qvalue.dtype != jnp.int8 or tuple(qvalue.shape) != shape or tuple(scale.shape) != shape[1:]:
            raise ValueError(
                f"QuantDense {self.name}: expected qvalue int8 {shape} and scale {shape[1:]}, got "
                f"{qvalue.dtype} {tuple(qvalue.shape)} and {tuple(scale.shape)}"
            )
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype) if self.use_bias else None
        h = x.astype(self.dtype)
        y = jax.lax.dot_general(h, qvalue.astype(self.dtype), (((h.ndim - 1,), (0,)), ((), ())))  # [..., out]
        y = (y.astype(jnp.float32) * scale.astype(jnp.float32)).astype(self.dtype)  # scale stays f32
        if bias is not None:
            y = y + bias.astype(self.dtype)
        if self.lora_rank > 0:
            y = y + lora_delta(
                self,
                x,
                self.features,
                rank=self.lora_rank,
                alpha=self.lora_alpha,
                dropout=self.lora_dropout,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
            )
        return y
