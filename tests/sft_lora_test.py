"""SFT with LoRA (model.lora_rank > 0): only the adapters train, the frozen base is checkpointed
unchanged, and the exported causal LM is the base with W + (alpha / r) A B folded in."""

import os

import numpy as np
import pytest

import configs.sft as sft_config
from common.checkpoint import CheckpointManager
from models.hf import load_hf_checkpoint
from models.sharding import param_path
from sft.export import export
from sft.train import train
from tests.rm_data_gen import corpus, make_tiny_policy, write_jsonl

RANK, ALPHA, TARGETS = 4, 8.0, ("q_proj", "v_proj")


def _flat(tree):
    import jax

    return {param_path(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft_lora")
    init_from = make_tiny_policy(d)
    train_file = write_jsonl(d / "train.jsonl", [{"text": t} for t in corpus()[:64]])
    c = sft_config.get_config("size=tiny")
    c.model.init_from = init_from
    c.model.lora_rank, c.model.lora_alpha, c.model.lora_targets = RANK, ALPHA, TARGETS
    c.data.train_files, c.data.max_length = train_file, 32
    c.train.steps, c.train.save_every, c.train.eval_every, c.train.batch_size = 6, 6, 0, 8
    c.train.learning_rate, c.train.warmup_steps = 1e-2, 1
    c.eval.at_start = False
    workdir = str(d / "w")
    train(c, workdir)
    return d, init_from, workdir


def test_only_adapters_train_and_the_base_is_kept(run):
    _, init_from, workdir = run
    _, base = load_hf_checkpoint(init_from)
    ckpt = CheckpointManager(os.path.join(workdir, "checkpoints"), save_every=1)
    params, extra = ckpt.restore_subtree("params")
    frozen, _ = ckpt.restore_subtree("frozen")
    ckpt.close()
    assert extra["step"] == 6
    trained, kept, base = _flat(params), _flat(frozen), _flat(base)
    # The trainable tree holds exactly one A and one B per targeted projection and layer.
    n_layers = 2
    assert sorted(trained) == sorted(
        f"layers_{i}/attn/{t}/{leaf}" for i in range(n_layers) for t in TARGETS for leaf in ("lora_a", "lora_b")
    )
    assert all(np.abs(v).max() > 0 for k, v in trained.items() if k.endswith("lora_b"))  # B started at 0
    # Everything else is the base checkpoint, bit for bit.
    assert sorted(kept) == sorted(base)
    for name, value in base.items():
        np.testing.assert_array_equal(kept[name], value, err_msg=name)


def test_export_merges_the_adapters(run):
    d, init_from, workdir = run
    ckpt = CheckpointManager(os.path.join(workdir, "checkpoints"), save_every=1)
    adapters = _flat(ckpt.restore_subtree("params")[0])
    ckpt.close()
    _, base = load_hf_checkpoint(init_from)
    base = _flat(base)
    for out in (os.path.join(workdir, "hf"), export(workdir, str(d / "exported"))):
        _, merged = load_hf_checkpoint(out)
        merged = _flat(merged)
        assert sorted(merged) == sorted(base)  # a plain model: no lora leaves
        for name, value in base.items():
            site = name.rsplit("/", 1)[0]
            if name.endswith("/kernel") and f"{site}/lora_a" in adapters:
                a, b = adapters[f"{site}/lora_a"].astype(np.float64), adapters[f"{site}/lora_b"].astype(np.float64)
                expected = value.astype(np.float64) + (ALPHA / RANK) * (a @ b)
                np.testing.assert_allclose(merged[name], expected, rtol=1e-5, atol=1e-6, err_msg=name)
                assert np.abs(merged[name] - value).max() > 1e-4, name  # the adapters moved the kernel
            else:
                np.testing.assert_array_equal(merged[name], value, err_msg=name)
