"""The trainers load checkpoints straight onto their mesh: on 8 fake CPU devices ((data, model) = (2, 4),
FSDP + tensor-parallel rules) every loaded leaf already carries the NamedSharding its train state (or
frozen tree) uses, so building the state moves no loaded buffer; each device holds only its shard; the
values equal a single-device load. Covers SFT (plain, LoRA, scan_layers), the RM trainer's backbone
(plain, LoRA + int8; replicated for the ensemble trainer), PPO's policy, reference copy and reward, and RM workdirs restored onto the mesh per layer and
stacked (scan_layers), full fine-tune and LoRA + int8.

Fixtures (a tiny Llama folder with a tokenizer, RM workdirs) are written by this pytest process; the
checks run in ONE worker subprocess (this file as a script) with 8 fake devices, which prints its
figures as one JSON line.
"""

from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

MESH = (2, 4)


# ----------------------------------------------------------------------------- worker checks


def _buffers(x):
    return [s.data.unsafe_buffer_pointer() for s in x.addressable_shards]


def check_placed(tree, shardings, what):
    """Asserts every leaf of `tree` carries the NamedSharding of `shardings` (same structure) and each
    device holds only its shard; returns (bytes on device 0, full bytes)."""
    device0, full = jax.devices()[0], 0
    on_device0 = 0
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    assert len(leaves) == len(jax.tree.leaves(shardings)), what
    for (path, x), want in zip(leaves, jax.tree.leaves(shardings)):
        name = f"{what}{jax.tree_util.keystr(path)}"
        assert x.sharding == want, (name, x.sharding, want)
        shards = x.addressable_shards
        assert sorted(s.device.id for s in shards) == list(range(8)), name
        for s in shards:
            assert s.data.shape == want.shard_shape(x.shape), (name, s.data.shape, want.shard_shape(x.shape))
        full += x.nbytes
        on_device0 += sum(s.data.nbytes for s in shards if s.device == device0)
    return on_device0, full


def check_unmoved(before, after, what):
    """Asserts each leaf of `after` is the same device buffers as `before`'s (device_put moved nothing)."""
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(before), jax.tree.leaves(after)):
        assert _buffers(a) == _buffers(b), f"{what}{jax.tree_util.keystr(path)} was copied"


def check_equal(got, want, what):
    assert jax.tree.structure(got) == jax.tree.structure(want), what
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        assert a.dtype == b.dtype, (what, jax.tree_util.keystr(path))
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{what}{jax.tree_util.keystr(path)}")


def _state_shardings(params, frozen, mesh, rules):
    """The train state built from (params, frozen) by common.train_state: (built, params shardings)."""
    import optax

    from common.train_state import build_train_state

    # plain SGD: its optimizer state is empty, so the (compiled) tx.init costs nothing; what is checked
    # is where the params and the frozen tree end up
    built = build_train_state(params, frozen, optax.sgd(1e-3), mesh=mesh, rules=rules, rng=jax.random.key(0))
    return built, built.state_sharding["params"]


def _sft_checks(folder, mesh, rules, report):
    import configs.sft as sft_config
    from common import data_io
    from models.adapters import add_lora_and_quant, split_trainable
    from models.hf import load_hf_checkpoint
    from models.scan import stack_layers
    from sft.train import build_model

    tokenizer = data_io.load_tokenizer(folder)
    _, reference = load_hf_checkpoint(folder)  # the single-device load
    for scan in (False, True):
        c = sft_config.get_config("size=tiny")
        c.model.init_from, c.model.scan_layers = folder, scan
        model_config, params = build_model(c, tokenizer, mesh, rules, jax.random.key(1))
        check_equal(params, stack_layers(reference, model_config) if scan else reference, f"sft scan={scan}")
        built, shardings = _state_shardings(params, {}, mesh, rules)
        report[f"sft_scan{scan}"] = check_placed(params, shardings, f"sft scan={scan}")
        check_unmoved(params, built.state["params"], f"sft scan={scan}")
    # LoRA: the loaded kernels form the frozen tree, the adapters (fresh) train.
    lora_config, lora_params = add_lora_and_quant(model_config, params, lora_rank=2, rng=jax.random.key(3))
    trainable, frozen = split_trainable(lora_params, lora=True)
    built, _ = _state_shardings(trainable, frozen, mesh, rules)
    report["sft_lora_frozen"] = check_placed(frozen, built.frozen_sharding, "sft lora frozen")
    check_unmoved(frozen, built.frozen, "sft lora frozen")


def _rm_checks(folder, mesh, rules, report):
    import configs.rm as rm_config
    from common import data_io
    from common.mesh import replicated
    from models.adapters import add_lora_and_quant, split_trainable
    from models.hf import load_hf_checkpoint
    from models.sharding import REPLICATED_RULES
    from rm.model import rm_params_from_backbone
    from rm.train import load_backbone

    tokenizer = data_io.load_tokenizer(folder)
    c = rm_config.get_config("size=tiny")
    c.model.init_from = folder
    model_config, backbone = load_backbone(c, tokenizer, mesh, rules)
    _, reference = load_hf_checkpoint(folder)
    check_equal(backbone, reference, "rm backbone")
    params = rm_params_from_backbone(model_config, backbone, jax.random.key(1))
    built, shardings = _state_shardings(params, {}, mesh, rules)
    report["rm_backbone"] = check_placed(params["backbone"], shardings["backbone"], "rm backbone")
    check_unmoved(params["backbone"], built.state["params"]["backbone"], "rm backbone")
    # The ensemble trainer's members run replicated: its backbone loads replicated on every device.
    _, replicated_backbone = load_backbone(c, tokenizer, mesh, REPLICATED_RULES)
    check_unmoved(replicated_backbone, jax.device_put(replicated_backbone, replicated(mesh)), "ensemble backbone")
    # QLoRA: the int8 base is derived from the placed kernels; the leaves loaded as they are stay put.
    _, qparams = add_lora_and_quant(model_config, params, lora_rank=2, quant="int8", rng=jax.random.key(3))
    trainable, frozen = split_trainable(qparams, lora=True)
    built, _ = _state_shardings(trainable, frozen, mesh, rules)
    check_placed(built.frozen, built.frozen_sharding, "rm int8 frozen")
    derived = ("qvalue", "scale")
    moved = [
        jax.tree_util.keystr(p)
        for (p, a), b in zip(jax.tree_util.tree_leaves_with_path(frozen), jax.tree.leaves(built.frozen))
        if _buffers(a) != _buffers(b)
    ]
    assert all(any(d in m for d in derived) for m in moved), moved  # only int8 leaves may be re-placed
    report["rm_int8_moved"] = [len(moved), len(jax.tree.leaves(frozen))]


def _workdir_checks(workdirs, mesh, rules, report):
    from models.scan import STACKED, stack_layers
    from models.sharding import spec_for, tree_shardings
    from rm.model import load_reward_model

    for kind, workdir in workdirs.items():
        reference = load_reward_model(workdir)  # default device, per layer
        for scan in (False, True):
            what = f"rm workdir {kind} scan={scan}"
            got = load_reward_model(workdir, scan_layers=scan, mesh=mesh, rules=rules)
            want = stack_layers(reference.params, got.config) if scan else reference.params
            check_equal(got.params, want, what)
            assert (got.gain, got.bias) == (reference.gain, reference.bias), what
            report[f"workdir_{kind}_scan{scan}"] = check_placed(
                got.params, tree_shardings(got.params, mesh, rules), what
            )
            if scan:  # a stacked leaf [G, ...] is P(None, *its layer's spec)
                base = "frozen" if kind == "lora_int8" else "params"
                leaf = got.params["backbone"][STACKED]["p0"]["attn"]["q_proj"]
                leaf = leaf["qvalue"] if kind == "lora_int8" else leaf["kernel"]
                layer_spec = spec_for(f"{base}/backbone/layers_0/attn/q_proj/kernel", leaf.shape[1:], mesh, rules)
                assert leaf.sharding.spec == jax.sharding.PartitionSpec(None, *layer_spec), (what, leaf.sharding)
                assert any(s is not None for s in layer_spec), layer_spec  # the layer really is split


def _ppo_checks(folder, workdir, mesh, rules, report):
    import configs.ppo as ppo_config
    from common import data_io
    from models.scan import stack_layers
    from models.sharding import shard_params, tree_shardings
    from ppo.loading import frozen_reward, load_models, reference_model
    from rm.model import load_reward_model

    tokenizer = data_io.load_tokenizer(folder)
    reference = load_reward_model(workdir)
    for scan in (False, True):
        c = ppo_config.get_config("size=tiny")
        c.policy.init_from, c.reward.workdir = folder, workdir
        c.policy.scan_layers = c.reward.scan_layers = scan
        policy_config, policy, members = load_models(c, tokenizer, mesh, rules)
        built, shardings = _state_shardings({"policy": policy}, {}, mesh, rules)
        report[f"ppo_policy_scan{scan}"] = check_placed(policy, shardings["policy"], f"ppo policy scan={scan}")
        check_unmoved(policy, built.state["params"]["policy"], f"ppo policy scan={scan}")
        # the frozen reference copy ('copy' mode) keeps the policy's placement
        _, _, reference_params = reference_model(c.policy, policy_config, policy)
        check_placed(reference_params, tree_shardings(reference_params, mesh, rules), f"ppo reference scan={scan}")
        check_unmoved(reference_params, shard_params(reference_params, mesh, rules), f"ppo reference scan={scan}")
        _, reward_params, _, _ = frozen_reward(c, members[0])
        want = stack_layers(reference.params, members[0].config) if scan else reference.params
        check_equal(reward_params, want, f"ppo reward scan={scan}")
        placed = shard_params(reward_params, mesh, rules)  # what ppo/train.py does with the frozen reward tree
        shardings = tree_shardings(reward_params, mesh, rules)
        report[f"ppo_reward_scan{scan}"] = check_placed(reward_params, shardings, f"ppo reward scan={scan}")
        check_unmoved(reward_params, placed, f"ppo reward scan={scan}")


def _worker(folder, workdirs_json):
    from common.mesh import make_mesh
    from models.sharding import DEFAULT_RULES

    assert jax.device_count() == 8
    mesh, rules = make_mesh(MESH), DEFAULT_RULES
    workdirs = json.loads(workdirs_json)
    report = {}
    _sft_checks(folder, mesh, rules, report)
    _rm_checks(folder, mesh, rules, report)
    _workdir_checks(workdirs, mesh, rules, report)
    _ppo_checks(folder, workdirs["full"], mesh, rules, report)
    print(json.dumps(report))


# ----------------------------------------------------------------------------- the test


def test_trainers_and_rm_workdirs_load_straight_onto_8_device_mesh(tmp_path):
    from models.hf import save_hf_checkpoint
    from models.transformer import TransformerConfig, init_params
    from tests.fixtures import make_tiny_tokenizer
    from tests.rm_data_gen import corpus
    from tests.rm_workdir_stacked_restore_test import write_workdir
    from tests.worker import run_worker

    tok_dir = make_tiny_tokenizer(str(tmp_path / "tok"), texts=corpus(), vocab_size=300)
    folder = str(tmp_path / "llama")
    # vocab 384, d 64, 4 query / 2 KV heads of 16: every matrix splits evenly over model = 4 and data = 2
    config = TransformerConfig(
        family="llama", vocab_size=384, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128
    )
    save_hf_checkpoint(config, init_params(config, jax.random.key(0)), folder, tokenizer_dir=tok_dir)
    workdirs = {
        "full": write_workdir(tmp_path / "rm_full", config),
        "lora_int8": write_workdir(tmp_path / "rm_qlora", config, lora=True, quant="int8"),
    }
    report = run_worker(
        __file__,
        xla_flags="--xla_force_host_platform_device_count=8",
        args=("--worker", folder, json.dumps(workdirs)),
        timeout=600,
    )
    # Each device holds its shard of every matrix (1/8 of it) and a copy of the small replicated
    # leaves (norms, the [d, 1] head): far below the whole model on every device.
    for key, value in report.items():
        if key != "rm_int8_moved":
            on_device0, full = value
            assert 0 < on_device0 < 0.2 * full, (key, value)
    print("per-device bytes / full bytes:", {k: v for k, v in report.items()})


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(sys.argv[2], sys.argv[3])
