"""An RM workdir saved per layer, loaded with scan_layers (PPO's reward.scan_layers): restored layer by
layer into the stacked layout, equal to loading per layer and stacking after, without the model twice."""

import gc

import jax
import numpy as np
import pytest

from common.checkpoint import CheckpointManager
from models.adapters import add_lora_and_quant, split_trainable
from models.scan import STACKED, stack_layers
from models.transformer import TransformerConfig, init_params
from rm.ensemble import load_members, write_reward_workdir
from rm.model import load_reward_model, rm_params_from_backbone

SMALL = dict(vocab_size=16, n_heads=2, n_kv_heads=1, head_dim=8)
GEMMA2 = dict(
    family="gemma2",
    sliding_window=3,
    attn_softcap=20.0,
    final_softcap=15.0,
    query_pre_attn_scalar=8.0,
    activation="gelu_new",
    norm_eps=1e-6,
    layer_types=("sliding_attention", "full_attention") * 2 + ("sliding_attention",),
)


def write_workdir(path, config, *, lora=False, quant=""):
    """A per-layer RM workdir (as rm/train.py writes it) of random weights; returns it."""
    backbone = init_params(config, jax.random.key(0))
    params = rm_params_from_backbone(config, backbone, jax.random.key(1))
    frozen = {}
    if lora:
        config, params = add_lora_and_quant(
            config, params, lora_rank=2, lora_targets=("q_proj", "down_proj"), quant=quant, rng=jax.random.key(2)
        )
        # adapters away from zero, so a misplaced layer would show
        params = jax.tree_util.tree_map_with_path(
            lambda p, x: x + 0.05 if "lora_b" in jax.tree_util.keystr(p) else x, params
        )
        params, frozen = split_trainable(params, lora=True)
    return write_reward_workdir(str(path), config, params, frozen=frozen, normalization={"gain": 2.0, "bias": 0.5})


def assert_trees_identical(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        assert a.dtype == b.dtype and a.shape == b.shape, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


def check_stacked_equals_restacked(workdir, **kw):
    per_layer = load_reward_model(workdir, **kw)
    stacked = load_reward_model(workdir, scan_layers=True, **kw)
    assert stacked.config == per_layer.config.replace(scan_layers=True)
    assert (stacked.gain, stacked.bias, stacked.step) == (per_layer.gain, per_layer.bias, per_layer.step) == (2, 0.5, 0)
    assert STACKED in stacked.params["backbone"] and "layers_0" not in stacked.params["backbone"]
    assert_trees_identical(stacked.params, stack_layers(per_layer.params, stacked.config))
    return stacked


@pytest.mark.parametrize("param_dtype", [None, "bfloat16"])
def test_full_finetune_workdir_restores_stacked(tmp_path, param_dtype):
    config = TransformerConfig(family="llama", d_model=16, d_ff=32, n_layers=3, **SMALL)
    workdir = write_workdir(tmp_path / "rm", config)
    stacked = check_stacked_equals_restacked(workdir, param_dtype=param_dtype)
    want = np.dtype(param_dtype or "float32")
    assert stacked.params["backbone"][STACKED]["p0"]["mlp"]["up_proj"]["kernel"].dtype == want
    # the ensemble loader (PPO's call) goes the same way
    (member,) = load_members(workdir, scan_layers=True)
    assert member.config.scan_layers and STACKED in member.params["backbone"]


def test_lora_int8_workdir_restores_stacked(tmp_path):
    config = TransformerConfig(family="llama", d_model=16, d_ff=32, n_layers=3, **SMALL)
    workdir = write_workdir(tmp_path / "rm", config, lora=True, quant="int8")
    stacked = check_stacked_equals_restacked(workdir)
    down = stacked.params["backbone"][STACKED]["p0"]["mlp"]["down_proj"]
    assert down["qvalue"].dtype == np.int8 and down["qvalue"].shape[0] == 3 and down["lora_b"].shape[0] == 3


def test_period_two_family_with_remainder_restores_stacked(tmp_path):
    config = TransformerConfig(d_model=16, d_ff=32, n_layers=5, **SMALL, **GEMMA2)
    workdir = write_workdir(tmp_path / "rm", config, lora=True)
    stacked = check_stacked_equals_restacked(workdir)
    backbone = stacked.params["backbone"]
    assert sorted(backbone[STACKED]) == ["p0", "p1"] and "layers_4" in backbone  # G = 2, layer 4 unrolled
    assert backbone[STACKED]["p1"]["attn"]["q_proj"]["lora_a"].shape[0] == 2


def _live_bytes():
    return sum(a.nbytes for a in jax.live_arrays())


def test_stacked_restore_holds_at_most_one_layer_beside_the_stack(tmp_path, monkeypatch):
    """Live jax bytes after every restore call (the peak moments: the stack plus what was just
    read) stay below the stacked model plus two layers; the old path (restore per layer, then
    stack) holds the layers twice."""
    n_layers = 6
    config = TransformerConfig(family="llama", d_model=32, d_ff=128, n_layers=n_layers, **SMALL)
    workdir = write_workdir(tmp_path / "rm", config)
    gc.collect()
    base = _live_bytes()
    peaks = []
    for name in ("restore_subset", "restore_subtree"):
        original = getattr(CheckpointManager, name)

        def measured(self, *args, _original=original, **kwargs):
            out = _original(self, *args, **kwargs)
            peaks.append(_live_bytes() - base)
            return out

        monkeypatch.setattr(CheckpointManager, name, measured)
    stacked = load_reward_model(workdir, scan_layers=True)
    total = _live_bytes() - base
    assert total == sum(a.nbytes for a in jax.tree.leaves(stacked.params))
    layer = sum(a.nbytes for a in jax.tree.leaves(stacked.params["backbone"][STACKED])) // n_layers
    assert layer * n_layers > 0.8 * total  # the layers dominate, so holding them twice would show
    assert len(peaks) == 1 + n_layers and max(peaks) <= total + layer  # the stack + the layer just read
    del stacked
    gc.collect()
    base = _live_bytes()
    per_layer = load_reward_model(workdir)  # the old path: per-layer restore, then stack_layers
    restacked = stack_layers(per_layer.params, per_layer.config.replace(scan_layers=True))
    old_peak = _live_bytes() - base
    assert old_peak > total + 2 * layer  # the bound above would catch it
    del per_layer, restacked
