"""The attention core: scores, masking (causal, padding, sliding window) and the weighted sum.

Kept apart from `models/transformer.py` so that the projections, norms and RoPE of each family
live in the transformer while the way attention is computed (plain XLA, blockwise, cuDNN)
lives here, behind one function.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def attention_mask_for(q_slots: jax.Array, kv_mask: jax.Array, *, num_slots: int,
                       sliding_window: Optional[int] = None) -> jax.Array:
    """Allowed (query, key) pairs [B, T, S]: a real key, not in the future, inside the window.

    q_slots [T] are the queries' cache slots (0..T-1 without a cache); kv_mask [B, S] marks
    real keys.
    """
    k_slots = jnp.arange(num_slots)
    allowed = (k_slots[None, :] <= q_slots[:, None])[None]  # [1, T, S]
    if sliding_window is not None:
        allowed &= (q_slots[:, None] - k_slots[None, :] < sliding_window)[None]
    return allowed & (kv_mask[:, None, :] > 0)  # [B, T, S]


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, q_slots: jax.Array, kv_mask: jax.Array,
           scale: float, sliding_window: Optional[int] = None, softcap: Optional[float] = None) -> jax.Array:
    """Grouped-query attention. q [B, T, H, D]; k, v [B, Hkv, S, D] -> [B, T, H, D].

    Scores are computed in float32, multiplied by `scale`, soft-capped as
    softcap * tanh(scores / softcap) when `softcap` is set, then masked and softmaxed.
    """
    b, t, h, hd = q.shape
    kvh, s = k.shape[1], k.shape[2]
    allowed = attention_mask_for(q_slots, kv_mask, num_slots=s, sliding_window=sliding_window)
    qg = q.reshape(b, t, kvh, h // kvh, hd)
    scores = jnp.einsum("btkgd,bksd->bkgts", qg, k).astype(jnp.float32) * scale
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bksd->btkgd", probs, v).reshape(b, t, h, hd)
