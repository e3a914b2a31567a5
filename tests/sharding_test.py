"""Tests for models/sharding.py.

Path -> logical-axis and spec rules are checked in-process against hand-written tables
(an AbstractMesh needs no devices). Real placement and numerics need 8 devices: this
pytest process already imported jax with one CPU device, so the multi-device checks run
in ONE subprocess (this file run as a script, `_worker`) with
XLA_FLAGS=--xla_force_host_platform_device_count=8 set before jax is imported; it prints
a JSON report that the test asserts on.
"""

from __future__ import annotations

import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests.worker import run_worker  # noqa: E402

# Tiny Llama-shaped model (qwen2 = llama + q/k/v biases). vocab 50 is NOT divisible by a
# 4- or 8-way model axis, so the vocab dim must fall back to replication.
TINY = dict(
    family="qwen2",
    vocab_size=50,
    d_model=32,
    n_layers=1,
    n_heads=4,
    n_kv_heads=2,
    head_dim=8,
    d_ff=64,
    max_position_embeddings=64,
    qkv_bias=True,
    pad_token_id=0,
)
MESHES = [(1, 8), (2, 4), (8, 1)]  # (data, model)
BATCH, SEQ, STEPS = 8, 12, 3


# ----------------------------------------------------------------------------- in-process


def test_logical_axes_by_path():
    from models.sharding import logical_axes

    expected = {
        ("backbone/embed/embedding", (50, 32)): ("vocab", "embed"),
        ("embed/embedding", (50, 32)): ("vocab", "embed"),
        ("pos_embed/embedding", (64, 32)): (None, "embed"),
        ("layers_0/attn/q_proj/kernel", (32, 32)): ("embed", "heads"),
        ("layers_0/attn/k_proj/kernel", (32, 16)): ("embed", "heads"),
        ("layers_0/attn/v_proj/kernel", (32, 16)): ("embed", "heads"),
        ("layers_0/attn/o_proj/kernel", (32, 32)): ("heads", "embed"),
        ("layers_1/mlp/gate_proj/kernel", (32, 64)): ("embed", "mlp"),
        ("layers_1/mlp/up_proj/kernel", (32, 64)): ("embed", "mlp"),
        ("layers_1/mlp/down_proj/kernel", (64, 32)): ("mlp", "embed"),
        ("lm_head/kernel", (32, 50)): ("embed", "vocab"),
        ("layers_0/attn/q_proj/bias", (32,)): ("heads",),
        ("layers_0/mlp/up_proj/bias", (64,)): ("mlp",),
        ("layers_0/mlp/down_proj/bias", (32,)): ("embed",),
        ("layers_0/attn_norm/scale", (32,)): (None,),
        ("layers_0/mlp_norm/bias", (32,)): (None,),
        ("backbone/final_norm/scale", (32,)): (None,),
        ("head/kernel", (32, 1)): (None, None),
        ("head/bias", (1,)): (None,),
        # LoRA adapters: A [in, r] follows the input dim, B [r, out] the output dim.
        ("layers_0/attn/q_proj/lora_a", (32, 4)): ("embed", None),
        ("layers_0/attn/q_proj/lora_b", (4, 32)): (None, "heads"),
        ("layers_0/mlp/down_proj/lora_a/kernel", (64, 4)): ("mlp", None),
        ("layers_0/attn/o_proj/lora_b", (4, 32)): (None, "embed"),
        # int8 weights: qvalue like the kernel, scale per output channel ([out] or [1, out]).
        ("layers_0/mlp/up_proj/qvalue", (32, 64)): ("embed", "mlp"),
        ("layers_0/mlp/up_proj/scale", (64,)): ("mlp",),
        ("layers_0/attn/o_proj/scale", (1, 32)): (None, "embed"),
        # Optimizer-state paths end with a param path.
        ("1/0/mu/backbone/layers_0/attn/q_proj/kernel", (32, 32)): ("embed", "heads"),
        ("inner_states/trainable/inner_state/1/0/nu/backbone/embed/embedding", (50, 32)): ("vocab", "embed"),
        # Layers stacked for scan: the leading dim is never split.
        ("layers/attn/q_proj/kernel", (2, 32, 32)): (None, "embed", "heads"),
        # Unknown paths, scalars and odd ranks are replicated.
        ("1/0/count", ()): (),
        ("rng", (2,)): (None,),
        ("step", ()): (),
        ("something/else/kernel", (32, 32)): (None, None),
        ("layers_0/attn/q_proj/kernel", (32,)): (None,),
        ("layers_0/attn/q_proj", (32, 32)): (None, None),
    }
    for (path, shape), axes in expected.items():
        assert logical_axes(path, shape) == axes, (path, shape, logical_axes(path, shape))


def test_spec_for_on_abstract_mesh():
    from jax.sharding import AbstractMesh
    from jax.sharding import PartitionSpec as P

    from models.sharding import DEFAULT_RULES, REPLICATED_RULES, spec_for

    mesh = AbstractMesh((2, 4), ("data", "model"))
    assert spec_for("layers_0/attn/q_proj/kernel", (32, 32), mesh) == P("data", "model")
    assert spec_for("embed/embedding", (64, 32), mesh) == P("model", "data")
    # 50 % 4 != 0: vocab replicated, embed still FSDP-split.
    assert spec_for("embed/embedding", (50, 32), mesh) == P(None, "data")
    assert spec_for("lm_head/kernel", (31, 50), mesh) == P(None, None)
    assert spec_for("layers_0/attn/q_proj/kernel", (32, 32), mesh, REPLICATED_RULES) == P(None, None)
    # Size-1 and missing mesh axes are dropped.
    assert spec_for("layers_0/attn/q_proj/kernel", (32, 32), AbstractMesh((8, 1), ("data", "model"))) == P("data", None)
    assert spec_for("layers_0/attn/q_proj/kernel", (32, 32), AbstractMesh((8,), ("data",))) == P("data", None)
    # Tuple targets split over several axes (product must divide); one axis used once per leaf.
    both = dict(DEFAULT_RULES, embed=("data", "model"))
    assert spec_for("layers_0/mlp/down_proj/kernel", (64, 32), mesh, both) == P("model", "data")
    assert spec_for("layers_0/attn/q_proj/kernel", (32, 32), mesh, both) == P(("data", "model"), None)
    assert spec_for("layers_0/attn/q_proj/kernel", (12, 32), mesh, both) == P(None, "model")
    # Rules as (name, axes) pairs: first wins.
    pairs = [("embed", None), ("heads", "model"), ("heads", "data")]
    assert spec_for("layers_0/attn/k_proj/kernel", (32, 16), mesh, pairs) == P(None, "model")
    assert spec_for("1/0/count", (), mesh) == P()


# ----------------------------------------------------------------------------- subprocess


def _expected_param_specs(mesh_shape):
    """Hand-written specs of the TINY reward model on a (data, model) mesh."""
    data, model = mesh_shape

    def ax(name, size, dim):
        return name if size > 1 and dim % size == 0 else None

    d, kv, q, f, v = 32, 16, 32, 64, 50
    E = lambda dim: ax("data", data, dim)  # noqa: E731  'embed'
    M = lambda dim: ax("model", model, dim)  # noqa: E731  'heads' / 'mlp' / 'vocab'
    out = {
        "backbone/embed/embedding": [M(v), E(d)],
        "backbone/final_norm/scale": [None],
        "head/kernel": [None, None],
        "head/bias": [None],
    }
    for i in range(TINY["n_layers"]):
        pre = f"backbone/layers_{i}"
        out.update(
            {
                f"{pre}/attn_norm/scale": [None],
                f"{pre}/mlp_norm/scale": [None],
                f"{pre}/attn/q_proj/kernel": [E(d), M(q)],
                f"{pre}/attn/q_proj/bias": [M(q)],
                f"{pre}/attn/k_proj/kernel": [E(d), M(kv)],
                f"{pre}/attn/k_proj/bias": [M(kv)],
                f"{pre}/attn/v_proj/kernel": [E(d), M(kv)],
                f"{pre}/attn/v_proj/bias": [M(kv)],
                f"{pre}/attn/o_proj/kernel": [M(q), E(d)],
                f"{pre}/mlp/gate_proj/kernel": [E(d), M(f)],
                f"{pre}/mlp/up_proj/kernel": [E(d), M(f)],
                f"{pre}/mlp/down_proj/kernel": [M(f), E(d)],
            }
        )
    return out


def test_multi_device_shardings_and_train_step_equivalence():
    # The two LLVM flags halve XLA:CPU compile time (the bulk of this test); every run in the
    # worker, single-device baseline included, is compiled with them.
    flags = (
        "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
        "--xla_llvm_disable_expensive_passes=true"
    )
    t0 = time.time()
    report = run_worker(__file__, xla_flags=flags, timeout=300)
    print(f"sharding worker: {time.time() - t0:.1f}s, timings {report['timings']}")
    assert report["device_count"] == 8

    # (1) Specs on a (2, 4) mesh, for the params and for Adam's moments (suffix match).
    expected = _expected_param_specs((2, 4))
    assert report["param_specs"] == expected
    for path, spec in expected.items():
        assert report["opt_specs"][f"1/0/mu/{path}"] == spec
        assert report["opt_specs"][f"1/0/nu/{path}"] == spec
    assert report["opt_specs"]["1/0/count"] == [] and report["opt_specs"]["1/2/count"] == []
    # Frozen leaves under multi_transform leave no state behind; trainable ones keep their specs.
    assert report["masked_opt_specs"] == {
        "inner_states/trainable/inner_state/1/0/count": [],
        "inner_states/trainable/inner_state/1/0/mu/head/kernel": [None, None],
        "inner_states/trainable/inner_state/1/0/mu/head/bias": [None],
        "inner_states/trainable/inner_state/1/0/nu/head/kernel": [None, None],
        "inner_states/trainable/inner_state/1/0/nu/head/bias": [None],
        "inner_states/trainable/inner_state/1/2/count": [],
    }
    # abstract_sharded + jit(out_shardings): same values as a plain init, placed by the rules.
    init = report["sharded_init"]
    assert init["max_abs_diff"] < 1e-6  # same random bits; jit may fuse the normal transform differently
    assert init["specs"] == expected
    assert init["abstract_specs"] == expected
    assert init["q_kernel_shard_shape"] == [16, 8]  # [32, 32] split 2 (data) x 4 (model)
    assert init["embedding_shard_shape"] == [50, 16]  # vocab 50 not divisible by 4: replicated

    # (2) Three RM train steps: same losses and params on one device and on every mesh.
    single = report["single"]
    assert single["param_change"] > 1e-4, "the steps must move the params for the comparison to mean anything"
    for name, run in report["meshes"].items():
        mesh_shape = tuple(int(x) for x in name.split("x"))
        assert run["state_specs"] == _expected_param_specs(mesh_shape), name
        assert run["mu_specs"] == _expected_param_specs(mesh_shape), name
        for a, b in zip(run["losses"], single["losses"]):
            assert abs(a - b) < 1e-5, (name, run["losses"], single["losses"])
        assert run["max_param_diff"] < 1e-5, (name, run["max_param_diff"])
        assert run["max_mu_diff"] < 1e-5, (name, run["max_mu_diff"])


def _worker():
    """Runs under 8 fake CPU devices; prints one JSON line."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from common.mesh import batch_sharding, make_mesh, replicated, shard_batch
    from common.optim import make_optimizer
    from models.sharding import abstract_sharded, param_path, param_shardings, tree_partition_specs, tree_shardings
    from models.transformer import TransformerConfig
    from rm.model import RewardModel
    from rm.train import train_step

    timings = {}
    t = time.time()
    cfg = TransformerConfig(**TINY)
    model = RewardModel(cfg)
    ids1 = jnp.ones((1, 4), jnp.int32)

    def init_fn():
        return model.init(jax.random.key(0), ids1, jnp.ones_like(ids1))["params"]

    def flat_specs(specs):
        leaves = jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
        return {param_path(p): list(s) for p, s in leaves}

    def flat(tree):
        return {param_path(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}

    tx, schedule = make_optimizer(
        learning_rate=1e-3, total_steps=10, warmup_steps=0, weight_decay=0.01, max_grad_norm=1.0
    )
    mesh24 = make_mesh((2, 4))
    shapes = jax.eval_shape(init_fn)
    report = {"device_count": jax.device_count()}
    report["param_specs"] = flat_specs(tree_partition_specs(shapes, mesh24))
    report["opt_specs"] = flat_specs(tree_partition_specs(jax.eval_shape(tx.init, shapes), mesh24))
    masked_tx, _ = make_optimizer(
        learning_rate=1e-3, total_steps=10, warmup_steps=0, trainable=lambda path: path.startswith("head")
    )
    report["masked_opt_specs"] = flat_specs(tree_partition_specs(jax.eval_shape(masked_tx.init, shapes), mesh24))

    # Create params already sharded (style rule 8) and compare with a plain init.
    abstract, shardings = abstract_sharded(init_fn, mesh24)
    sharded = jax.jit(init_fn, out_shardings=shardings)()
    plain = jax.device_get(jax.jit(init_fn)())
    diffs = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), sharded, plain)
    q = sharded["backbone"]["layers_0"]["attn"]["q_proj"]["kernel"]
    emb = sharded["backbone"]["embed"]["embedding"]
    report["sharded_init"] = {
        "max_abs_diff": max(jax.tree.leaves(diffs)),
        "specs": flat_specs(jax.tree.map(lambda x: x.sharding.spec, sharded)),
        "abstract_specs": flat_specs(jax.tree.map(lambda x: x.sharding.spec, abstract)),
        "q_kernel_shard_shape": list(q.addressable_shards[0].data.shape),
        "embedding_shard_shape": list(emb.addressable_shards[0].data.shape),
    }
    timings["specs_and_init_s"] = round(time.time() - t, 2)

    # ---- train-step equivalence
    params0 = plain
    state0 = jax.device_get(
        {
            "params": params0,
            "opt_state": tx.init(params0),
            "step": jnp.asarray(0, jnp.int32),
            "rng": jax.random.key_data(jax.random.key(1)),
        }
    )
    rs = np.random.RandomState(0)
    batches = []
    for _ in range(STEPS):
        b = {}
        for side in ("chosen", "rejected"):
            lengths = rs.randint(3, SEQ + 1, size=BATCH)
            mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int32)  # right padding
            b[f"{side}_ids"] = (rs.randint(1, cfg.vocab_size, size=(BATCH, SEQ)) * mask).astype(np.int32)
            b[f"{side}_mask"] = mask
        batches.append(b)
    step = functools.partial(
        train_step,
        model_config=cfg,
        tx=tx,
        schedule=schedule,
        accum_steps=1,
        center_coef=0.01,
        use_margin=False,
        nan_step=-1,
    )

    def run(step_fn, state, place_batch):
        losses = []
        for b in batches:
            state, m = step_fn(state, place_batch(b))
            losses.append(float(m["loss"]))
        return state, losses

    t = time.time()
    single_state, single_losses = run(
        jax.jit(step), jax.device_put(state0, jax.devices()[0]), lambda b: jax.device_put(b, jax.devices()[0])
    )
    single_params = flat(single_state["params"])
    single_mu = flat(single_state["opt_state"][1][0].mu)
    init_flat = flat(params0)
    report["single"] = {
        "losses": single_losses,
        "param_change": max(float(np.max(np.abs(single_params[k] - init_flat[k]))) for k in init_flat),
    }
    timings["single_device_s"] = round(time.time() - t, 2)

    report["meshes"] = {}
    for shape in MESHES:
        t = time.time()
        mesh = make_mesh(shape)
        state_sharding = tree_shardings(state0, mesh)
        assert jax.tree.structure(param_shardings(params0, mesh)) == jax.tree.structure(params0)
        step_fn = jax.jit(
            step,
            in_shardings=(state_sharding, batch_sharding(mesh)),
            out_shardings=(state_sharding, replicated(mesh)),
            donate_argnums=(0,),
        )
        state, losses = run(step_fn, jax.device_put(state0, state_sharding), lambda b: shard_batch(b, mesh))
        params, mu = flat(state["params"]), flat(state["opt_state"][1][0].mu)
        report["meshes"]["x".join(map(str, shape))] = {
            "losses": losses,
            "max_param_diff": max(float(np.max(np.abs(params[k] - single_params[k]))) for k in params),
            "max_mu_diff": max(float(np.max(np.abs(mu[k] - single_mu[k]))) for k in mu),
            "state_specs": flat_specs(jax.tree.map(lambda x: x.sharding.spec, state["params"])),
            "mu_specs": flat_specs(jax.tree.map(lambda x: x.sharding.spec, state["opt_state"][1][0].mu)),
        }
        timings["x".join(map(str, shape)) + "_s"] = round(time.time() - t, 2)
    report["timings"] = timings
    print(json.dumps(report))


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()
