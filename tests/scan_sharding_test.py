"""Inside the layer scan: bf16 leaves and carries passed as float16 bits give bit-identical numbers, and
under `models.sharding.layer_sharding` each layer's weight gradient stays sharded on an FSDP mesh."""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests.worker import run_worker  # noqa: E402

SMALL = dict(vocab_size=64, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64, pad_token_id=0)
GEMMA2 = dict(
    family="gemma2",
    n_layers=3,
    sliding_window=3,
    attn_softcap=20.0,
    final_softcap=15.0,
    query_pre_attn_scalar=8.0,
    activation="gelu_new",
    layer_types=("sliding_attention", "full_attention", "sliding_attention"),
)  # P = 2: one scanned group + one unrolled layer


def test_bits_path_is_bit_exact():
    """bf16 + remat, stacked: forward and gradients with the float16-bits path equal those with it
    switched off, bit for bit. XLA's excess precision is off for both compiles: XLA:CPU otherwise
    may keep a bf16 value in float32 across ops, so equal programs with different op boundaries
    could round differently."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import models.scan as scan
    from models.transformer import Transformer, TransformerConfig, init_params

    ids = jax.random.randint(jax.random.key(1), (2, 7), 1, 64)
    mask = jnp.ones_like(ids).at[0, :2].set(0)
    for family in (dict(family="llama", n_layers=3), GEMMA2):
        cfg = TransformerConfig(
            **SMALL, **family, dtype="bfloat16", param_dtype="bfloat16", remat=True, scan_layers=True,
            lora_rank=2, lora_targets=("q_proj", "down_proj"), lora_dropout=0.25,
        )  # fmt: skip
        params = init_params(cfg, jax.random.key(0))

        def loss(p, cfg=cfg):
            out = Transformer(cfg).apply({"params": p}, ids, mask, rngs={"dropout": jax.random.key(3)})
            return jnp.sum(out.logits * mask[..., None]), out.logits

        runs = []
        for on in (True, False):
            uses_bits = scan._uses_bits
            scan._uses_bits = uses_bits if on else (lambda c: False)
            try:
                lowered = jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(params)
                compiled = lowered.compile({"xla_allow_excess_precision": False})
                runs.append((jax.device_get(compiled(params)), "xf16>" in lowered.as_text()))  # float16 bits
            finally:
                scan._uses_bits = uses_bits
        (with_bits, ran), (without, ran_off) = runs
        assert ran and not ran_off, family  # the bits path ran, and only when on
        grads = jax.tree.leaves(with_bits[1])
        assert sum(float(jnp.sum(jnp.abs(g.astype(jnp.float32)))) for g in grads) > 0
        for x, y in zip(jax.tree.leaves(with_bits), jax.tree.leaves(without)):
            np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def _sharding_worker(report):
    """One RM train step of a stacked model on a data=8 FSDP mesh under layer_sharding vs the same
    step on one device (metrics, new params); the sharding of the stacked gradient it produces."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from common.mesh import batch_sharding, make_mesh, replicated
    from common.optim import make_optimizer
    from models.sharding import DEFAULT_RULES, tree_shardings, with_layer_sharding
    from models.transformer import TransformerConfig
    from rm.model import RewardModel
    from rm.train import train_step

    cfg = TransformerConfig(**SMALL, family="llama", n_layers=4, scan_layers=True, remat=True)
    b, t = 8, 16
    keys = jax.random.split(jax.random.key(0), 3)
    ids = jax.random.randint(keys[0], (2, b, t), 1, 64)
    mask = jnp.ones((b, t), jnp.int32).at[1, :5].set(0)
    batch = {"chosen_ids": ids[0], "chosen_mask": mask, "rejected_ids": ids[1], "rejected_mask": mask[::-1]}
    params = RewardModel(cfg).init(keys[1], ids[0], mask)["params"]
    tx, schedule = make_optimizer(learning_rate=1e-2, total_steps=4, warmup_steps=0, max_grad_norm=1.0)
    state = {
        "params": params,
        "opt_state": tx.init(params),
        "step": jnp.asarray(0, jnp.int32),
        "rng": jax.random.key_data(keys[2]),
    }
    step = functools.partial(
        train_step, model_config=cfg, tx=tx, schedule=schedule, accum_steps=1, center_coef=0.01, use_margin=False,
        nan_step=-1,
    )  # fmt: skip
    one = jax.device_get(jax.jit(step)(state, batch, None))
    mesh = make_mesh((8, 1), ("data", "model"))
    shardings = tree_shardings(state, mesh, DEFAULT_RULES)
    placed = jax.device_put(state, shardings)

    def grads_fn(p):  # the stacked gate_proj gradient as the scan's backward pass leaves it
        def loss(p):
            return jnp.sum(RewardModel(cfg).apply({"params": p}, batch["chosen_ids"], batch["chosen_mask"]) ** 2)

        return jax.grad(loss)(p)["backbone"]["layers_stacked"]["p0"]["mlp"]["gate_proj"]["kernel"]

    for name in ("constrained",):  # (GSPMD alone leaves this gradient whole: benchmarks/memory_peak.py figures)
        wrap = lambda f: with_layer_sharding(f, mesh, DEFAULT_RULES)  # noqa: E731
        jitted = jax.jit(
            wrap(step),
            in_shardings=(shardings, batch_sharding(mesh), None),
            out_shardings=(shardings, replicated(mesh)),
        )
        compiled = jitted.lower(placed, jax.device_put(batch, batch_sharding(mesh)), None).compile()
        new_state, metrics = jax.device_get(compiled(placed, jax.device_put(batch, batch_sharding(mesh)), None))
        grad = jax.jit(wrap(grads_fn))(placed["params"])  # no out_shardings: the sharding the scan's backward gives it
        diffs = [
            float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
            for x, y in zip(jax.tree.leaves(new_state["params"]), jax.tree.leaves(one[0]["params"]))
        ]
        report[name] = {
            "grad_spec": [str(s) for s in grad.sharding.spec] if hasattr(grad.sharding, "spec") else str(grad.sharding),
            "grad_shard_shapes": sorted({tuple(s.data.shape) for s in grad.addressable_shards}),
            "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
            "param_max_diff": max(diffs),
            "metric_diffs": {k: abs(float(metrics[k]) - float(one[1][k])) for k in ("loss", "accuracy", "grad_norm")},
        }
    report["grad_shape"] = list(np.shape(np.asarray(grad)))


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    out = {}
    _sharding_worker(out)
    print(json.dumps(out))


def test_layer_sharding_on_8_devices():
    report = run_worker(__file__, xla_flags="--xla_force_host_platform_device_count=8")
    # [G=4, d=32, F=64]: d over data=8 -> each device holds [4, 4, 64] of the gradient.
    assert report["grad_shape"] == [4, 32, 64]
    assert report["constrained"]["grad_spec"][:2] == ["None", "data"], report["constrained"]
    assert report["constrained"]["grad_shard_shapes"] == [[4, 4, 64]]
    assert report["constrained"]["param_max_diff"] < 1e-5, report["constrained"]  # the step equals one device's
    assert max(report["constrained"]["metric_diffs"].values()) < 1e-5, report["constrained"]
