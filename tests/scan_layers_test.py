"""scan_layers: the layers through one lax.scan give the unrolled model's numbers and parameters."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.transformer import Transformer, TransformerConfig, init_params

SMALL = dict(vocab_size=64, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48)
FAMILIES = {
    # uniform: P = 1, all three layers scanned
    "llama": dict(family="llama", n_layers=3),
    # alternating local/global: P = 2, one scanned group (layers 0-1) + layer 2 unrolled
    "gemma2": dict(
        family="gemma2",
        n_layers=3,
        sliding_window=3,
        attn_softcap=20.0,
        final_softcap=15.0,
        query_pre_attn_scalar=8.0,
        activation="gelu_new",
        norm_eps=1e-6,
        layer_types=("sliding_attention", "full_attention", "sliding_attention"),
    ),
    # local x2 + global, separate local RoPE base, q/k norms: P = 3, two scanned groups + layer 6 unrolled
    "gemma3_text": dict(
        family="gemma3_text",
        n_layers=7,
        sliding_window=3,
        qk_norm=True,
        rope_local_theta=10.0,
        query_pre_attn_scalar=8.0,
        activation="gelu_new",
        norm_eps=1e-6,
        layer_types=("sliding_attention", "sliding_attention", "full_attention") * 2 + ("sliding_attention",),
    ),
}


def batch(seed=0, b=3, t=9, vocab=64):
    ids = jax.random.randint(jax.random.key(seed), (b, t), 0, vocab)
    mask = jnp.ones((b, t), jnp.int32).at[1, :3].set(0).at[2, 6:].set(0)  # left and right padding
    return ids, mask


def forward_and_grads(cfg, params, ids, mask, rngs=None):
    def loss(p):
        out = Transformer(cfg).apply({"params": p}, ids, mask, rngs=rngs)
        w = mask[..., None].astype(jnp.float32)  # padded positions are never read
        return jnp.mean(jnp.sin(out.logits) * w) + jnp.mean(out.hidden_states**2 * w), out.logits * w

    (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return value, logits, grads


def assert_trees_close(a, b, tol=1e-5):
    """Every leaf within tol of the reference, relative to the leaf's largest entry (fp32 sums
    over several layers reorder at ~1e-6 of the scale; small entries of a big leaf carry that)."""
    assert jax.tree.structure(a) == jax.tree.structure(b)

    def close(x, y):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        assert x.shape == y.shape
        np.testing.assert_array_less(np.abs(x - y), tol * np.max(np.abs(y), initial=0.0) + 1e-7)

    jax.tree.map(close, a, b)


@pytest.mark.parametrize("name,remat", [("llama", False), ("gemma2", True), ("gemma3_text", False)])
def test_scanned_forward_and_gradients_equal_unrolled(name, remat):
    cfg = TransformerConfig(**SMALL, **FAMILIES[name], remat=remat)
    scan_cfg = cfg.replace(scan_layers=True)
    assert scan_cfg.layer_period() == {"llama": 1, "gemma2": 2, "gemma3_text": 3}[name]
    params = init_params(cfg, jax.random.key(1))
    ids, mask = batch()
    ref_value, ref_logits, ref_grads = forward_and_grads(cfg, params, ids, mask)
    value, logits, grads = forward_and_grads(scan_cfg, params, ids, mask)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-5)
    assert_trees_close(grads, ref_grads)
    # The scanned program really has one loop (and remat inside it), not n_layers block copies.
    jaxpr = str(jax.make_jaxpr(lambda p: Transformer(scan_cfg).apply({"params": p}, ids, mask).logits)(params))
    assert "scan" in jaxpr and ("checkpoint" in jaxpr or "remat" in jaxpr) == remat


def test_lora_int8_and_dropout():
    from models.adapters import add_lora_and_quant
    from models.quant import quantize_params

    cfg = TransformerConfig(**SMALL, **FAMILIES["llama"])
    base = init_params(cfg, jax.random.key(1))
    lcfg, params = add_lora_and_quant(
        cfg,
        base,
        lora_rank=2,
        lora_alpha=4.0,
        lora_targets=("q_proj", "down_proj"),
        lora_dropout=0.3,
        quant="",
        rng=jax.random.key(2),
        where="model",
    )
    # adapters away from zero so they matter in the comparison
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: x + 0.05 if "lora_b" in jax.tree_util.keystr(p) else x, params
    )
    ids, mask = batch()
    # Without a dropout rng (scoring, evaluation): equal to the unrolled model.
    _, ref_logits, ref_grads = forward_and_grads(lcfg, params, ids, mask)
    _, logits, grads = forward_and_grads(lcfg.replace(scan_layers=True), params, ids, mask)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), rtol=1e-5, atol=1e-5)
    assert_trees_close(grads, ref_grads)
    # With a dropout rng: a different mask than the unrolled model (per-layer keys by fold_in of the
    # layer index, not of module paths), so the check is that dropout is live, deterministic per
    # key, and with dropout 0 the same rng gives the unrolled numbers.
    scan = lcfg.replace(scan_layers=True)
    rngs = {"dropout": jax.random.key(5)}
    _, d1, _ = forward_and_grads(scan, params, ids, mask, rngs)
    _, d2, _ = forward_and_grads(scan, params, ids, mask, rngs)
    _, d3, _ = forward_and_grads(scan, params, ids, mask, {"dropout": jax.random.key(6)})
    np.testing.assert_array_equal(np.asarray(d1), np.asarray(d2))
    assert np.max(np.abs(np.asarray(d1) - np.asarray(logits))) > 1e-4
    assert np.max(np.abs(np.asarray(d1) - np.asarray(d3))) > 1e-4
    _, d0, _ = forward_and_grads(scan.replace(lora_dropout=0.0), params, ids, mask, rngs)
    np.testing.assert_allclose(np.asarray(d0), np.asarray(ref_logits), rtol=1e-5, atol=1e-5)
    # int8 QuantDense leaves (qvalue, scale) stack like any other leaf (forward only: int8 has no gradient).
    qparams, qcfg = quantize_params(base, cfg)
    run = lambda c: jax.jit(lambda p: Transformer(c).apply({"params": p}, ids, mask).logits)(qparams)
    np.testing.assert_allclose(
        np.asarray(run(qcfg.replace(scan_layers=True))), np.asarray(run(qcfg)), rtol=1e-5, atol=1e-5
    )


def test_params_and_checkpoint_unchanged(tmp_path):
    from models.hf import load_hf_checkpoint, read_hf_folder, save_hf_checkpoint

    cfg = TransformerConfig(**SMALL, **FAMILIES["gemma2"])
    scan_cfg = cfg.replace(scan_layers=True)
    shapes = lambda tree: {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(tree)}
    params = init_params(scan_cfg, jax.random.key(1))
    assert shapes(params) == shapes(init_params(cfg, jax.random.key(1)))
    assert "layers_2" in params and all(x.ndim <= 2 for x in jax.tree.leaves(params))  # no stacked leaves
    save_hf_checkpoint(cfg, params, str(tmp_path / "plain"))
    save_hf_checkpoint(scan_cfg, params, str(tmp_path / "scan"))
    plain_cfg_json, plain_tensors = read_hf_folder(str(tmp_path / "plain"))
    scan_cfg_json, scan_tensors = read_hf_folder(str(tmp_path / "scan"))
    assert plain_cfg_json == scan_cfg_json  # scan_layers is a run setting, not part of the HF config
    assert {k: v.shape for k, v in plain_tensors.items()} == {k: v.shape for k, v in scan_tensors.items()}
    assert any(k.startswith("model.layers.2.") for k in scan_tensors)
    _, loaded = load_hf_checkpoint(str(tmp_path / "scan"))
    assert_trees_close(loaded, params, tol=0)


def test_rm_train_step_equal_with_scan():
    from common.optim import make_optimizer
    from rm.model import RewardModel
    from rm.train import train_step

    cfg = TransformerConfig(**SMALL, **dict(FAMILIES["llama"], n_layers=2))
    ids, mask = batch(t=8)
    params = RewardModel(cfg).init(jax.random.key(0), ids, mask)["params"]
    tx, schedule = make_optimizer(
        learning_rate=1e-2, total_steps=4, warmup_steps=0, weight_decay=0.01, max_grad_norm=1.0
    )
    state = {
        "params": params,
        "opt_state": tx.init(params),
        "step": jnp.asarray(0, jnp.int32),
        "rng": jax.random.key_data(jax.random.key(1)),
    }
    rej_ids, _ = batch(seed=3, t=8)
    b = {"chosen_ids": ids, "chosen_mask": mask, "rejected_ids": rej_ids, "rejected_mask": mask[::-1]}
    results = []
    for c in (cfg, cfg.replace(scan_layers=True)):
        step = jax.jit(
            functools.partial(
                train_step,
                model_config=c,
                tx=tx,
                schedule=schedule,
                accum_steps=1,
                center_coef=0.01,
                use_margin=False,
                nan_step=-1,
            )
        )
        results.append(step(state, b))
    (s0, m0), (s1, m1) = results
    assert float(m0["grad_norm"]) > 0
    assert_trees_close(m1, m0)  # loss, accuracy, grad_norm, ...
    # The gradients, through Adam's first moment (mu = (1 - b1) g). Not the new params: Adam's first
    # step moves each weight by ~lr * sign(g), which turns fp32 rounding of near-zero gradients
    # into lr-sized differences.
    first_moment = lambda s: [
        x for p, x in jax.tree_util.tree_leaves_with_path(s["opt_state"]) if ".mu" in jax.tree_util.keystr(p)
    ]
    assert len(first_moment(s0)) == len(jax.tree.leaves(params))
    assert_trees_close(first_moment(s1), first_moment(s0))
    assert int(s1["step"]) == 1


def test_configs_thread_scan_layers():
    from configs import ppo, rm, sft

    assert rm.get_config().model.scan_layers is False and sft.get_config().model.scan_layers is False
    c = ppo.get_config()
    assert c.policy.scan_layers is False and c.reward.scan_layers is False


def test_rm_trainer_threads_scan_layers(tmp_path):
    """configs/rm.py model.scan_layers reaches the trainer: the saved model_config.json records it and
    a short run's losses equal the unrolled run's."""
    import json

    import configs.rm as rm_config
    from rm.train import train
    from tests.rm_data_gen import make_rows, make_tiny_policy, write_jsonl

    make_tiny_policy(tmp_path)
    train_file = write_jsonl(tmp_path / "train.jsonl", make_rows(64, 0))
    losses = {}
    for scan in (False, True):
        c = rm_config.get_config("size=tiny")
        c.model.init_from, c.data.train_files, c.data.eval_files = str(tmp_path / "hf"), train_file, ""
        c.model.scan_layers = scan
        c.train.steps, c.train.log_every, c.train.eval_every, c.train.save_every = 4, 1, 0, 100
        workdir = str(tmp_path / f"run_{scan}")
        train(c, workdir)
        assert json.load(open(f"{workdir}/model_config.json"))["scan_layers"] is scan
        lines = [json.loads(line) for line in open(f"{workdir}/metrics.jsonl")]
        losses[scan] = [line["train/loss"] for line in lines if "train/loss" in line]
    assert len(losses[True]) >= 3
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4, atol=1e-5)
