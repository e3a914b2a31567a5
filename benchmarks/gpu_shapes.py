"""Shapes, batch sizes and the model-FLOP count (PaLM appendix B) of benchmarks/gpu.py.

MFU = achieved model FLOP/s over the chip's dense bf16 peak (`PEAK_BF16_FLOPS`); see gpu.py's
docstring for what each measurement times.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from models.transformer import TransformerConfig

# Dense bf16 peak FLOP/s by device kind (lower-cased substring of jax.devices()[0].device_kind,
# first match wins, so specific names come before general ones). Vendor data-sheet numbers
# without sparsity.
PEAK_BF16_FLOPS = (
    ("h100 pcie", 756e12),
    ("h100", 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
    ("h200", 989e12),
    ("a100", 312e12),
    ("tpu v5 lite", 197e12),  # v5e
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),
    ("tpu v4", 275e12),
)

BF16_COMPUTE = dict(dtype="bfloat16", param_dtype="float32")
MODEL_SHAPES = {
    "1b": TransformerConfig(
        family="llama",
        vocab_size=128256,
        d_model=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        head_dim=64,
        d_ff=8192,
        max_position_embeddings=131072,
        norm_eps=1e-5,
        rope_theta=500000.0,
        tie_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        rope_scaling=(
            ("factor", 32.0),
            ("high_freq_factor", 4.0),
            ("low_freq_factor", 1.0),
            ("original_max_position_embeddings", 8192),
            ("rope_type", "llama3"),
        ),
        **BF16_COMPUTE,
    ),
    "tiny": TransformerConfig(
        family="llama",
        vocab_size=256,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        d_ff=128,
        max_position_embeddings=2048,
        tie_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        **BF16_COMPUTE,
    ),
}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Batch sizes and lengths of the three measurements."""

    rm_pairs: int  # B preference pairs per RM step (2B sequences)
    rm_seq: int  # T tokens per sequence
    rm_steps_per_rep: int  # optimizer steps per timed repetition
    sample_batch: int
    prompt_len: int
    new_tokens: int
    ppo_batch: int  # rollouts per PPO iteration
    ppo_prompt_len: int
    ppo_new_tokens: int
    ppo_epochs: int
    ppo_minibatches: int


SIZES = {
    # 1b: sized for an 80 GB H100, whose JAX allocator gets 75% of the memory by default
    # (XLA_PYTHON_CLIENT_MEM_FRACTION); see the module docstring for the memory estimates.
    "1b": Sizes(
        rm_pairs=4,
        rm_seq=512,
        rm_steps_per_rep=5,
        sample_batch=32,
        prompt_len=128,
        new_tokens=128,
        ppo_batch=16,
        ppo_prompt_len=128,
        ppo_new_tokens=128,
        ppo_epochs=1,
        ppo_minibatches=4,
    ),
    "tiny": Sizes(
        rm_pairs=4,
        rm_seq=64,
        rm_steps_per_rep=3,
        sample_batch=4,
        prompt_len=16,
        new_tokens=16,
        ppo_batch=4,
        ppo_prompt_len=16,
        ppo_new_tokens=16,
        ppo_epochs=1,
        ppo_minibatches=2,
    ),
}


# ----------------------------------------------------------------------------- FLOPs and MFU


def peak_bf16_flops(device_kind: str) -> Optional[float]:
    """Dense bf16 peak FLOP/s of one chip from its device_kind, or None when unknown (e.g. CPU)."""
    kind = device_kind.lower()
    for name, peak in PEAK_BF16_FLOPS:
        if name in kind:
            return peak
    return None


def non_embedding_params(config: TransformerConfig) -> int:
    """Backbone parameters outside the token/position embeddings and lm_head, from the config.

    Per layer: q, k, v, o projections (+ biases), the MLP (3 matrices gated, 2 for GPT-2, + biases)
    and two norms (RMSNorm: scale; LayerNorm: scale and bias); plus the final norm.
    """
    d, f = config.d_model, config.d_ff
    q_width, kv_width = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    attn = d * q_width + 2 * d * kv_width + q_width * d
    attn += (q_width + 2 * kv_width) * config.qkv_bias + d * config.o_bias
    n_mats = 2 if config.is_gpt2 else 3
    mlp = n_mats * d * f + ((n_mats - 1) * f + d) * config.mlp_bias
    norm = 2 * d if config.is_gpt2 else d
    return config.n_layers * (attn + mlp + 2 * norm) + norm


def train_flops_per_token(config: TransformerConfig, seq_len: int, *, extra_params: int = 0) -> float:
    """Model FLOPs of one training token (forward + backward): 6 N + 12 n_layers (H D) T.

    N = non_embedding_params(config) + extra_params (e.g. a scalar head's d + 1). 6 N: 2 FLOPs
    per weight per token forward, 4 backward. 12 L (H D) T: QK^T and PV, each 2 (H D) T FLOPs
    per token per layer forward, times 3 for forward + backward, over the full T x T scores.
    """
    n = non_embedding_params(config) + extra_params
    return 6.0 * n + 12.0 * config.n_layers * config.n_heads * config.head_dim * seq_len


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation: tokens/s * FLOPs/token / peak FLOP/s (None without a peak)."""
    if not peak_flops:
        return None
    return tokens_per_s * flops_per_token / peak_flops
