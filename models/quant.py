"""Weight-only int8 quantisation (per-output-channel, symmetric) as param-tree transforms.

With `config.quant == 'int8'` every projection `_dense` builds (q/k/v/o, gate/up/down) is a
`QuantDense` (models/projections.py) whose parameters are

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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from models.projections import PROJECTIONS, dequantize, quantize_kernel
from models.transformer import TransformerConfig

__all__ = ["quantize_params", "dequantize_params", "param_bytes"]

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
