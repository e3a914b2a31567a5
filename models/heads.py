"""Scalar heads on top of the backbone's hidden states: reward and value heads share one."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


class ScalarHead(nn.Module):
    """Linear map from a hidden state to one scalar.

    Kernel initialised N(0, 1/sqrt(d + 1)) (std), bias 0: the initialisation used by the
    OpenAI reward models (lm-human-preferences) so initial rewards have unit-ish scale.
    """

    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, hidden: jax.Array) -> jax.Array:  # [..., d] -> [...]
        d = hidden.shape[-1]
        kernel = self.param(
            "kernel", nn.initializers.normal(1.0 / math.sqrt(d + 1)), (d, 1), jnp.dtype(self.param_dtype)
        )
        bias = self.param("bias", nn.initializers.zeros, (1,), jnp.dtype(self.param_dtype))
        out = hidden.astype(jnp.float32) @ kernel.astype(jnp.float32) + bias.astype(jnp.float32)
        return out[..., 0]


def last_token_index(attention_mask: jax.Array) -> jax.Array:
    """Index of the last real token of each row, for left or right padding. [B, T] -> [B].

    Uses the mask, never token ids, so it is right when pad id == eos id.
    """
    t = attention_mask.shape[-1]
    return jnp.max(jnp.where(attention_mask > 0, jnp.arange(t), 0), axis=-1)


def gather_last(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Hidden state at the last real token. [B, T, d] -> [B, d]."""
    idx = last_token_index(attention_mask)
    return jnp.take_along_axis(hidden, idx[:, None, None], axis=1)[:, 0]
