"""Tiny random Hugging Face models built locally with transformers + torch (tests only)."""

from __future__ import annotations

import os

FAMILY_KW = {
    "gpt2": dict(),
    "llama": dict(num_key_value_heads=2),
    "qwen2": dict(num_key_value_heads=2),
    "mistral": dict(num_key_value_heads=2, sliding_window=6),
    # New families with their distinctive features on (tiny sizes: caps and windows small
    # enough to matter on 10-token batches).
    "qwen3": dict(
        num_key_value_heads=2, head_dim=16, use_sliding_window=True, sliding_window=4, max_window_layers=1
    ),  # layer 0 global, layer 1 sliding
    "gemma2": dict(
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=4,
        attn_logit_softcapping=0.01,
        final_logit_softcapping=3.0,
    ),
    "gemma3_text": dict(
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
        },
    ),
    "gpt_neox": dict(
        rotary_pct=0.25,
        use_parallel_residual=True,
        hidden_act="gelu",
        tie_word_embeddings=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    ),
    "phi3": dict(
        num_key_value_heads=2,
        sliding_window=6,
        original_max_position_embeddings=8,
        rope_scaling={
            "type": "longrope",
            "short_factor": [1.0, 1.5, 2.0, 1.2, 1.1, 3.0, 1.0, 2.5],
            "long_factor": [2.0, 4.0, 1.0, 8.0, 3.0, 1.5, 6.0, 2.0],
        },
    ),
}
_CLASSES = {
    "llama": "LlamaConfig",
    "qwen2": "Qwen2Config",
    "mistral": "MistralConfig",
    "qwen3": "Qwen3Config",
    "gemma2": "Gemma2Config",
    "gemma3_text": "Gemma3TextConfig",
    "gpt_neox": "GPTNeoXConfig",
    "phi3": "Phi3Config",
}


def hf_config(
    family: str,
    *,
    vocab_size: int = 128,
    d: int = 64,
    layers: int = 2,
    heads: int = 4,
    eos_token_id: int = 0,
    pad_token_id: int = 0,
    **overrides,
):
    import transformers

    ids = dict(bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    if family == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=vocab_size,
            n_positions=128,
            n_embd=d,
            n_layer=layers,
            n_head=heads,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **ids,
        )
    else:
        cls = getattr(transformers, _CLASSES[family])
        kw = dict(
            vocab_size=vocab_size,
            hidden_size=d,
            intermediate_size=2 * d,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=128,
            **ids,
        )
        kw.update(FAMILY_KW[family])
        kw.update({k: overrides.pop(k) for k in list(overrides) if k in kw or k in ("rope_parameters",)})
        cfg = cls(**kw)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def make_tiny_hf_model(
    family: str,
    out_dir: str,
    *,
    seed: int = 0,
    tokenizer_dir: str | None = None,
    cls_name: str = "AutoModelForCausalLM",
    **config_kw,
):
    """Save a randomly initialised tiny HF model (safetensors) to out_dir; returns the torch model."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = hf_config(family, **config_kw)
    model = getattr(transformers, cls_name).from_config(cfg)
    with torch.no_grad():  # non-trivial norms and biases so parity tests exercise them
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.eval()
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    if tokenizer_dir:
        from models.hf import copy_tokenizer_files

        copy_tokenizer_files(tokenizer_dir, out_dir)
    return model
