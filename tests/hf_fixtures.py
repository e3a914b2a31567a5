"""Tiny random Hugging Face models built locally with transformers + torch (tests only)."""

from __future__ import annotations

import os

FAMILY_KW = {
    "gpt2": dict(),
    "llama": dict(num_key_value_heads=2),
    "qwen2": dict(num_key_value_heads=2),
    "mistral": dict(num_key_value_heads=2, sliding_window=6),
}


def hf_config(family: str, *, vocab_size: int = 128, d: int = 64, layers: int = 2, heads: int = 4,
              eos_token_id: int = 0, pad_token_id: int = 0, **overrides):
    import transformers

    ids = dict(bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    if family == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=vocab_size, n_positions=128, n_embd=d, n_layer=layers, n_head=heads,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    else:
        cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
               "mistral": transformers.MistralConfig}[family]
        kw = dict(vocab_size=vocab_size, hidden_size=d, intermediate_size=2 * d, num_hidden_layers=layers,
                  num_attention_heads=heads, max_position_embeddings=128, **ids)
        kw.update(FAMILY_KW[family])
        cfg = cls(**kw)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def make_tiny_hf_model(family: str, out_dir: str, *, seed: int = 0, tokenizer_dir: str | None = None,
                       cls_name: str = "AutoModelForCausalLM", **config_kw):
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
