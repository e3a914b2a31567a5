"""config.json files of the families' smallest released models (keys and values as on the Hub,
old spellings included: rope_scaling / rope_theta / rotary_pct / rope_local_base_freq /
sliding_window_pattern / longrope 'type'), shrunk to tiny widths and 2-6 layers, load and
match transformers' PyTorch model; unsupported options are refused by name."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from models import hf
from models.transformer import Transformer
from tests.transformer_test import padded_batch, torch_logits

# Shrinks every released config to the same tiny shape (head_dim 16, 4 heads over 2 kv heads).
TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    num_hidden_layers=2,
)
RELEASED = {
    "Qwen3-0.6B": dict(
        architectures=["Qwen3ForCausalLM"],
        attention_bias=False,
        attention_dropout=0.0,
        bos_token_id=151643,
        eos_token_id=151645,
        head_dim=128,
        hidden_act="silu",
        max_position_embeddings=40960,
        max_window_layers=28,
        model_type="qwen3",
        rms_norm_eps=1e-06,
        rope_scaling=None,
        rope_theta=1000000,
        sliding_window=None,
        tie_word_embeddings=True,
        torch_dtype="bfloat16",
        use_cache=True,
        use_sliding_window=False,
    ),
    "gemma-2-2b": dict(
        architectures=["Gemma2ForCausalLM"],
        attention_bias=False,
        attention_dropout=0.0,
        attn_logit_softcapping=50.0,
        bos_token_id=2,
        cache_implementation="hybrid",
        eos_token_id=1,
        final_logit_softcapping=30.0,
        hidden_act="gelu_pytorch_tanh",
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=8192,
        model_type="gemma2",
        pad_token_id=0,
        query_pre_attn_scalar=256,
        rms_norm_eps=1e-06,
        rope_theta=10000.0,
        sliding_window=4,
        torch_dtype="float32",
    ),
    "gemma-3-1b-it": dict(
        architectures=["Gemma3ForCausalLM"],
        attention_bias=False,
        attn_logit_softcapping=None,
        bos_token_id=2,
        cache_implementation="hybrid",
        eos_token_id=[1, 106],
        final_logit_softcapping=None,
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=32768,
        model_type="gemma3_text",
        pad_token_id=0,
        query_pre_attn_scalar=256,
        rms_norm_eps=1e-06,
        rope_local_base_freq=10000,
        rope_scaling=None,
        rope_theta=1000000,
        sliding_window=4,
        sliding_window_pattern=6,
        num_hidden_layers=6,
    ),
    "gemma-3-270m": dict(
        architectures=["Gemma3ForCausalLM"],
        _sliding_window_pattern=6,
        attention_bias=False,
        attn_logit_softcapping=None,
        bos_token_id=2,
        eos_token_id=1,
        final_logit_softcapping=None,
        hidden_activation="gelu_pytorch_tanh",
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=32768,
        model_type="gemma3_text",
        pad_token_id=0,
        query_pre_attn_scalar=256,
        rms_norm_eps=1e-06,
        rope_local_base_freq=10000.0,
        rope_scaling=None,
        rope_theta=1000000.0,
        sliding_window=4,
        use_bidirectional_attention=False,
    ),
    "gemma-3-4b (text, linear rope on global layers)": dict(
        model_type="gemma3_text",
        hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=256,
        rope_local_base_freq=10000.0,
        rope_scaling={"factor": 8.0, "rope_type": "linear"},
        rope_theta=1000000.0,
        sliding_window=4,
        sliding_window_pattern=2,
        rms_norm_eps=1e-06,
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
        eos_token_id=[1, 106],
        pad_token_id=0,
        bos_token_id=2,
    ),
    "pythia-70m": dict(
        architectures=["GPTNeoXForCausalLM"],
        bos_token_id=0,
        eos_token_id=0,
        hidden_act="gelu",
        layer_norm_eps=1e-05,
        max_position_embeddings=2048,
        model_type="gpt_neox",
        rotary_emb_base=10000,
        rotary_pct=0.25,
        tie_word_embeddings=False,
        torch_dtype="float16",
        use_cache=True,
        use_parallel_residual=True,
        num_key_value_heads=4,
    ),
    "Phi-3-mini-4k-instruct": dict(
        architectures=["Phi3ForCausalLM"],
        attention_bias=False,
        attention_dropout=0.0,
        bos_token_id=1,
        embd_pdrop=0.0,
        eos_token_id=32000,
        hidden_act="silu",
        max_position_embeddings=4096,
        model_type="phi3",
        original_max_position_embeddings=4096,
        pad_token_id=0,
        resid_pdrop=0.0,
        rms_norm_eps=1e-05,
        rope_scaling=None,
        rope_theta=10000.0,
        sliding_window=5,
        tie_word_embeddings=False,
        num_key_value_heads=4,
    ),
    "Phi-3.5-mini-instruct (longrope)": dict(
        architectures=["Phi3ForCausalLM"],
        bos_token_id=1,
        eos_token_id=32000,
        hidden_act="silu",
        max_position_embeddings=128,
        model_type="phi3",
        original_max_position_embeddings=8,
        pad_token_id=0,
        rms_norm_eps=1e-05,
        rope_theta=10000.0,
        sliding_window=262144,
        tie_word_embeddings=False,
        num_key_value_heads=4,
        rope_scaling={
            "long_factor": [1.0, 1.2, 2.0, 3.5, 6.0, 9.0, 14.0, 20.0],
            "short_factor": [1.0, 1.0, 1.1, 1.3, 1.2, 1.5, 1.9, 2.2],
            "type": "longrope",
        },
    ),
    "Phi-4-mini-instruct (phi3 type: partial rotary 0.75, tied, longrope)": dict(
        architectures=["Phi3ForCausalLM"],
        bos_token_id=1,
        eos_token_id=1,
        hidden_act="silu",
        max_position_embeddings=128,
        model_type="phi3",
        original_max_position_embeddings=8,
        pad_token_id=0,
        partial_rotary_factor=0.75,
        rms_norm_eps=1e-05,
        rope_theta=10000.0,
        sliding_window=262144,
        tie_word_embeddings=True,
        rope_scaling={
            "long_factor": [2.0, 4.0, 1.0, 8.0, 3.0, 1.5],
            "short_factor": [1.0, 1.5, 2.0, 1.2, 1.1, 3.0],
            "type": "longrope",
        },
    ),
}


def released(name):
    cfg = dict(RELEASED[name])
    cfg = {
        **cfg,
        **{
            k: v
            for k, v in TINY.items()
            if k not in cfg or k in ("vocab_size", "hidden_size", "intermediate_size", "head_dim")
        },
    }
    if cfg["model_type"] == "gpt_neox":
        cfg.pop("head_dim"), cfg.pop("num_key_value_heads")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # ids inside the tiny vocabulary
        if isinstance(cfg.get(key), int) and cfg[key] >= 128:
            cfg[key] = 1
        elif isinstance(cfg.get(key), list):
            cfg[key] = [1, 2]
    return cfg


@pytest.mark.parametrize("name", list(RELEASED))
def test_released_config_keys_load_and_match_pytorch(tmp_path, name):
    cfg_dict = released(name)
    torch.manual_seed(0)
    hf_cfg = transformers.AutoConfig.for_model(**cfg_dict)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).eval()  # not torch_dtype
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname or pname.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(tmp_path))
    with open(tmp_path / "config.json", "w") as f:  # the released spelling, not transformers 5's rewrite
        json.dump(cfg_dict, f)
    config, params = hf.load_hf_checkpoint(str(tmp_path))
    if "longrope" in name:
        assert dict(config.rope_scaling)["rope_type"] == "longrope"
    if "Phi-4" in name:
        assert config.rotary_pct == 0.75 and config.tie_embeddings
    ids, mask = padded_batch("left")
    ref, _ = torch_logits(model, ids, mask)
    out = Transformer(config).apply({"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(out.logits)[real], ref[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(model_type="gemma3_text", use_bidirectional_attention=True), "use_bidirectional_attention"),
        (
            dict(
                model_type="qwen3",
                rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
            ),
            "rope_type='yarn'",
        ),
        (dict(model_type="gpt_neox", hidden_act="gelu_fast"), "hidden_act='gelu_fast'"),
        (
            dict(model_type="olmo2"),
            "supported: gpt2, llama, qwen2, mistral, qwen3, gemma2, gemma3_text, gpt_neox, phi3",
        ),
    ],
)
def test_unsupported_options_are_refused_by_name(change, message):
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        hf.config_from_hf({**base, **change})
