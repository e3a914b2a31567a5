"""Memory of a scanned, rematerialised stack's forward + backward (XLA's memory analysis): linear in
T and in depth, so no per-layer [B, T, T] mask or score tensor is held (chunked attention)."""

import jax
import jax.numpy as jnp

from models.transformer import Transformer, TransformerConfig, init_params

B, D = 2, 64


def _temp_bytes(attention: str, n_layers: int, t: int) -> int:
    config = TransformerConfig(
        family="llama",
        vocab_size=64,
        d_model=D,
        n_layers=n_layers,
        n_heads=2,
        n_kv_heads=1,
        head_dim=32,
        d_ff=128,
        attention=attention,
        scan_layers=True,
        remat=True,
    )
    params = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    ids = jax.ShapeDtypeStruct((B, t), jnp.int32)

    def loss(params, ids):
        mask = (ids > 0).astype(jnp.int32)  # a padding mask from the data: built per layer inside the scan
        out = Transformer(config).apply({"params": params}, ids, mask, return_logits=False)
        return jnp.sum(out.hidden_states**2)

    compiled = jax.jit(jax.grad(loss)).lower(params, ids).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_scanned_stack_memory_is_linear_in_length_and_depth():
    """A per-layer [B, T, T] buffer (a mask broadcast per layer, or scores kept for the backward
    pass) would quadruple the temp when T doubles and add B * T * T * 4 bytes a layer; the plain
    path's quadratic growth is caught the same way in tests/attention_test.py."""
    base, longer, deeper = (_temp_bytes("chunked", n, t) for n, t in ((2, 1024), (2, 2048), (4, 1024)))
    assert longer / base < 2.3, (base, longer)
    # Two more layers add their saved residuals [B, T, d] and weight gradients, far below one f32 [B, T, T] each.
    assert deeper - base < B * 1024 * 1024 * 4, (base, deeper)
