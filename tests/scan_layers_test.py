"""scan_layers: params held stacked [G, ...] per period position give the unrolled model's numbers,
checkpoints, LoRA / int8 leaves, shardings, greedy tokens and trainer losses."""

import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.scan import STACKED, match_layout, stack_layers, unstack_layers
from models.transformer import Transformer, TransformerConfig, init_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
    # local x2 + global, separate local RoPE base, q/k norms: P = 3, one scanned group + layer 3 unrolled
    "gemma3_text": dict(
        family="gemma3_text",
        n_layers=4,
        sliding_window=3,
        qk_norm=True,
        rope_local_theta=10.0,
        query_pre_attn_scalar=8.0,
        activation="gelu_new",
        norm_eps=1e-6,
        layer_types=("sliding_attention", "sliding_attention", "full_attention", "sliding_attention"),
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


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def shapes(tree):
    return {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.mark.parametrize("name,remat", [("llama", False), ("gemma2", True), ("gemma3_text", False)])
def test_stacked_forward_and_gradients_equal_unrolled(name, remat):
    cfg = TransformerConfig(**SMALL, **FAMILIES[name], remat=remat)
    scan_cfg = cfg.replace(scan_layers=True)
    period, groups = {"llama": (1, 3), "gemma2": (2, 1), "gemma3_text": (3, 1)}[name]
    assert scan_cfg.layer_period() == period
    params = init_params(cfg, jax.random.key(1))
    stacked = stack_layers(params, scan_cfg)
    # The stacked layout is what the scanned model itself initialises (and what the train state holds).
    assert shapes(stacked) == shapes(jax.eval_shape(lambda: init_params(scan_cfg, jax.random.key(0))))
    assert sorted(stacked[STACKED]) == [f"p{j}" for j in range(period)]
    assert stacked[STACKED]["p0"]["attn"]["q_proj"]["kernel"].shape == (groups, 32, 32)
    assert [k for k in stacked if k.startswith("layers_") and k != STACKED] == (
        [] if name == "llama" else [f"layers_{cfg.n_layers - 1}"]
    )
    np.testing.assert_array_equal(
        stacked[STACKED]["p0"]["attn"]["q_proj"]["kernel"][-1],
        params[f"layers_{(groups - 1) * period}"]["attn"]["q_proj"]["kernel"],
    )
    assert_trees_equal(unstack_layers(stacked), params)
    ids, mask = batch()
    ref_value, ref_logits, ref_grads = forward_and_grads(cfg, params, ids, mask)
    value, logits, grads = forward_and_grads(scan_cfg, stacked, ids, mask)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-5)
    assert shapes(grads) == shapes(stacked)  # the gradients come out stacked
    assert_trees_close(unstack_layers(grads), ref_grads)
    if name == "llama":  # packed rows (segment ids) reach every scanned layer
        seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 3, 0]] * 3, jnp.int32)
        fwd = lambda c, p: Transformer(c).apply({"params": p}, ids, (seg > 0).astype(jnp.int32), segment_ids=seg)
        np.testing.assert_allclose(
            np.asarray(fwd(scan_cfg, stacked).logits), np.asarray(fwd(cfg, params).logits), rtol=1e-5, atol=1e-5
        )
    # One loop over the groups (with remat inside it), not n_layers block copies.
    jaxpr = str(jax.make_jaxpr(lambda p: Transformer(scan_cfg).apply({"params": p}, ids, mask).logits)(stacked))
    assert "scan" in jaxpr and ("checkpoint" in jaxpr or "remat" in jaxpr) == remat


def test_safetensors_round_trip_through_stacked_layout(tmp_path):
    from models.hf import load_hf_checkpoint, read_hf_folder, save_hf_checkpoint

    cfg = TransformerConfig(**SMALL, **FAMILIES["gemma2"])
    params = init_params(cfg, jax.random.key(1))
    save_hf_checkpoint(cfg, params, str(tmp_path / "plain"))
    scan_cfg, stacked = load_hf_checkpoint(str(tmp_path / "plain"), scan_layers=True)
    assert scan_cfg.scan_layers and scan_cfg == cfg.replace(scan_layers=True)
    assert_trees_equal(stacked, stack_layers(params, scan_cfg))  # stacked on load, bit for bit
    save_hf_checkpoint(scan_cfg, stacked, str(tmp_path / "scan"))  # unstacked on save
    plain_json, plain_tensors = read_hf_folder(str(tmp_path / "plain"))
    scan_json, scan_tensors = read_hf_folder(str(tmp_path / "scan"))
    assert plain_json == scan_json  # scan_layers is a run setting, not part of the HF config
    assert sorted(plain_tensors) == sorted(scan_tensors)
    for k in plain_tensors:
        np.testing.assert_array_equal(np.asarray(scan_tensors[k]), np.asarray(plain_tensors[k]), err_msg=k)
    _, reloaded = load_hf_checkpoint(str(tmp_path / "scan"))
    assert_trees_equal(reloaded, params)
    assert_trees_equal(match_layout(stacked, cfg), params)  # match_layout unstacks for an unrolled config


def test_lora_and_int8_on_stacked_leaves():
    from models.adapters import add_lora_and_quant
    from models.lora import add_lora_params, merge_lora
    from models.quant import quantize_params

    cfg = TransformerConfig(**SMALL, **FAMILIES["llama"])
    scan_cfg = cfg.replace(scan_layers=True)
    base = init_params(cfg, jax.random.key(1))
    lcfg, lora = add_lora_and_quant(
        cfg, base, lora_rank=2, lora_alpha=4.0, lora_targets=("q_proj", "down_proj"), lora_dropout=0.3,
        quant="", rng=jax.random.key(2), where="model",
    )  # fmt: skip
    lora = jax.tree_util.tree_map_with_path(  # adapters away from zero so they matter
        lambda p, x: x + 0.05 if "lora_b" in jax.tree_util.keystr(p) else x, lora
    )
    stacked = stack_layers(lora, scan_cfg)
    ids, mask = batch()
    # Without a dropout rng (scoring, evaluation): the unrolled model's values and gradients.
    _, ref_logits, ref_grads = forward_and_grads(lcfg, lora, ids, mask)
    _, logits, grads = forward_and_grads(lcfg.replace(scan_layers=True), stacked, ids, mask)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), rtol=1e-5, atol=1e-5)
    assert_trees_close(unstack_layers(grads), ref_grads)
    # With a dropout rng: per-group keys (nn.scan splits the rng), so other masks than the
    # unrolled model's; dropout is live and deterministic per key.
    drop = jax.jit(lambda key: Transformer(lcfg.replace(scan_layers=True)).apply(
        {"params": stacked}, ids, mask, rngs={"dropout": key}).logits * mask[..., None])  # fmt: skip
    d1, d2 = drop(jax.random.key(5)), drop(jax.random.key(5))
    np.testing.assert_array_equal(np.asarray(d1), np.asarray(d2))
    assert np.max(np.abs(np.asarray(d1) - np.asarray(logits))) > 1e-4
    # Adapters added to a stacked tree carry the leading [G] axis; merging equals the unrolled merge.
    fresh = add_lora_params(stack_layers(base, scan_cfg), lcfg.replace(scan_layers=True), jax.random.key(3))
    q = fresh[STACKED]["p0"]["attn"]["q_proj"]
    assert q["lora_a"].shape == (3, 32, 2) and q["lora_b"].shape == (3, 2, 32)
    assert float(jnp.max(jnp.abs(q["lora_a"]))) <= 1 / np.sqrt(32)  # U(-1/sqrt(in), 1/sqrt(in)), in = 32
    merged, _ = merge_lora(stacked, lcfg)
    assert_trees_close(unstack_layers(merged), merge_lora(lora, lcfg)[0], tol=1e-6)
    # int8: quantising the stacked tree = stacking the quantised layers (bit for bit); same forward.
    qstacked, qcfg = quantize_params(stack_layers(base, scan_cfg), cfg)
    qparams, _ = quantize_params(base, cfg)
    assert_trees_equal(unstack_layers(qstacked), qparams)
    assert qstacked[STACKED]["p0"]["mlp"]["down_proj"]["scale"].shape == (3, 32)
    run = lambda c, p: jax.jit(lambda p: Transformer(c).apply({"params": p}, ids, mask).logits)(p)
    np.testing.assert_allclose(
        np.asarray(run(qcfg.replace(scan_layers=True), qstacked)), np.asarray(run(qcfg, qparams)), rtol=1e-5, atol=1e-5
    )


def _sharded_worker(folder):
    """Loads `folder` stacked onto a (data=2, model=4) mesh; prints per-leaf shard facts as JSON."""
    from common.mesh import make_mesh
    from models.hf import load_hf_checkpoint, read_hf_folder
    from models.sharding import spec_for

    mesh = make_mesh((2, 4), ("data", "model"))
    config, params = load_hf_checkpoint(folder, mesh=mesh, scan_layers=True)
    _, tensors = read_hf_folder(folder)
    layers = range(config.n_layers)
    full = {
        f"{STACKED}/p0/attn/q_proj/kernel": np.stack([tensors[f"model.layers.{i}.self_attn.q_proj.weight"].T for i in layers]),
        f"{STACKED}/p0/mlp/down_proj/kernel": np.stack([tensors[f"model.layers.{i}.mlp.down_proj.weight"].T for i in layers]),
        f"{STACKED}/p0/attn_norm/scale": np.stack([tensors[f"model.layers.{i}.input_layernorm.weight"] for i in layers]),
        "embed/embedding": tensors["model.embed_tokens.weight"],
    }  # fmt: skip
    report = {"devices": jax.device_count()}
    for path, want in full.items():
        array = params
        for key in path.split("/"):
            array = array[key]
        shards = array.addressable_shards
        report[path] = {
            "shard_shapes": sorted({tuple(s.data.shape) for s in shards}),
            "shards_match": all(np.array_equal(np.asarray(s.data), np.asarray(want)[s.index]) for s in shards),
        }
    # LoRA adapters and int8 leaves of a stacked projection: None on the layer axis, the rule on the rest.
    stacked = f"opt_state/mu/backbone/{STACKED}/p0/attn/q_proj"
    report["specs"] = {
        leaf: [str(s) for s in spec_for(f"{stacked}/{leaf}", shape, mesh)]
        for leaf, shape in {"lora_a": (4, 64, 2), "lora_b": (4, 2, 64), "qvalue": (4, 64, 64), "scale": (4, 64)}.items()
    }
    print(json.dumps(report))


def test_stacked_state_shards_on_8_devices(tmp_path):
    from tests.hf_fixtures import make_tiny_hf_model

    folder = str(tmp_path / "llama")
    make_tiny_hf_model("llama", folder, d=64, layers=4, vocab_size=128)
    from tests.worker import run_worker

    report = run_worker(
        __file__, xla_flags="--xla_force_host_platform_device_count=8", args=("--worker", folder), timeout=300
    )
    assert report["devices"] == 8
    # [G=4, d=64, H*D=64]: layer axis whole, d over data (2), heads over model (4).
    assert report[f"{STACKED}/p0/attn/q_proj/kernel"]["shard_shapes"] == [[4, 32, 16]]
    assert report[f"{STACKED}/p0/mlp/down_proj/kernel"]["shard_shapes"] == [[4, 32, 32]]  # [G, F/4, d/2]
    assert report[f"{STACKED}/p0/attn_norm/scale"]["shard_shapes"] == [[4, 64]]  # replicated
    assert report["embed/embedding"]["shard_shapes"] == [[32, 32]]
    assert all(r["shards_match"] for k, r in report.items() if k not in ("devices", "specs"))
    assert report["specs"] == {
        "lora_a": ["None", "data", "None"],
        "lora_b": ["None", "None", "model"],
        "qvalue": ["None", "data", "model"],
        "scale": ["None", "model"],
    }


def test_greedy_sampling_equals_unrolled():
    from models.sampling import generate

    cfg = TransformerConfig(**SMALL, **FAMILIES["gemma2"], eos_token_id=-1)  # P = 2: stacked group + remainder
    params = init_params(cfg, jax.random.key(4))
    scan_cfg = cfg.replace(scan_layers=True)
    prompts = jax.random.randint(jax.random.key(7), (2, 5), 0, 64)
    mask = jnp.ones((2, 5), jnp.int32).at[1, :2].set(0)  # left padding
    ref = generate(params, cfg, prompts, mask, None, max_new_tokens=6, greedy=True)
    out = generate(stack_layers(params, scan_cfg), scan_cfg, prompts, mask, None, max_new_tokens=6, greedy=True)
    np.testing.assert_array_equal(np.asarray(out.response_ids), np.asarray(ref.response_ids))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs), atol=1e-5)


def test_rm_train_step_equal_with_stacked_params():
    from common.optim import make_optimizer
    from rm.model import RewardModel
    from rm.train import train_step

    cfg = TransformerConfig(**SMALL, **dict(FAMILIES["llama"], n_layers=2))
    ids, mask = batch(t=8)
    params = RewardModel(cfg).init(jax.random.key(0), ids, mask)["params"]
    tx, schedule = make_optimizer(
        learning_rate=1e-2, total_steps=4, warmup_steps=0, weight_decay=0.01, max_grad_norm=1.0
    )
    rej_ids, _ = batch(seed=3, t=8)
    b = {"chosen_ids": ids, "chosen_mask": mask, "rejected_ids": rej_ids, "rejected_mask": mask[::-1]}
    results = []
    for c in (cfg, cfg.replace(scan_layers=True)):
        p = match_layout(params, c)
        state = {
            "params": p,
            "opt_state": tx.init(p),
            "step": jnp.asarray(0, jnp.int32),
            "rng": jax.random.key_data(jax.random.key(1)),
        }
        step = jax.jit(
            functools.partial(
                train_step, model_config=c, tx=tx, schedule=schedule, accum_steps=1, center_coef=0.01,
                use_margin=False, nan_step=-1,
            )
        )  # fmt: skip
        results.append(step(state, b))
    (s0, m0), (s1, m1) = results
    assert float(m0["grad_norm"]) > 0
    assert_trees_close(m1, m0)  # loss, accuracy, grad_norm, ...
    # The optimizer state is stacked too. Compare the gradients through Adam's first moment
    # (mu = (1 - b1) g); not the new params: Adam's first step moves each weight by ~lr * sign(g),
    # which turns fp32 rounding of near-zero gradients into lr-sized differences.
    first_moment = lambda s: [
        x for p, x in jax.tree_util.tree_leaves_with_path(s["opt_state"]) if ".mu" in jax.tree_util.keystr(p)
    ]
    assert len(first_moment(s1)) == len(jax.tree.leaves(s1["params"])) < len(first_moment(s0))
    mu1 = jax.tree.unflatten(jax.tree.structure(s1["params"]), first_moment(s1))
    mu0 = jax.tree.unflatten(jax.tree.structure(s0["params"]), first_moment(s0))
    assert_trees_close(unstack_layers(mu1), mu0)
    assert int(s1["step"]) == 1


def test_configs_thread_scan_layers():
    from configs import ppo, rm, sft

    assert rm.get_config().model.scan_layers is False and sft.get_config().model.scan_layers is False
    c = ppo.get_config()
    assert c.policy.scan_layers is False and c.reward.scan_layers is False and c.value.scan_layers is False


@pytest.fixture(scope="module")
def rm_runs(tmp_path_factory):
    """A tiny GPT-2 policy and two 4-step RM runs on it, unrolled and with scan_layers."""
    import configs.rm as rm_config
    from rm.train import train
    from tests.rm_data_gen import make_rows, make_tiny_policy, write_jsonl

    d = tmp_path_factory.mktemp("scan_rm")
    make_tiny_policy(d)
    train_file = write_jsonl(d / "train.jsonl", make_rows(64, 0))
    runs = {}
    for scan in (False, True):
        c = rm_config.get_config("size=tiny")
        c.model.init_from, c.data.train_files, c.data.eval_files = str(d / "hf"), train_file, ""
        c.model.scan_layers = scan
        c.train.steps, c.train.log_every, c.train.eval_every, c.train.save_every = 4, 1, 0, 100
        runs[scan] = str(d / f"rm_{scan}")
        train(c, runs[scan])
    return d, runs


def _losses(workdir, key):
    lines = [json.loads(line) for line in open(f"{workdir}/metrics.jsonl")]
    return [line[key] for line in lines if key in line]


def test_rm_trainer_with_stacked_params(rm_runs):
    """model.scan_layers reaches the RM trainer: model_config.json records it, the checkpoint holds
    the stacked tree, and the per-step losses equal the unrolled run's."""
    from rm.model import load_reward_model

    _, runs = rm_runs
    for scan, workdir in runs.items():
        assert json.load(open(f"{workdir}/model_config.json"))["scan_layers"] is scan
    loaded = load_reward_model(runs[True])
    assert STACKED in loaded.params["backbone"]
    assert len(_losses(runs[True], "train/loss")) >= 3
    np.testing.assert_allclose(
        _losses(runs[True], "train/loss"), _losses(runs[False], "train/loss"), rtol=1e-4, atol=1e-5
    )


def test_sft_and_ppo_trainers_run_with_stacked_params(rm_runs, monkeypatch):
    """SFT (from a HF folder) and PPO (policy, reward and value all scanned; the reward from the RM run
    saved per layer, restored stacked: common.workdir.restore_params_stacked) train with scan_layers and
    checkpoint the stacked tree; the rollout's reward-model scores equal the unrolled reward model's."""
    import configs.ppo as ppo_config
    import configs.sft as sft_config
    from common.checkpoint import CheckpointManager
    from ppo.train import train as ppo_train
    from sft.train import train as sft_train
    from tests.rm_data_gen import NEUTRAL, corpus, write_jsonl

    d, runs = rm_runs
    c = sft_config.get_config("size=tiny")
    c.model.init_from, c.data.eval_files = str(d / "hf"), ""
    c.data.train_files = write_jsonl(d / "sft.jsonl", [{"text": t} for t in corpus()[:16]])
    c.model.scan_layers = True
    c.train.steps, c.train.log_every, c.train.eval_every, c.train.save_every = 1, 1, 0, 100
    sft_train(c, str(d / "sft"))
    losses = _losses(str(d / "sft"), "train/loss")
    assert len(losses) == 1 and np.isfinite(losses[0]) and losses[0] > 0
    rng = np.random.default_rng(0)
    c = ppo_config.get_config("size=tiny")
    c.policy.init_from, c.reward.workdir = str(d / "hf"), runs[False]
    c.data.prompt_files = write_jsonl(
        d / "prompts.jsonl", [{"prompt": "Review: " + " ".join(rng.choice(NEUTRAL, size=3))} for _ in range(16)]
    )
    c.policy.scan_layers = c.reward.scan_layers = c.value.scan_layers = True
    c.train.steps, c.train.log_every = 1, 1
    import ppo.train

    rollouts, write_samples = [], ppo.train._write_samples
    monkeypatch.setattr(ppo.train, "_write_samples", lambda *a: (rollouts.append(a[3]), write_samples(*a)))
    ppo_train(c, str(d / "ppo"))
    # The independent reference: the RM run's own (unrolled, per-layer) model scores the rollout's rows.
    from rm.model import compute_rewards, load_reward_model

    (rollout,) = rollouts
    reward = load_reward_model(runs[False])
    assert not reward.config.scan_layers and "layers_0" in reward.params["backbone"]
    ids = np.concatenate([np.asarray(rollout.query_ids), np.asarray(rollout.response_ids)], axis=1)
    mask = np.concatenate([np.asarray(rollout.query_mask), np.asarray(rollout.response_mask)], axis=1)
    want = np.asarray(compute_rewards(reward.config, reward.params, ids, mask))
    np.testing.assert_allclose(np.asarray(rollout.raw_scores), want, rtol=1e-5, atol=1e-5)
    assert np.ptp(want) > 1e-3  # rows differ, so a mix-up of rows or layers would show
    lines = [line for line in map(json.loads, open(d / "ppo" / "metrics.jsonl")) if "objective/scores" in line]
    assert len(lines) == 1 and all(np.isfinite(lines[0][k]) for k in ("objective/scores", "val/vf_loss"))
    for workdir in (d / "sft", d / "ppo"):
        ckpt = CheckpointManager(str(workdir / "checkpoints"), save_every=1)
        try:
            tree = ckpt.restore_subtree("params", step=ckpt.latest_step())[0]
        finally:
            ckpt.close()
        assert any(STACKED in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree))


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _sharded_worker(sys.argv[2])
