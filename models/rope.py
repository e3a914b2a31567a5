"""Rotary position embeddings (RoPE) as Hugging Face computes them, per layer.

What a layer rotates with is decided by its config:
  - the base `rope_theta` and the scaling `rope_scaling` (sorted (key, value) items of HF's
    `rope_parameters`): default, 'linear' (positions divided by `factor`), 'llama3' (smooth
    per-frequency scaling) and 'longrope' (Phi-3/3.5: per-frequency `short_factor` /
    `long_factor`, the long set used when the longest position of the call reaches past
    `original_max_position_embeddings`, cos/sin multiplied by an attention factor);
  - Gemma 3's local (sliding-window) layers use their own base `rope_local_theta` with no
    scaling, the global layers `rope_theta` + `rope_scaling`;
  - partial rotary (GPT-NeoX `rotary_pct`, HF `partial_rotary_factor`): only the first
    int(head_dim * rotary_pct) features of each head are rotated, the rest pass through.

The layout is HF's half split (rotate_half): feature i pairs with feature i + rotary_dim/2.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import jax
import jax.numpy as jnp

# `config` below is a models.transformer.TransformerConfig; typed Any because transformer.py
# imports this module (a type-only import back would close an import circle).
ROPE_TYPES = ("default", "linear", "llama3", "longrope")


def rotary_dim(config: Any) -> int:
    """Number of rotated features per head (HF: int(head_dim * partial_rotary_factor))."""
    return int(config.head_dim * config.rotary_pct)


def _base_inv_freq(theta: float, dim: int) -> jax.Array:
    return 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))  # [dim/2]


def rope_inv_freq(
    config: Any, *, local: bool = False, positions: Optional[jax.Array] = None
) -> tuple[jax.Array, float]:
    """(inverse frequencies [rotary_dim/2], cos/sin multiplier) for a global or a local layer.

    `positions` [B, T] are needed only by 'longrope', which picks its factor set from the
    largest position in the call (as HF's `longrope_frequency_update` does).
    """
    dim = rotary_dim(config)
    if local and config.rope_local_theta is not None:
        return _base_inv_freq(config.rope_local_theta, dim), 1.0
    inv_freq = _base_inv_freq(config.rope_theta, dim)
    scaling = dict(config.rope_scaling or ())
    kind = scaling.get("rope_type", "default")
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return jnp.where(medium, smoothed, scaled), 1.0
    if kind == "longrope":
        old_len = scaling["original_max_position_embeddings"]
        factor = scaling.get("factor") or config.max_position_embeddings / old_len
        attention_factor = scaling.get("attention_factor")
        if attention_factor is None:
            attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old_len))
        short = inv_freq / jnp.asarray(scaling["short_factor"], jnp.float32)
        long = inv_freq / jnp.asarray(scaling["long_factor"], jnp.float32)
        if positions is None:
            return short, float(attention_factor)
        use_long = jnp.max(positions) + 1 > old_len
        return jnp.where(use_long, long, short), float(attention_factor)
    raise ValueError(f"rope_type={kind!r} is not supported; supported: {', '.join(ROPE_TYPES)}")


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array, attention_factor: float = 1.0) -> jax.Array:
    """Rotary embedding in HF's half-split layout on the first 2 * len(inv_freq) features.

    x [B, T, H, D], positions [B, T], inv_freq [R/2] with R <= D; features R..D pass through.
    """
    rot = 2 * inv_freq.shape[0]
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, R/2]
    cos = (jnp.cos(angles) * attention_factor)[:, :, None, :]
    sin = (jnp.sin(angles) * attention_factor)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., : rot // 2], x32[..., rot // 2 : rot]
    parts = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
    if rot < x.shape[-1]:
        parts.append(x32[..., rot:])
    return jnp.concatenate(parts, axis=-1).astype(x.dtype)
