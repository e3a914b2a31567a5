"""Decoder-only transformer (GPT-2 and Llama families) in Flax Linen.

One backbone serves the policy, the reference, the reward and the value models: it returns
the final hidden states (after the final norm) and, when asked, language-model logits.
Parameter names follow Hugging Face's module names (q_proj, up_proj, ...) so the checkpoint
mapping in `models/hf.py` and the LoRA target names in `models/lora.py` stay simple.

Families:
  gpt2     learned positions, LayerNorm with bias, GELU (tanh), biases everywhere, tied head
  llama    RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases
  qwen2    llama + biases on q/k/v
  mistral  llama + optional sliding-window attention

Padding: `attention_mask` marks real tokens; left and right padding both work because
positions are derived from the mask (cumsum - 1) and padded keys are masked out.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from models.attention import ATTENTION_IMPLS, attend, resolve_attention_impl
from models.lora import PROJECTIONS as _PROJECTIONS, LoRADense
from models.quant import QuantDense

FAMILIES = ("gpt2", "llama", "qwen2", "mistral")

_REMAT_POLICIES = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Hyperparameters of the backbone. Frozen: built once from a HF config or a ConfigDict."""

    family: str = "llama"  # one of FAMILIES
    vocab_size: int = 256
    d_model: int = 64  # hidden width
    n_layers: int = 2
    n_heads: int = 4  # query heads
    n_kv_heads: int = 4  # key/value heads (< n_heads: grouped-query attention)
    head_dim: int = 16
    d_ff: int = 256  # MLP inner width
    max_position_embeddings: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[tuple] = None  # sorted (key, value) items of HF rope_parameters
    sliding_window: Optional[int] = None  # keys further back than this many tokens are masked
    tie_embeddings: bool = False  # lm head shares the token embedding
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    activation: str = "silu"  # silu (gated, llama) | gelu_new (gpt2) | gelu | relu
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    remat: bool = False  # jax.checkpoint each block (recompute activations in the backward pass)
    remat_policy: str = "nothing_saveable"  # key of _REMAT_POLICIES
    # Attention implementation (models/attention.py): auto | xla | chunked | cudnn. 'auto' keeps the
    # plain XLA path for short sequences off GPU, blockwise from 1024 tokens, cuDNN on GPUs (bf16).
    attention: str = "auto"
    # Log-probs / entropies / SFT loss from hidden states over chunks of this many positions
    # (models/lm_head.py), so no [B, T, V] float32 logits are held; 0 = full logits.
    logits_chunk: int = 128
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    # LoRA adapters (models/lora.py) and int8 weights (models/quant.py); see `_dense`.
    lora_rank: int = 0  # adapter rank r; 0 = no adapters
    lora_alpha: float = 16.0  # adapter output scaled by lora_alpha / lora_rank
    lora_targets: tuple = ("q_proj", "v_proj")  # module names that get adapters (q_proj ... down_proj)
    lora_dropout: float = 0.0  # dropout on the adapter input; active only with a 'dropout' rng
    quant: str = ""  # '' (float weights) or 'int8' (weight-only, per-output-channel)

    def __post_init__(self):
        # Lists (from JSON / ConfigDicts) become tuples so the config stays hashable.
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        unknown = [t for t in self.lora_targets if t not in _PROJECTIONS]
        if unknown or self.lora_rank < 0 or self.quant not in ("", "int8") or not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_targets={self.lora_targets} (each one of {_PROJECTIONS}), lora_rank="
                             f"{self.lora_rank} (>= 0), lora_dropout={self.lora_dropout} (in [0, 1)), "
                             f"quant={self.quant!r} ('' or 'int8'): invalid value")
        if self.family not in FAMILIES:
            raise ValueError(f"family={self.family!r}; supported: {', '.join(FAMILIES)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention={self.attention!r}; one of {ATTENTION_IMPLS}")
        if self.logits_chunk < 0:
            raise ValueError(f"logits_chunk={self.logits_chunk}; >= 0 (0 = full logits)")
        if self.remat_policy not in _REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r}; one of {sorted(_REMAT_POLICIES)}")

    @property
    def is_gpt2(self) -> bool:
        return self.family == "gpt2"

    def replace(self, **changes) -> "TransformerConfig":
        return dataclasses.replace(self, **changes)

    def num_params(self) -> int:
        """Parameter count (embeddings included) computed from the shapes."""
        shapes = jax.eval_shape(
            lambda: Transformer(self).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), jnp.int32))
        )
        return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))


@flax.struct.dataclass
class Output:
    logits: Optional[jax.Array]  # [B, T, V] float32, or None when not requested
    hidden_states: jax.Array  # [B, T, d] float32, after the final norm
    cache: Optional[Any]  # updated KV cache (list of {'k','v'}) or None


def init_cache(config: TransformerConfig, batch_size: int, max_len: int, dtype=None) -> list:
    """Zero KV cache: one {'k','v'} of [B, Hkv, S, D] per layer (heads before slots: each decode
    step's attention reads contiguous [S, D] blocks per head)."""
    dtype = jnp.dtype(dtype or config.dtype)
    shape = (batch_size, config.n_kv_heads, max_len, config.head_dim)
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(config.n_layers)]


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Position ids that skip padding: 0 at the first real token of each row. [B, T]."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def rope_inv_freq(config: TransformerConfig) -> jax.Array:
    """Inverse RoPE frequencies [D/2], with HF's 'linear' and 'llama3' scalings."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    scaling = dict(config.rope_scaling or ())
    kind = scaling.get("rope_type", "default")
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = jnp.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return jnp.where(medium, smoothed, scaled)
    raise ValueError(f"rope_type={kind!r} is not supported; supported: default, linear, llama3")


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotary embedding in HF's half-split layout. x [B, T, H, D], positions [B, T]."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, D/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


class RMSNorm(nn.Module):
    eps: float
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(self.dtype) * scale.astype(self.dtype)


def _norm(config: TransformerConfig, name: str):
    dtype, pdtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    if config.is_gpt2:
        return nn.LayerNorm(epsilon=config.norm_eps, dtype=dtype, param_dtype=pdtype, name=name)
    return RMSNorm(eps=config.norm_eps, dtype=dtype, param_dtype=pdtype, name=name)


def _dense(config: TransformerConfig, features: int, use_bias: bool, name: str):
    """Projection `name`: int8 QuantDense (config.quant), LoRADense (named in lora_targets), or nn.Dense."""
    lora = config.lora_rank > 0 and name in config.lora_targets
    common = dict(features=features, use_bias=use_bias, dtype=jnp.dtype(config.dtype),
                  param_dtype=jnp.dtype(config.param_dtype), kernel_init=nn.initializers.normal(0.02), name=name)
    if config.quant == "int8":  # frozen int8 base, float adapters when also LoRA (QLoRA-style)
        return QuantDense(lora_rank=config.lora_rank if lora else 0, lora_alpha=config.lora_alpha,
                          lora_dropout=config.lora_dropout, **common)
    if lora:
        return LoRADense(rank=config.lora_rank, alpha=config.lora_alpha, dropout=config.lora_dropout, **common)
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=jnp.dtype(config.dtype),
        param_dtype=jnp.dtype(config.param_dtype),
        kernel_init=nn.initializers.normal(0.02),
        name=name,
    )


def _activation(name: str):
    if name == "gelu_new":
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name == "silu":
        return jax.nn.silu
    if name == "relu":
        return jax.nn.relu
    raise ValueError(f"activation={name!r}; supported: gelu_new, gelu, silu, relu")


class Attention(nn.Module):
    config: TransformerConfig

    @nn.compact
    def __call__(self, x, positions, kv_mask, q_slots, cache, cache_index):
        cfg = self.config
        b, t, _ = x.shape
        h, kvh, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q = _dense(cfg, h * hd, cfg.qkv_bias, "q_proj")(x).reshape(b, t, h, hd)
        k = _dense(cfg, kvh * hd, cfg.qkv_bias, "k_proj")(x).reshape(b, t, kvh, hd)
        v = _dense(cfg, kvh * hd, cfg.qkv_bias, "v_proj")(x).reshape(b, t, kvh, hd)
        if not cfg.is_gpt2:
            inv_freq = rope_inv_freq(cfg)
            q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)

        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, T, D], the cache layout
        if cache is not None:
            # Write the new keys/values at slots [cache_index, cache_index + T).
            zero = jnp.zeros((), jnp.int32)
            start = (zero, zero, jnp.asarray(cache_index, jnp.int32), zero)
            k_all = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start)
            v_all = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)
            cache = {"k": k_all, "v": v_all}
            k, v = k_all.astype(q.dtype), v_all.astype(q.dtype)
        impl = resolve_attention_impl(cfg.attention, q_len=t, kv_len=k.shape[2], dtype=q.dtype, head_dim=hd,
                                      softcap=None, self_attention=cache is None)
        out = attend(q, k, v, q_slots=q_slots, kv_mask=kv_mask, scale=1.0 / math.sqrt(hd),
                     sliding_window=cfg.sliding_window, impl=impl).reshape(b, t, h * hd)
        return _dense(cfg, cfg.d_model, cfg.o_bias, "o_proj")(out), cache


class MLP(nn.Module):
    config: TransformerConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        act = _activation(cfg.activation)
        if cfg.is_gpt2:
            hidden = act(_dense(cfg, cfg.d_ff, cfg.mlp_bias, "up_proj")(x))
        else:
            gate = _dense(cfg, cfg.d_ff, cfg.mlp_bias, "gate_proj")(x)
            hidden = act(gate) * _dense(cfg, cfg.d_ff, cfg.mlp_bias, "up_proj")(x)
        return _dense(cfg, cfg.d_model, cfg.mlp_bias, "down_proj")(hidden)


class Block(nn.Module):
    config: TransformerConfig

    @nn.compact
    def __call__(self, x, positions, kv_mask, q_slots, cache, cache_index):
        cfg = self.config
        attn_out, cache = Attention(cfg, name="attn")(
            _norm(cfg, "attn_norm")(x), positions, kv_mask, q_slots, cache, cache_index
        )
        x = x + attn_out
        x = x + MLP(cfg, name="mlp")(_norm(cfg, "mlp_norm")(x))
        return x, cache


class Transformer(nn.Module):
    """Decoder-only transformer. See the module docstring for families and padding."""

    config: TransformerConfig

    @nn.compact
    def __call__(
        self,
        input_ids: jax.Array,  # [B, T] int
        attention_mask: jax.Array,  # [B, T] (no cache) or [B, S] valid cache slots (with cache)
        *,
        positions: Optional[jax.Array] = None,  # [B, T]
        cache: Optional[list] = None,
        cache_index: Optional[jax.Array] = None,
        return_logits: bool = True,
    ) -> Output:
        cfg = self.config
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        t = input_ids.shape[1]
        if cache is None:
            if positions is None:
                positions = positions_from_mask(attention_mask)
            q_slots = jnp.arange(t)
        else:
            if positions is None or cache_index is None:
                raise ValueError("decoding with a KV cache needs explicit positions and cache_index")
            q_slots = jnp.asarray(cache_index, jnp.int32) + jnp.arange(t)

        embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=pdtype,
                         embedding_init=nn.initializers.normal(0.02), name="embed")
        x = embed(input_ids)
        if cfg.is_gpt2:
            x = x + nn.Embed(cfg.max_position_embeddings, cfg.d_model, dtype=dtype, param_dtype=pdtype,
                             embedding_init=nn.initializers.normal(0.01), name="pos_embed")(positions)

        block_cls = Block
        if cfg.remat:
            block_cls = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat_policy], prevent_cse=True)
        new_cache = [] if cache is not None else None
        for i in range(cfg.n_layers):
            x, layer_cache = block_cls(cfg, name=f"layers_{i}")(
                x, positions, attention_mask, q_slots, None if cache is None else cache[i], cache_index
            )
            if new_cache is not None:
                new_cache.append(layer_cache)
        x = _norm(cfg, "final_norm")(x)

        logits = None
        if return_logits:
            if cfg.tie_embeddings:
                logits = embed.attend(x)
            else:
                logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=dtype, param_dtype=pdtype,
                                  kernel_init=nn.initializers.normal(0.02), name="lm_head")(x)
            logits = logits.astype(jnp.float32)
        return Output(logits=logits, hidden_states=x.astype(jnp.float32), cache=new_cache)


def init_params(config: TransformerConfig, rng: jax.Array) -> dict:
    """Random parameters of `config` (for tests and from-scratch runs)."""
    ids = jnp.zeros((1, 2), jnp.int32)
    return Transformer(config).init(rng, ids, jnp.ones_like(ids))["params"]
