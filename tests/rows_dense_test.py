"""RowsDense / rows_matmul (models/projections.py): nn.Dense's params and numbers, a hand-written backward."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models.projections import WEIGHT_GRAD_BLOCK, RowsDense, rows_matmul


def test_rows_matmul_gradients_match_numpy_at_blocked_and_unblocked_widths():
    rng = np.random.default_rng(0)
    for out in (7, WEIGHT_GRAD_BLOCK + 44):  # one dot, and (out > in) two column blocks of the weight gradient
        x = rng.normal(size=(13, 5)).astype(np.float32)
        w = rng.normal(size=(5, out)).astype(np.float32)
        upstream = rng.normal(size=(13, out)).astype(np.float32)
        dx, dw = jax.grad(lambda a, b: jnp.sum(rows_matmul(a, b) * upstream), argnums=(0, 1))(x, w)
        x64, w64, g64 = (v.astype(np.float64) for v in (x, w, upstream))
        np.testing.assert_allclose(np.asarray(rows_matmul(x, w)), x64 @ w64, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(dx), g64 @ w64.T, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(dw), x64.T @ g64, rtol=1e-5, atol=1e-5)


def test_rows_dense_has_nn_dense_params_forward_and_gradients():
    x = jax.random.normal(jax.random.key(0), (6, 4))
    ours, ref = RowsDense(300, kernel_init=nn.initializers.normal(0.02)), nn.Dense(300)
    params = ours.init(jax.random.key(1), x)
    params = jax.tree.map(lambda p: p + 0.1, params)  # non-zero bias
    assert jax.tree.structure(params) == jax.tree.structure(ref.init(jax.random.key(1), x))
    np.testing.assert_array_equal(np.asarray(ours.apply(params, x)), np.asarray(ref.apply(params, x)))

    def loss(module, p, inputs):
        return jnp.sum(jnp.sin(module.apply(p, inputs)))

    got = jax.grad(lambda p, inputs: loss(ours, p, inputs), argnums=(0, 1))(params, x)
    want = jax.grad(lambda p, inputs: loss(ref, p, inputs), argnums=(0, 1))(params, x)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
