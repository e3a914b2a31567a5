"""`mlp_chunk` (models/mlp.py): the MLP over chunks of positions gives the unchunked model's values and
gradients (gated and plain MLPs, parallel residual, padding, lengths the chunk does not divide, remat
and the layer scan, LoRA on the MLP projections, int8), and holds one chunk's [rows, d_ff]
intermediates instead of the whole sequence's (XLA's memory analysis against a hand count)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.transformer import Transformer, TransformerConfig, init_params

FAMILIES = {
    "llama": dict(family="llama", n_kv_heads=2),  # gated SiLU MLP, grouped-query attention
    "gpt_neox": dict(family="gpt_neox", parallel_residual=True, activation="gelu", mlp_bias=True, n_kv_heads=4),
}


def _config(name, **kw):
    base = dict(vocab_size=64, d_model=32, n_layers=3, n_heads=4, head_dim=8, d_ff=96, **FAMILIES[name])
    return TransformerConfig(**{**base, **kw})


def _loss(config, params, ids, mask):
    out = Transformer(config).apply(params, ids, mask, return_logits=False)
    return jnp.sum(jnp.sin(out.hidden_states) * mask[..., None])  # a loss that weighs every position differently


def _data(t=13):
    ids = jax.random.randint(jax.random.key(0), (3, t), 1, 64)
    mask = jnp.ones((3, t), jnp.int32).at[0, :4].set(0).at[2, -3:].set(0)  # left and right padding
    return ids, mask


@pytest.mark.parametrize(
    "name,options",
    [
        ("llama", dict()),
        ("llama", dict(remat=True, scan_layers=True)),
        ("gpt_neox", dict(remat=True)),
        ("llama", dict(lora_rank=2, lora_targets=("gate_proj", "up_proj", "down_proj"))),
    ],
)
def test_chunked_mlp_equals_whole_sequence(name, options):
    """Values and gradients equal to float32 rounding (1e-5): the same per-row products, but XLA may
    tile a dot of 16 rows differently from one of 39, and the weight gradient is summed over 4 chunks
    (the last padded with 3 zero positions) instead of once."""
    whole = _config(name, **options)
    chunked = whole.replace(mlp_chunk=4)  # 13 positions -> 4 chunks of 4, the last padded with 3
    ids, mask = _data()
    params = Transformer(whole).init(jax.random.key(1), ids, mask)
    same_init = Transformer(chunked).init(jax.random.key(1), ids, mask)  # the parameter tree is the MLP's
    assert jax.tree.structure(params) == jax.tree.structure(same_init)
    jax.tree.map(np.testing.assert_array_equal, params, same_init)
    params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(2), p.shape), params)  # LoRA B != 0

    out_whole = Transformer(whole).apply(params, ids, mask, return_logits=False).hidden_states
    out_chunked = Transformer(chunked).apply(params, ids, mask, return_logits=False).hidden_states
    np.testing.assert_allclose(np.asarray(out_chunked), np.asarray(out_whole), rtol=1e-5, atol=1e-6)
    g_whole = jax.grad(lambda p: _loss(whole, p, ids, mask))(params)
    g_chunked = jax.grad(lambda p: _loss(chunked, p, ids, mask))(params)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_whole), jax.tree.leaves(g_chunked)):
        scale = float(np.max(np.abs(a))) + 1e-12
        np.testing.assert_allclose(np.asarray(b) / scale, np.asarray(a) / scale, atol=2e-6, err_msg=str(path))


def test_int8_and_short_sequences():
    """int8 projections read the same qvalue/scale per chunk; a sequence no longer than the chunk
    (the sampler's one-token decode steps) takes the unchunked path."""
    from models.quant import quantize_params

    ids, mask = _data(t=9)
    whole = _config("llama")
    params = Transformer(whole).init(jax.random.key(1), ids, mask)["params"]
    qparams, qconfig = quantize_params(params, whole)
    a = Transformer(qconfig).apply({"params": qparams}, ids, mask, return_logits=False).hidden_states
    b = Transformer(qconfig.replace(mlp_chunk=3)).apply({"params": qparams}, ids, mask, return_logits=False)
    np.testing.assert_allclose(np.asarray(b.hidden_states), np.asarray(a), rtol=0, atol=1e-6)
    c = Transformer(whole.replace(mlp_chunk=16)).apply({"params": params}, ids, mask, return_logits=False)
    d = Transformer(whole).apply({"params": params}, ids, mask, return_logits=False)
    np.testing.assert_array_equal(np.asarray(c.hidden_states), np.asarray(d.hidden_states))
    with pytest.raises(ValueError, match="mlp_chunk=-1"):
        whole.replace(mlp_chunk=-1)


def _temp_bytes(mlp_chunk: int, t: int, d_ff: int) -> int:
    config = TransformerConfig(
        family="llama",
        vocab_size=64,
        d_model=32,
        n_layers=2,
        n_heads=2,
        n_kv_heads=1,
        head_dim=16,
        d_ff=d_ff,
        attention="chunked",
        remat=True,
        scan_layers=True,
        mlp_chunk=mlp_chunk,
    )
    params = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    ids = jax.ShapeDtypeStruct((2, t), jnp.int32)

    def loss(params, ids):
        out = Transformer(config).apply({"params": params}, ids, jnp.ones_like(ids), return_logits=False)
        return jnp.sum(out.hidden_states**2)

    return jax.jit(jax.grad(loss)).lower(params, ids).compile().memory_analysis().temp_size_in_bytes


def test_chunked_mlp_holds_one_chunk_of_intermediates():
    """At d_ff = 64 d the MLP's float32 [B*T, d_ff] intermediates dominate a remat'd layer's backward
    pass. Over 8 chunks at least three of them (gate, up, activation or their cotangents) shrink to
    an eighth: the temp falls by more than 2.5 whole-sequence buffers."""
    t, d_ff = 512, 2048
    buffer = 2 * t * d_ff * 4  # one [B*T, d_ff] float32 intermediate: 8 MiB
    whole, chunked = _temp_bytes(0, t, d_ff), _temp_bytes(64, t, d_ff)
    assert whole - chunked > 2.5 * buffer, (whole, chunked, buffer)
