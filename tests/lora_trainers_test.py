"""LoRA and int8 in the trainers: only adapters and heads train, the base stays bit-identical,
optimizer moments exist only for trainable leaves, exports are merged, and PPO runs with a
LoRA policy whose reference is the policy with its adapters switched off and an int8 reward."""

import json
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs.ppo as ppo_config
import configs.rm as rm_config
from common import data_io
from common.checkpoint import CheckpointManager
from models.hf import load_hf_checkpoint
from models.lora import LORA_LEAVES
from models.quant import quantize_params
from models.sharding import param_path
from ppo.train import train as ppo_train
from rm import data as rm_data
from rm.final_eval import evaluate
from rm.model import load_reward_model, rm_params_from_backbone
from rm.train import pair_rewards
from rm.train import train as rm_train
from tests.rm_data_gen import NEUTRAL, make_rows, make_tiny_policy, write_jsonl


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora")
    make_tiny_policy(d)
    rng = np.random.default_rng(0)
    prompts = [{"prompt": "Review: " + " ".join(rng.choice(NEUTRAL, size=int(rng.integers(2, 5))))} for _ in range(32)]
    return {
        "dir": d,
        "hf": str(d / "hf"),
        "train": write_jsonl(d / "train.jsonl", make_rows(400, 0)),
        "eval": write_jsonl(d / "eval.jsonl", make_rows(64, 1)),
        "prompts": write_jsonl(d / "prompts.jsonl", prompts),
    }


def rm_cfg(setup, **model):
    c = rm_config.get_config("size=tiny")
    c.model.init_from, c.data.train_files, c.data.eval_files = setup["hf"], setup["train"], setup["eval"]
    c.train.eval_every = 0
    c.train.learning_rate = 3e-3  # adapters (scale alpha / r = 2) and the head train fast at this rate
    for key, value in model.items():
        setattr(c.model, key, value)
    return c


def flat(tree):
    return {param_path(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def is_adapter_or_head(path):
    parts = path.split("/")
    return any(p in LORA_LEAVES or p in ("head", "value_head") for p in parts)


def restore(workdir, key):
    ckpt = CheckpointManager(os.path.join(workdir, "checkpoints"), save_every=1)
    try:
        return ckpt.restore_subtree(key)[0]
    finally:
        ckpt.close()


@pytest.fixture(scope="module")
def lora_rm(setup):
    workdir = str(setup["dir"] / "rm_lora")
    start = time.time()
    c = rm_cfg(setup, lora_rank=8, lora_alpha=16.0)
    c.train.steps = 30
    summary = rm_train(c, workdir)
    return workdir, summary, time.time() - start


@pytest.fixture(scope="module")
def qlora_rm(setup):
    workdir = str(setup["dir"] / "rm_qlora")
    c = rm_cfg(setup, lora_rank=4, lora_alpha=8.0, quant="int8")
    c.train.steps, c.train.log_every = 5, 1
    return workdir, rm_train(c, workdir)


def test_lora_rm_learns_with_frozen_base(setup, lora_rm):
    workdir, summary, seconds = lora_rm
    print(f"LoRA RM: {seconds:.1f}s, eval accuracy {summary['eval/accuracy']:.3f}")
    # Accuracy of the untrained model (base + the same fresh head; B = 0 makes the adapters a no-op).
    cfg, backbone = load_hf_checkpoint(setup["hf"])
    tok = data_io.load_tokenizer(setup["hf"])
    cfg = cfg.replace(pad_token_id=cfg.pad_token_id if cfg.pad_token_id is not None else tok.pad_token_id)
    init = rm_params_from_backbone(cfg, backbone, jax.random.fold_in(jax.random.key(0), 1))
    data = rm_data.load_preference_data([setup["eval"]], tok, max_length=64, on_bad_row="error")
    chosen, rejected = evaluate(jax.jit(lambda p, b: pair_rewards(cfg, p, b)), init, data, batch_size=32, bucket=0)
    init_acc = float(np.mean(chosen > rejected))
    assert summary["eval/accuracy"] >= 0.9 and summary["eval/accuracy"] > init_acc + 0.2, (init_acc, summary)

    saved = json.load(open(os.path.join(workdir, "model_config.json")))
    assert saved["lora_rank"] == 8 and saved["lora_alpha"] == 16.0 and saved["quant"] == ""
    assert tuple(saved["lora_targets"]) == ("q_proj", "k_proj", "v_proj", "o_proj")
    # Every leaf of the trained model that is not an adapter or the head is bit-identical to init_from.
    model = load_reward_model(workdir)
    trained = flat(model.params)
    base = flat({"backbone": {k: v for k, v in backbone.items() if k != "lm_head"}})
    assert set(trained) == set(base) | {k for k in trained if is_adapter_or_head(k)}
    for path, value in base.items():
        np.testing.assert_array_equal(trained[path], value, err_msg=path)
    lora_b = [v for k, v in trained.items() if k.endswith("lora_b")]
    assert len(lora_b) == 4 * 2 and all(np.abs(b).max() > 1e-4 for b in lora_b)  # 4 targets x 2 layers trained
    # Checkpoint: 'params' holds adapters + head only, 'frozen' the rest, and Adam moments exist only
    # for the trainable leaves (same paths, same shapes).
    params, frozen = flat(restore(workdir, "params")), flat(restore(workdir, "frozen"))
    assert params and all(is_adapter_or_head(k) for k in params)
    assert frozen and not any(is_adapter_or_head(k) for k in frozen)
    opt = flat(restore(workdir, "opt_state"))
    for moment in ("mu", "nu"):
        slots = {k.split(f"/{moment}/", 1)[1]: v.shape for k, v in opt.items() if f"/{moment}/" in k}
        assert slots == {k: v.shape for k, v in params.items()}, moment
    n_opt = sum(v.size for v in opt.values())
    assert n_opt < 2 * sum(v.size for v in params.values()) + 16  # no moment of any frozen leaf


def test_lora_rm_export_matches_transformers(setup, lora_rm, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rm.export import export
    from rm.score import main as score_main

    workdir, _, _ = lora_rm
    out = export(workdir, str(tmp_path / "export"))
    scored = tmp_path / "scores.jsonl"
    score_main(["--workdir", workdir, "--data", setup["eval"], "--out", str(scored)])
    ours = [json.loads(l) for l in open(scored)]
    rows = [json.loads(l) for l in open(setup["eval"])]
    hf_cfg = json.load(open(os.path.join(out, "config.json")))
    assert "lora_rank" not in hf_cfg or not hf_cfg["lora_rank"]
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    for side in ("chosen", "rejected"):
        enc = tok([r["prompt"] + r[side] for r in rows[:16]], padding=True, return_tensors="pt")
        with torch.no_grad():
            theirs = model(**enc).logits[:, 0].numpy() + hf_cfg["reward_offset"]
        np.testing.assert_allclose(theirs, [o[f"{side}_score"] for o in ours[:16]], atol=1e-4)


def test_qlora_rm_runs_on_frozen_int8_base(setup, qlora_rm):
    workdir, summary = qlora_rm
    assert np.isfinite(summary["eval/accuracy"]) and summary["step"] == 5
    model = load_reward_model(workdir)
    assert model.config.quant == "int8" and model.config.lora_rank == 4
    cfg, backbone = load_hf_checkpoint(setup["hf"])
    qbase, _ = quantize_params({k: v for k, v in backbone.items() if k != "lm_head"}, cfg)
    trained, base = flat(model.params["backbone"]), flat(qbase)
    assert any(k.endswith("qvalue") and v.dtype == np.int8 for k, v in trained.items())
    for path, value in base.items():  # the int8 base is exactly the quantised init_from, untouched
        np.testing.assert_array_equal(trained[path], value, err_msg=path)
    assert any(np.abs(v).max() > 0 for k, v in trained.items() if k.endswith("lora_b"))
    # It scores: rewards of a few eval pairs are finite and not all equal.
    tok = data_io.load_tokenizer(model.tokenizer_path)
    data = rm_data.load_preference_data([setup["eval"]], tok, max_length=64, on_bad_row="error")
    chosen, _ = evaluate(
        jax.jit(lambda p, b: pair_rewards(model.config, p, b)), model.params, data, batch_size=32, bucket=0
    )
    assert np.all(np.isfinite(chosen)) and np.std(chosen) > 0


def test_ppo_lora_policy_adapters_off_reference_int8_reward(setup, qlora_rm):
    rm_workdir, _ = qlora_rm
    c = ppo_config.get_config("size=tiny")
    c.policy.init_from, c.reward.workdir, c.data.prompt_files = setup["hf"], rm_workdir, setup["prompts"]
    c.policy.lora_rank, c.policy.lora_alpha = 8, 16.0  # reference 'auto' -> adapters_off
    c.reward.quant = "int8"
    c.value.lora_rank = 4
    c.train.steps, c.train.save_every, c.train.samples_every = 2, 10, 0
    workdir = str(setup["dir"] / "ppo_lora")
    start = time.time()
    ppo_train(c, workdir)
    print(f"PPO LoRA: {time.time() - start:.1f}s")
    metrics = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert all(np.isfinite(v) for v in m.values() if isinstance(v, float)), m
    # Step 0 rollout: B = 0, so the policy equals its adapters-off reference and every KL is 0.
    assert abs(metrics[0]["objective/kl"]) < 1e-6, metrics[0]["objective/kl"]
    assert metrics[-1]["policy/grad_norm"] > 0
    # Only adapters and heads were trained; the policy's base is init_from, bit for bit.
    params, frozen = flat(restore(workdir, "params")), flat(restore(workdir, "frozen"))
    assert all(is_adapter_or_head(k) for k in params)
    assert any(k.startswith("value/") and k.endswith("lora_a") for k in params)
    _, hf_params = load_hf_checkpoint(setup["hf"])
    for path, value in flat({"policy": hf_params}).items():
        np.testing.assert_array_equal(frozen[path], value, err_msg=path)
    assert max(np.abs(v).max() for k, v in params.items() if k.startswith("policy/") and k.endswith("lora_b")) > 0
    # Export merges the adapters: the HF causal LM computes what the LoRA policy computes.
    import torch
    from transformers import AutoModelForCausalLM

    from common.workdir import load_model_config
    from models.lora import combine_params
    from models.transformer import Transformer
    from ppo.export import export

    out = export(workdir, str(setup["dir"] / "ppo_lora_export"))
    cfg = load_model_config(workdir)
    assert cfg.lora_rank == 8
    policy = combine_params(restore(workdir, "params"), restore(workdir, "frozen"))["policy"]
    ids = np.random.default_rng(0).integers(1, 200, (2, 10))
    ours = Transformer(cfg).apply({"params": policy}, jnp.asarray(ids), jnp.ones((2, 10), jnp.int32)).logits
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(out).eval()(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4)


def metrics_lines(workdir):
    return [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]


def rerun_from(workdir, step, train_fn, config):
    """Copy a finished run, delete its checkpoints after `step` (as if it had been killed there) and
    run the same config again: it resumes from `step`. Returns the copy's workdir."""
    copy = workdir + f"_from{step}"
    shutil.copytree(workdir, copy)
    ckpt_dir = os.path.join(copy, "checkpoints")
    removed = [n for n in os.listdir(ckpt_dir) if n.isdigit() and int(n) > step]
    assert removed and str(step) in os.listdir(ckpt_dir)
    for name in removed:
        shutil.rmtree(os.path.join(ckpt_dir, name))
    train_fn(config, copy)
    return copy


def assert_same_tree(a, b):
    fa, fb = flat(a), flat(b)
    assert set(fa) == set(fb)
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def test_qlora_rm_dropout_trains_only_and_resume_is_exact(setup, qlora_rm):
    c = rm_cfg(setup, lora_rank=4, lora_alpha=8.0, quant="int8", lora_dropout=0.5)
    c.train.steps, c.train.save_every, c.train.keep_checkpoints, c.train.log_every = 6, 3, 5, 1
    workdir = str(setup["dir"] / "rm_qlora_dropout")
    rm_train(c, workdir)
    # Step 1 of this run and of the dropout-free QLoRA run: same batch, same init, B = 0, so the
    # forward pass (and the loss) is the base model's in both; dropout changes A's input, so the
    # gradient of B, and the gradient norm, differ. Evaluation runs without dropout.
    plain, dropped = (
        next(m for m in metrics_lines(w) if m["step"] == 1 and "train/loss" in m) for w in (qlora_rm[0], workdir)
    )
    assert abs(plain["train/loss"] - dropped["train/loss"]) < 1e-6, (plain, dropped)
    assert abs(plain["train/grad_norm"] - dropped["train/grad_norm"]) > 1e-3 * plain["train/grad_norm"]
    assert json.load(open(os.path.join(workdir, "model_config.json")))["lora_dropout"] == 0.5
    # Killed after step 3 and resumed: adapters, head, Adam moments and the int8 frozen base end
    # bit-identical to the uninterrupted run (the dropout masks depend only on (seed, step)).
    resumed = rerun_from(workdir, 3, rm_train, c)
    for key in ("params", "opt_state", "frozen"):
        assert_same_tree(restore(resumed, key), restore(workdir, key))
    assert [m["step"] for m in metrics_lines(resumed) if "train/loss" in m] == [1, 2, 3, 4, 5, 6]


def test_ppo_lora_dropout_int8_value_base_resume_is_exact(setup, qlora_rm):
    rm_workdir, _ = qlora_rm
    c = ppo_config.get_config("size=tiny")
    c.policy.init_from, c.reward.workdir, c.data.prompt_files = setup["hf"], rm_workdir, setup["prompts"]
    c.policy.lora_rank, c.policy.lora_alpha, c.policy.lora_dropout, c.policy.quant = 8, 16.0, 0.2, "int8"
    c.value.lora_rank, c.value.lora_dropout, c.value.quant = 4, 0.2, "int8"
    c.train.steps, c.train.save_every, c.train.keep_checkpoints, c.train.samples_every = 4, 2, 5, 0
    workdir = str(setup["dir"] / "ppo_qlora_dropout")
    ppo_train(c, workdir)
    frozen = flat(restore(workdir, "frozen"))
    for top in ("policy", "value"):  # both frozen bases are int8 (QLoRA policy and QLoRA value model)
        q = [k for k in frozen if k.startswith(top + "/") and k.endswith("qvalue")]
        assert q and all(frozen[k].dtype == np.int8 for k in q), top
        assert not any(k.startswith(top + "/") and k.endswith("/kernel") and "attn" in k for k in frozen), top
    params = flat(restore(workdir, "params"))
    assert all(is_adapter_or_head(k) for k in params)
    assert max(np.abs(v).max() for k, v in params.items() if k.startswith("value/") and k.endswith("lora_b")) > 0
    metrics = metrics_lines(workdir)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(np.isfinite(v) for m in metrics for v in m.values() if isinstance(v, float))
    resumed = rerun_from(workdir, 2, ppo_train, c)
    for key in ("params", "opt_state", "frozen"):
        assert_same_tree(restore(resumed, key), restore(workdir, key))
    again = metrics_lines(resumed)
    assert [m["step"] for m in again] == [1, 2, 3, 4]
    assert again[-1]["objective/kl"] == metrics[-1]["objective/kl"]


def test_bad_lora_settings_are_clear_errors():
    import ml_collections

    from models.adapters import add_lora_and_quant
    from models.transformer import TransformerConfig, init_params
    from ppo.train import _reference

    cfg = TransformerConfig(
        family="llama", vocab_size=16, d_model=16, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=8, d_ff=32
    )
    params = init_params(cfg, jax.random.key(0))
    with pytest.raises(ValueError, match=r"config.model.quant='int8' needs config.model.lora_rank > 0"):
        add_lora_and_quant(cfg, params, lora_rank=0, quant="int8", where="model")
    with pytest.raises(
        ValueError,
        match=r"config.policy.lora_rank / lora_alpha / lora_targets / lora_dropout:.*"
        r"lora_targets=\('qproj',\)",
    ):
        add_lora_and_quant(cfg, params, lora_rank=4, lora_targets=("qproj",), where="policy")
    with pytest.raises(ValueError, match=r"config.value.lora_rank / .*lora_dropout=1.5 \(in \[0, 1\)\)"):
        add_lora_and_quant(cfg, params, lora_rank=4, lora_dropout=1.5, where="value")
    pc = ml_collections.ConfigDict(dict(reference="adapters_off", ref_quant="", lora_rank=0))
    with pytest.raises(ValueError, match=r"reference='adapters_off' needs config.policy.lora_rank > 0"):
        _reference(pc, cfg, params)
    # 'copy' with ref_quant: an int8 copy of the base whose dequantised weights are within scale / 2.
    lcfg, lparams = add_lora_and_quant(cfg, params, lora_rank=4, lora_targets="q_proj,v_proj", where="policy")
    assert lcfg.lora_targets == ("q_proj", "v_proj")
    pc = ml_collections.ConfigDict(dict(reference="copy", ref_quant="int8", lora_rank=4))
    off, ref_cfg, ref = _reference(pc, lcfg, lparams)
    assert not off and ref_cfg.quant == "int8" and ref_cfg.lora_rank == 0
    q = ref["layers_0"]["attn"]["q_proj"]
    assert "lora_a" not in q and q["qvalue"].dtype == jnp.int8
    w = np.asarray(params["layers_0"]["attn"]["q_proj"]["kernel"])
    deq = np.asarray(q["qvalue"], np.float32) * np.asarray(q["scale"])[None, :]
    assert np.all(np.abs(deq - w) <= np.asarray(q["scale"])[None, :] / 2 + 1e-7)
