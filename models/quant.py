"""Weight-only int8 quantisation of the transformer's projections (per-output-channel, symmetric).

With `config.quant == 'int8'` every projection `_dense` builds (q/k/v/o, gate/up/down) is a
`QuantDense` whose parameters are

  qvalue [in, out] int8      round(W / scale), clipped to [-127, 127]
  scale  [out]     float32   max_i |W[i, o]| / 127 (0 for an all-zero column)
  bias   [out]               unchanged, when the projection has one

and it computes y = (x @ qvalue) * scale + b. Only the weights are quantised: activations,
embeddings, norms and lm_head stay float, and the int8 -> compute-dtype cast happens inside
the jitted forward, so device memory holds one byte per weight. With LoRA also configured
the adapters sit next to the int8 base in float (QLoRA-style: frozen int8 base, float
adapters; `models/lora.py`).

  qparams, qconfig = quantize_params(params, config)     # e.g. a frozen reference / reward model
  logits = Transformer(qconfig).apply({'params': qparams}, ids, mask).logits
  print(param_bytes(params), '->', param_bytes(qparams))

Error: per weight |dequantize(q, s) - W| <= s / 2 (round to nearest, no clipping since
|W| / s <= 127). Symmetric per-channel absmax is the scheme of LLM.int8()'s vector-wise
weight quantisation without its outlier decomposition; it is plain round-to-nearest, with
no calibration data.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models.lora import PROJECTIONS, lora_delta

if TYPE_CHECKING:
    from models.transformer import TransformerConfig

__all__ = ["QMAX", "quantize_kernel", "dequantize", "QuantDense", "quantize_params", "dequantize_params", "param_bytes"]

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


# ----------------------------------------------------------------------------- param transforms


def _map_projections(params: Any, fn: Callable[[str, dict], dict], prefix: tuple = (), under_layer=False):
    """Copy of `params` with fn(path, d) applied to each projection dict under a 'layers_*' module."""
    if not isinstance(params, dict):
        return params
    out = {}
    for key, value in params.items():
        path = prefix + (str(key),)
        inside = under_layer or str(key).startswith("layers_")
        if isinstance(value, dict) and under_layer and key in PROJECTIONS:
            out[key] = fn("/".join(path), value)
        else:
            out[key] = _map_projections(value, fn, path, inside)
    return out


def quantize_params(
    params: dict, config: TransformerConfig, *, include_lm_head: bool = False
) -> tuple[dict, TransformerConfig]:
    """Float params -> int8 projections: (params with qvalue/scale instead of kernel, config quant='int8').

    Converts the 'kernel' of every q/k/v/o/gate/up/down projection under a 'layers_*'
    module (a bare Transformer tree or one nested inside e.g. {'backbone': ...}). Biases,
    LoRA adapters, norms and embeddings stay as they are.

    include_lm_head: not supported yet -- the Transformer builds lm_head as a plain nn.Dense
    outside `_dense`, so it could not read an int8 lm_head. Raises if True.
    """
    if include_lm_head:
        raise NotImplementedError(
            "quantize_params(include_lm_head=True): the Transformer builds lm_head as nn.Dense outside "
            "_dense (models/transformer.py), so an int8 lm_head could not be read; lm_head stays float"
        )
    if config.quant:
        raise ValueError(f"quantize_params: config.quant is already {config.quant!r}")
    converted = []

    def convert(path, d):
        if "kernel" not in d:
            raise ValueError(f"quantize_params: {path} has no 'kernel' (has {sorted(d)})")
        q, s = quantize_kernel(d["kernel"])
        converted.append(path)
        out = {k: v for k, v in d.items() if k != "kernel"}
        out.update(qvalue=q, scale=s)
        return out

    new = _map_projections(params, convert)
    if not converted:
        raise ValueError(
            "quantize_params: found no projection (q_proj, ..., down_proj) under a 'layers_*' "
            "module; is this a Transformer param tree?"
        )
    return new, config.replace(quant="int8")


def dequantize_params(params: dict, config: TransformerConfig) -> tuple[dict, TransformerConfig]:
    """Inverse of `quantize_params`: float kernels (config.param_dtype) and config quant=''."""
    dtype = jnp.dtype(config.param_dtype)

    def convert(path, d):
        if "qvalue" not in d or "scale" not in d:
            raise ValueError(f"dequantize_params: {path} needs 'qvalue' and 'scale' (has {sorted(d)})")
        out = {k: v for k, v in d.items() if k not in ("qvalue", "scale")}
        out["kernel"] = dequantize(d["qvalue"], d["scale"], dtype)
        return out

    return _map_projections(params, convert), config.replace(quant="")


def param_bytes(params: Any) -> int:
    """Bytes the leaves of `params` occupy (arrays or ShapeDtypeStructs), e.g. to log int8 savings."""
    return sum(int(math.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params))
