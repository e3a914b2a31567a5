"""An exported reward folder loaded with scan_layers (PPO's reward.scan_layers): stacked per shard on
load, equal to the same folder loaded per layer and stacked afterwards."""

import jax
import numpy as np

from models.hf import save_hf_checkpoint
from models.scan import STACKED, stack_layers
from models.transformer import TransformerConfig, init_params
from rm.ensemble import load_members
from rm.model import load_reward_model


def test_reward_folder_stacks_on_load(tmp_path):
    config = TransformerConfig(
        family="llama", vocab_size=40, d_model=16, n_layers=3, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32
    )
    backbone = {k: v for k, v in init_params(config, jax.random.key(0)).items() if k != "lm_head"}
    score = np.random.default_rng(0).normal(size=(1, 16)).astype(np.float32)
    out = str(tmp_path / "rm")
    save_hf_checkpoint(
        config,
        backbone,
        out,
        architecture="LlamaForSequenceClassification",
        extra_tensors={"score.weight": score},
        extra_config={"num_labels": 1, "reward_offset": 0.25},
    )
    per_layer = load_reward_model(out)
    stacked = load_members(out, scan_layers=True)[0]
    assert stacked.config.scan_layers and not per_layer.config.scan_layers
    assert STACKED in stacked.params["backbone"] and "layers_0" not in stacked.params["backbone"]
    expected = stack_layers(per_layer.params, per_layer.config.replace(scan_layers=True))
    assert jax.tree.structure(stacked.params) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(stacked.params), jax.tree.leaves(expected)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(stacked.params["head"]["kernel"]), score.T)
