"""Attention implementations (models/attention.py): blockwise and dot_product_attention paths
equal the plain XLA path in values and gradients; the blockwise path's memory grows linearly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.attention import attend, resolve_attention_impl

B, T, H, KVH, D = 2, 11, 4, 2, 8


def _inputs(seed, t=T, s=None, h=H, kvh=KVH):
    s = s or t
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (B, t, h, D), jnp.float32)
    k = jax.random.normal(kk, (B, kvh, s, D), jnp.float32)
    v = jax.random.normal(kv, (B, kvh, s, D), jnp.float32)
    return q, k, v


def _masks(t):
    left = np.ones((B, t), np.int32)
    left[0, :3] = 0  # row 0 left-padded
    right = np.ones((B, t), np.int32)
    right[1, -4:] = 0  # row 1 right-padded
    return {"none": np.ones((B, t), np.int32), "left": left, "right": right}


def _numpy_reference(q, k, v, kv_mask, *, q_slots, scale, window=None, softcap=None):
    """A loop over batch, head and query: masked softmax of the scores (float64)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, h, _ = q.shape
    kvh, s = k.shape[1], k.shape[2]
    out = np.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            kh = hi // (h // kvh)
            for ti in range(t):
                sc = k[bi, kh] @ q[bi, ti, hi] * scale
                if softcap is not None:
                    sc = softcap * np.tanh(sc / softcap)
                slots = np.arange(s)
                ok = (slots <= q_slots[ti]) & (kv_mask[bi] > 0)
                if window is not None:
                    ok &= q_slots[ti] - slots < window
                if not ok.any():
                    continue  # a padding query: nothing to compare
                p = np.exp(sc[ok] - sc[ok].max())
                out[bi, ti, hi] = (p / p.sum()) @ v[bi, kh][ok]
    return out


@pytest.mark.parametrize("mask_kind", ["none", "left", "right"])
@pytest.mark.parametrize("window,softcap", [(None, None), (4, None), (None, 2.0), (5, 3.0)])
def test_chunked_equals_plain_values_and_grads(mask_kind, window, softcap):
    q, k, v = _inputs(0)
    kv_mask = jnp.asarray(_masks(T)[mask_kind])
    kw = dict(q_slots=jnp.arange(T), kv_mask=kv_mask, scale=D**-0.5, sliding_window=window, softcap=softcap)
    plain = attend(q, k, v, impl="xla", **kw)
    chunked = attend(q, k, v, impl="chunked", block_q=4, block_k=3, **kw)  # blocks that do not divide T
    np.testing.assert_allclose(chunked, plain, atol=1e-5, rtol=1e-5)
    real = np.asarray(kv_mask)[:, :, None, None] > 0
    ref = _numpy_reference(
        q, k, v, np.asarray(kv_mask), q_slots=np.arange(T), scale=D**-0.5, window=window, softcap=softcap
    )
    np.testing.assert_allclose(np.where(real, chunked, 0), np.where(real, ref, 0), atol=1e-5)

    weights = jax.random.normal(jax.random.key(1), plain.shape)

    def loss(impl):
        return lambda q, k, v: jnp.sum(attend(q, k, v, impl=impl, block_q=4, block_k=3, **kw) * weights)

    grads_plain = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    grads_chunked = jax.grad(loss("chunked"), argnums=(0, 1, 2))(q, k, v)
    for gp, gc in zip(grads_plain, grads_chunked):
        assert np.all(np.isfinite(gc))
        np.testing.assert_allclose(gc, gp, atol=1e-5, rtol=1e-5)


def test_chunked_decode_with_cache_offsets():
    """Decoding: one query at slot 9 (and a 3-token chunk at 6..8) over a 13-slot cache."""
    s = 13
    q, k, v = _inputs(2, t=3, s=s)
    valid = np.zeros((B, s), np.int32)
    valid[0, 2:10] = 1  # row 0: prompt left-padded by 2, cache filled to slot 9
    valid[1, :10] = 1
    for q_slots in (jnp.arange(6, 9), jnp.arange(9, 12)):
        kw = dict(q_slots=q_slots, kv_mask=jnp.asarray(valid), scale=0.3, sliding_window=6)
        np.testing.assert_allclose(
            attend(q, k, v, impl="chunked", block_q=2, block_k=4, **kw),
            attend(q, k, v, impl="xla", **kw),
            atol=1e-5,
            rtol=1e-5,
        )
    q1 = q[:, :1]
    kw = dict(q_slots=jnp.array([9]), kv_mask=jnp.asarray(valid), scale=0.3)
    np.testing.assert_allclose(
        attend(q1, k, v, impl="chunked", block_k=5, **kw), attend(q1, k, v, impl="xla", **kw), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("window", [None, 4])
def test_dot_product_attention_mapping(window):
    """The arguments handed to jax.nn.dot_product_attention (the cuDNN call) mean our mask:
    checked through its XLA implementation on the real query rows."""
    q, k, v = _inputs(3)
    kv_mask = jnp.asarray(_masks(T)["left"] * _masks(T)["right"])
    kw = dict(q_slots=jnp.arange(T), kv_mask=kv_mask, scale=D**-0.5, sliding_window=window)
    real = np.asarray(kv_mask)[:, :, None, None] > 0
    plain = attend(q, k, v, impl="xla", **kw)
    dpa = attend(q, k, v, impl="dpa_xla", **kw)
    np.testing.assert_allclose(np.where(real, dpa, 0), np.where(real, plain, 0), atol=1e-5, rtol=1e-5)


def test_resolve_attention_impl():
    common = dict(head_dim=64, softcap=None, self_attention=True)
    assert resolve_attention_impl("auto", q_len=16, kv_len=16, dtype=jnp.bfloat16, backend="gpu", **common) == "cudnn"
    assert resolve_attention_impl("auto", q_len=16, kv_len=16, dtype=jnp.float32, backend="gpu", **common) == "xla"
    assert (
        resolve_attention_impl("auto", q_len=4096, kv_len=4096, dtype=jnp.float32, backend="cpu", **common) == "chunked"
    )
    assert resolve_attention_impl("auto", q_len=16, kv_len=16, dtype=jnp.bfloat16, backend="cpu", **common) == "xla"
    assert resolve_attention_impl("auto", q_len=15, kv_len=15, dtype=jnp.bfloat16, backend="gpu", **common) == "xla"
    capped = dict(common, softcap=50.0)
    assert resolve_attention_impl("cudnn", q_len=16, kv_len=16, dtype=jnp.bfloat16, backend="gpu", **capped) == "xla"
    with pytest.raises(ValueError, match="attention='flash'"):
        resolve_attention_impl("flash", q_len=1, kv_len=1, dtype=jnp.float32, **common)


def _fwd_bwd_temp_bytes(impl, t):
    q = jax.ShapeDtypeStruct((1, t, 4, 32), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, 4, t, 32), jnp.float32)
    mask = jax.ShapeDtypeStruct((1, t), jnp.int32)

    def loss(q, k, v, kv_mask):
        out = attend(q, k, v, q_slots=jnp.arange(t), kv_mask=kv_mask, scale=0.2, impl=impl, block_q=64, block_k=64)
        return jnp.sum(out * out)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv, mask).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_memory_grows_linearly():
    """Forward + backward temp memory when T doubles: ~2x blockwise, ~4x for the plain path."""
    chunked = [_fwd_bwd_temp_bytes("chunked", t) for t in (512, 1024)]
    plain = [_fwd_bwd_temp_bytes("xla", t) for t in (512, 1024)]
    assert chunked[1] / chunked[0] < 2.3, chunked
    assert plain[1] / plain[0] > 3.5, plain  # the check can fail: the quadratic path is caught
    assert chunked[1] < plain[1] / 4
