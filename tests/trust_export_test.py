"""Exports for issue 15: bf16 Hugging Face folders and LoRA adapters alone in PEFT's format."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.hf import load_hf_checkpoint, save_hf_checkpoint
from models.lora import add_lora_params
from models.peft_adapters import export_peft_adapter
from models.transformer import Transformer
from tests.hf_fixtures import make_tiny_hf_model


def _ids():
    rng = np.random.default_rng(0)
    return rng.integers(1, 120, size=(2, 9)).astype(np.int64)


@pytest.mark.parametrize(
    "family, targets",
    [
        ("gpt2", ("q_proj", "v_proj", "o_proj", "up_proj")),
        ("llama", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj")),
        ("qwen2", ("q_proj", "v_proj", "up_proj")),
        ("gemma2", ("q_proj", "k_proj", "o_proj", "gate_proj")),
    ],
)
def test_peft_adapter_matches_our_lora_model(tmp_path, family, targets):
    import peft
    import torch
    import transformers

    base_dir = str(tmp_path / "base")
    make_tiny_hf_model(family, base_dir, seed=1)
    config, params = load_hf_checkpoint(base_dir)
    config = config.replace(lora_rank=4, lora_alpha=8.0, lora_targets=targets)
    params = add_lora_params(params, config, jax.random.key(0))
    # Non-zero B (a fresh adapter has B = 0 and would prove nothing).
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    noise = iter(jax.random.normal(jax.random.key(1), (len(leaves), 4096)))

    def perturb(path, x):
        row = next(noise)
        if str(path[-1]).endswith("'lora_b']"):
            return x + 0.2 * row[: x.size].reshape(x.shape)
        return x

    params = jax.tree_util.tree_map_with_path(perturb, params)
    adapter_dir = export_peft_adapter(config, params, str(tmp_path / "adapter"), base_model=base_dir)
    saved = json.load(open(os.path.join(adapter_dir, "adapter_config.json")))
    assert saved["r"] == 4 and saved["peft_type"] == "LORA"

    ids = _ids()
    mask = np.ones_like(ids)
    ours = np.asarray(
        Transformer(config).apply({"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)).logits
    )
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()

        with model.disable_adapter():
            without = model(input_ids=torch.tensor(ids)).logits.numpy()
    assert np.abs(theirs - without).max() > 1e-2  # the adapters change the outputs ...
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)  # ... exactly as ours do


def test_bf16_folder_loads_in_transformers_within_bf16_tolerance(tmp_path):
    import torch
    import transformers

    base_dir = str(tmp_path / "base")
    make_tiny_hf_model("llama", base_dir, seed=2)
    config, params = load_hf_checkpoint(base_dir)
    out = save_hf_checkpoint(config, params, str(tmp_path / "bf16"), dtype="bfloat16")
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["torch_dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(os.path.join(out, "model.safetensors"), framework="numpy") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"bfloat16"}
    ids = torch.tensor(_ids())
    with torch.no_grad():
        ref = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)(ids).logits
        low = transformers.AutoModelForCausalLM.from_pretrained(out)
        assert low.dtype == torch.bfloat16
        got = low(ids).logits.float()
    # bf16 keeps 8 bits of mantissa: weights and activations rounded at ~4e-3 relative.
    scale = ref.abs().max().item()
    err = (got - ref).abs().max().item()
    assert err < 3e-2 * max(scale, 1.0), (err, scale)
    assert err > 0  # it really is rounded
