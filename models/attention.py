"""The attention core: scores, masking (causal, padding, sliding window) and the weighted sum.

Kept apart from `models/transformer.py` so that the projections, norms and RoPE of each family
live in the transformer while the way attention is computed lives here, behind one function.

Implementations (`TransformerConfig.attention`, resolved by `resolve_attention_impl`):
  xla      the plain path: float32 scores [B, H, T, S], masked softmax, weighted sum. Exact
           reference; memory O(T * S) per head.
  chunked  blockwise (flash-style) attention on every backend: queries in blocks of
           `block_q`, keys in blocks of `block_k`, an online softmax (running max, running
           sum, running weighted sum). The key loop's steps and the query blocks are
           rematerialised (jax.checkpoint), so neither the forward nor the backward pass holds
           more than one [B, H, block_q, block_k] block of scores; memory O(T) for fixed blocks.
           Same numbers as `xla` (float32 rounding only), fully masked rows included.
  cudnn    `jax.nn.dot_product_attention(implementation='cudnn')`: the cuDNN flash kernel
           (GPU, bf16/fp16). Causal, padding (as a boolean [B, 1, T, S] mask) and sliding
           windows; no soft-capping, no KV cache offsets and no odd lengths (see
           `cudnn_allowed`), so callers fall back to xla there. Query rows that are padding (all keys masked) may differ from xla; they are
           never read.
  auto     cudnn on a GPU when the dtype, head size and mask allow it; otherwise chunked when
           the query or key length is at least `AUTO_CHUNK_MIN_LEN`; otherwise xla. Short
           sequences on CPU/TPU therefore keep exactly the plain path's numbers.

Packed rows (several sequences in one row, common/packing.py): `segment_ids` [B, T] (0 on
padding, 1, 2, ... per sequence) restrict every path to keys of the query's own segment; the
cudnn path takes it as part of its boolean mask.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

ATTENTION_IMPLS = ("auto", "xla", "chunked", "cudnn")
AUTO_CHUNK_MIN_LEN = 1024  # 'auto' switches to the blockwise path from this many queries or keys
DEFAULT_BLOCK_Q = 512
DEFAULT_BLOCK_K = 512


def attention_mask_for(
    q_slots: jax.Array,
    kv_mask: jax.Array,
    *,
    num_slots: int,
    sliding_window: Optional[int] = None,
    segment_ids: Optional[jax.Array] = None,
) -> jax.Array:
    """Allowed (query, key) pairs [B, T, S]: a real key, not in the future, inside the window
    and, with `segment_ids` [B, T] (self-attention, T == S), in the query's own segment.

    q_slots [T] are the queries' cache slots (0..T-1 without a cache); kv_mask [B, S] marks
    real keys.
    """
    k_slots = jnp.arange(num_slots)
    allowed = (k_slots[None, :] <= q_slots[:, None])[None]  # [1, T, S]
    if sliding_window is not None:
        allowed &= (q_slots[:, None] - k_slots[None, :] < sliding_window)[None]
    allowed = allowed & (kv_mask[:, None, :] > 0)  # [B, T, S]
    if segment_ids is not None:
        allowed &= segment_ids[:, :, None] == segment_ids[:, None, :]
    return allowed


def cudnn_allowed(
    *, dtype, head_dim: int, softcap: Optional[float], self_attention: bool, q_len: int = 2, kv_len: int = 2
) -> bool:
    """Whether the cuDNN flash kernel can compute this attention (static facts only).

    JAX's cuDNN wrapper refuses head dims that are not a multiple of 8 (or above 128 before
    Hopper) and, with a mask (a bias to cuDNN) in training, odd sequence lengths."""
    return (
        jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and softcap is None
        and self_attention
        and head_dim % 8 == 0
        and head_dim <= 128
        and q_len % 2 == 0
        and kv_len % 2 == 0
    )


def resolve_attention_impl(
    impl: str,
    *,
    q_len: int,
    kv_len: int,
    dtype,
    head_dim: int,
    softcap: Optional[float],
    self_attention: bool,
    backend: Optional[str] = None,
) -> str:
    """The implementation that `impl` ('auto' | 'xla' | 'chunked' | 'cudnn') means for this call.

    self_attention: the queries sit at slots 0..T-1 over T keys (no KV-cache offset); cuDNN
    needs it. An explicit 'cudnn' whose mask or dtype the kernel cannot take falls back to
    'xla' (soft-capping, decoding with a cache, float32) rather than failing.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention={impl!r}; one of {ATTENTION_IMPLS}")
    backend = backend or jax.default_backend()
    ok = cudnn_allowed(
        dtype=dtype, head_dim=head_dim, softcap=softcap, self_attention=self_attention, q_len=q_len, kv_len=kv_len
    )
    if impl == "cudnn":
        return "cudnn" if ok else "xla"
    if impl == "auto":
        if backend == "gpu" and ok:
            return "cudnn"
        return "chunked" if max(q_len, kv_len) >= AUTO_CHUNK_MIN_LEN else "xla"
    return impl


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_slots: jax.Array,
    kv_mask: jax.Array,
    scale: float,
    sliding_window: Optional[int] = None,
    softcap: Optional[float] = None,
    impl: str = "xla",
    block_q: int = DEFAULT_BLOCK_Q,
    block_k: int = DEFAULT_BLOCK_K,
    segment_ids: Optional[jax.Array] = None,
) -> jax.Array:
    """Grouped-query attention. q [B, T, H, D]; k, v [B, Hkv, S, D] -> [B, T, H, D].

    segment_ids [B, T] (packed rows; self-attention only, S == T): a query sees only keys of
    its own segment.

    Scores are computed in float32, multiplied by `scale`, soft-capped as
    softcap * tanh(scores / softcap) when `softcap` is set, then masked and softmaxed.
    `impl` is an already resolved implementation ('xla' | 'chunked' | 'cudnn'; 'auto' is
    resolved here assuming self-attention when S == T); see the module docstring.
    """
    if impl == "auto":
        impl = resolve_attention_impl(
            impl,
            q_len=q.shape[1],
            kv_len=k.shape[2],
            dtype=q.dtype,
            head_dim=q.shape[-1],
            softcap=softcap,
            self_attention=q.shape[1] == k.shape[2],
        )
    if (
        segment_ids is not None
        and segment_ids.shape != (q.shape[0], k.shape[2])
        or (segment_ids is not None and q.shape[1] != k.shape[2])
    ):
        raise ValueError(
            f"attend: segment_ids need self-attention (T == S) and shape [B, S]; got segment_ids "
            f"{tuple(segment_ids.shape)}, q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    if impl == "xla":
        return _attend_xla(
            q,
            k,
            v,
            q_slots=q_slots,
            kv_mask=kv_mask,
            scale=scale,
            sliding_window=sliding_window,
            softcap=softcap,
            segment_ids=segment_ids,
        )
    if impl == "chunked":
        return _attend_chunked(
            q,
            k,
            v,
            q_slots=q_slots,
            kv_mask=kv_mask,
            scale=scale,
            sliding_window=sliding_window,
            softcap=softcap,
            block_q=block_q,
            block_k=block_k,
            segment_ids=segment_ids,
        )
    if impl in ("cudnn", "dpa_xla"):  # dpa_xla: the same call through XLA (tests the argument mapping on CPU)
        if softcap is not None:
            raise ValueError("attention impl 'cudnn' does not support soft-capping; use 'xla' or 'chunked'")
        return _attend_dot_product(
            q,
            k,
            v,
            kv_mask=kv_mask,
            scale=scale,
            sliding_window=sliding_window,
            implementation="cudnn" if impl == "cudnn" else "xla",
            segment_ids=segment_ids,
        )
    raise ValueError(f"attention impl={impl!r}; one of {ATTENTION_IMPLS}")


def _attend_xla(q, k, v, *, q_slots, kv_mask, scale, sliding_window, softcap, segment_ids=None):
    """The plain path: the whole [B, Hkv, G, T, S] float32 score tensor at once."""
    b, t, h, hd = q.shape
    kvh, s = k.shape[1], k.shape[2]
    allowed = attention_mask_for(q_slots, kv_mask, num_slots=s, sliding_window=sliding_window, segment_ids=segment_ids)
    qg = q.reshape(b, t, kvh, h // kvh, hd)
    scores = jnp.einsum("btkgd,bksd->bkgts", qg, k).astype(jnp.float32) * scale
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bksd->btkgd", probs, v).reshape(b, t, h, hd)


def _attend_dot_product(q, k, v, *, kv_mask, scale, sliding_window, implementation, segment_ids=None):
    """jax.nn.dot_product_attention for self-attention over slots 0..T-1 (no cache offset)."""
    b, t, _, _ = q.shape
    s = k.shape[2]
    # Padding anywhere (left or right) as a boolean mask; cuDNN wants it at full [.., T, S].
    mask = jnp.broadcast_to((kv_mask > 0)[:, None, None, :], (b, 1, t, s))
    if segment_ids is not None:  # packed rows: the segment test is one more term of the same mask
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    window = None if sliding_window is None else (sliding_window - 1, 0)  # q - k <= window - 1
    return jax.nn.dot_product_attention(
        q,
        k.transpose(0, 2, 1, 3),
        v.transpose(0, 2, 1, 3),
        mask=mask,
        scale=scale,
        is_causal=True,
        local_window_size=window,
        implementation=implementation,
    )


def _pad_axis(x, axis, size, value=0):
    extra = size - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def _attend_chunked(q, k, v, *, q_slots, kv_mask, scale, sliding_window, softcap, block_q, block_k, segment_ids=None):
    """Blockwise attention with an online softmax; see the module docstring.

    Masked keys get float32 min (as in the plain path, so a row with no allowed key averages
    all keys exactly like the plain softmax does); keys that exist only to fill the last block
    get -inf and weigh exactly zero.
    """
    b, t, h, hd = q.shape
    kvh, s = k.shape[1], k.shape[2]
    g = h // kvh
    bq, bk = min(block_q, t), min(block_k, s)
    nq, nk = -(-t // bq), -(-s // bk)
    neg = jnp.finfo(jnp.float32).min

    qg = _pad_axis(q.reshape(b, t, kvh, g, hd), 1, nq * bq)
    q_blocks = qg.reshape(b, nq, bq, kvh, g, hd).transpose(1, 0, 2, 3, 4, 5)  # [nq, B, bq, Hkv, G, D]
    q_slot_blocks = _pad_axis(q_slots.astype(jnp.int32), 0, nq * bq).reshape(nq, bq)
    k_blocks = _pad_axis(k, 2, nk * bk).reshape(b, kvh, nk, bk, hd).transpose(2, 0, 1, 3, 4)  # [nk, B, Hkv, bk, D]
    v_blocks = _pad_axis(v, 2, nk * bk).reshape(b, kvh, nk, bk, hd).transpose(2, 0, 1, 3, 4)
    kv_mask_blocks = _pad_axis(kv_mask > 0, 1, nk * bk).reshape(b, nk, bk).transpose(1, 0, 2)  # [nk, B, bk]
    k_slot_blocks = jnp.arange(nk * bk).reshape(nk, bk)
    k_exists = k_slot_blocks < s  # [nk, bk]
    # Segment ids of queries [nq, B, bq] and keys [nk, B, bk]; all zeros (one segment) when unpacked.
    q_seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    k_seg = jnp.zeros((b, s), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    q_seg_blocks = _pad_axis(q_seg, 1, nq * bq).reshape(b, nq, bq).transpose(1, 0, 2)
    k_seg_blocks = _pad_axis(k_seg, 1, nk * bk).reshape(b, nk, bk).transpose(1, 0, 2)

    def key_step(carry, xs, q_block, q_slot_block, q_seg_block):
        running_max, running_sum, acc = carry  # [B, Hkv, G, bq], [B, Hkv, G, bq], [B, Hkv, G, bq, D]
        k_block, v_block, mask_block, k_slot_block, exists, k_seg_block = xs
        scores = jnp.einsum("bqkgd,bksd->bkgqs", q_block, k_block).astype(jnp.float32) * scale  # [B,Hkv,G,bq,bk]
        if softcap is not None:
            scores = softcap * jnp.tanh(scores / softcap)
        allowed = k_slot_block[None, :] <= q_slot_block[:, None]  # [bq, bk]
        if sliding_window is not None:
            allowed &= q_slot_block[:, None] - k_slot_block[None, :] < sliding_window
        allowed = allowed[None] & mask_block[:, None, :]  # [B, bq, bk]
        if segment_ids is not None:
            allowed &= q_seg_block[:, :, None] == k_seg_block[:, None, :]
        scores = jnp.where(allowed[:, None, None], scores, neg)
        scores = jnp.where(exists[None, None, None, None, :], scores, -jnp.inf)
        # The result does not depend on the shift, so no gradient flows through the running max.
        new_max = jax.lax.stop_gradient(jnp.maximum(running_max, jnp.max(scores, axis=-1)))
        probs = jnp.exp(scores - new_max[..., None])  # [B, Hkv, G, bq, bk]
        correction = jnp.exp(running_max - new_max)
        running_sum = running_sum * correction + jnp.sum(probs, axis=-1)
        weighted = jnp.einsum("bkgqs,bksd->bkgqd", probs.astype(v.dtype), v_block, preferred_element_type=jnp.float32)
        acc = acc * correction[..., None] + weighted
        return (new_max, running_sum, acc), None

    @jax.checkpoint
    def query_block(q_block, q_slot_block, q_seg_block):
        init = (
            jnp.full((b, kvh, g, bq), neg, jnp.float32),
            jnp.zeros((b, kvh, g, bq), jnp.float32),
            jnp.zeros((b, kvh, g, bq, hd), jnp.float32),
        )
        step = jax.checkpoint(lambda carry, xs: key_step(carry, xs, q_block, q_slot_block, q_seg_block))
        (_, running_sum, acc), _ = jax.lax.scan(
            step, init, (k_blocks, v_blocks, kv_mask_blocks, k_slot_blocks, k_exists, k_seg_blocks)
        )
        out = (acc / running_sum[..., None]).astype(v.dtype)  # [B, Hkv, G, bq, D]
        return out.transpose(0, 3, 1, 2, 4)  # [B, bq, Hkv, G, D]

    out = jax.lax.map(lambda xs: query_block(*xs), (q_blocks, q_slot_blocks, q_seg_blocks))  # [nq, B, bq, Hkv, G, D]
    out = out.transpose(1, 0, 2, 3, 4, 5).reshape(b, nq * bq, h, hd)
    return out[:, :t]
