"""Decoder-only transformer (nine Hugging Face families) in Flax Linen.

One backbone serves the policy, the reference, the reward and the value models: it returns the final
hidden states (after the final norm) and, when asked, language-model logits. Parameter names follow
Hugging Face's module names (q_proj, up_proj, ...) so the checkpoint mapping in `models/hf.py` /
`models/families.py` and the LoRA target names stay simple; fused HF projections (GPT-2 c_attn, GPT-NeoX
query_key_value, Phi-3 qkv_proj and gate_up_proj) are split on load and fused again on save.

Families:
  gpt2         learned positions, LayerNorm with bias, GELU (tanh), biases everywhere, tied head
  llama        RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases
  qwen2        llama + biases on q/k/v
  mistral      llama + optional sliding-window attention
  qwen3        llama + RMSNorm on queries and keys per head (q_norm, k_norm)
  phi3         llama layout (fused qkv / gate_up in HF files), partial rotary, longrope scaling
  gemma2       GeGLU (gelu tanh), RMSNorm x (1 + w), norms before and after attention and MLP,
               embeddings x sqrt(d), query_pre_attn_scalar, attention and final-logit soft-caps,
               sliding-window and global layers alternating (`layer_types`)
  gemma3_text  gemma2 + q/k norms, local/global pattern, separate RoPE base for local layers
  gpt_neox     LayerNorm with bias, GELU MLP with biases, partial rotary (rotary_pct),
               parallel residual x + attn(ln1 x) + mlp(ln2 x) (or sequential), untied head

Padding: `attention_mask` marks real tokens; left and right padding both work because positions are
derived from the mask (cumsum - 1) and padded keys are masked out. Packed rows (common/packing.py):
`segment_ids` [B, T] (0 padding, 1, 2, ... one per sequence) restart the positions at every segment and
keep attention inside each segment.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from models.attention import ATTENTION_IMPLS, attend, resolve_attention_impl
from models.mlp import MLP, mlp_rows  # noqa: F401 (MLP re-exported)
from models.mlp import dense as _dense
from models.projections import PROJECTIONS as _PROJECTIONS
from models.projections import expand_lora_targets as _expand_lora_targets
from models.rope import ROPE_TYPES, apply_rope, rope_inv_freq, rotary_dim  # noqa: F401 (re-exported)
from models.scan import init_stacked_cache, scan_layer_groups

FAMILIES = ("gpt2", "llama", "qwen2", "mistral", "qwen3", "gemma2", "gemma3_text", "gpt_neox", "phi3")
LAYER_TYPES = ("full_attention", "sliding_attention")  # HF config.layer_types entries

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
    # Per-layer attention kind ('full_attention' | 'sliding_attention'); None: every layer uses
    # `sliding_window` (mistral). Gemma 2/3 alternate local and global layers.
    layer_types: Optional[tuple] = None
    rope_local_theta: Optional[float] = None  # RoPE base of sliding layers (gemma3 rope_local_base_freq)
    rotary_pct: float = 1.0  # fraction of head_dim that is rotated (gpt_neox rotary_pct, phi3 partial)
    qk_norm: bool = False  # RMSNorm on each head's queries and keys before RoPE (qwen3, gemma3)
    query_pre_attn_scalar: Optional[float] = None  # attention scale 1/sqrt(this) instead of 1/sqrt(head_dim)
    attn_softcap: Optional[float] = None  # scores -> cap * tanh(scores / cap) (gemma2)
    final_softcap: Optional[float] = None  # logits -> cap * tanh(logits / cap) (gemma2)
    parallel_residual: bool = False  # gpt_neox: x + attn(ln1 x) + mlp(ln2 x)
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
    # The MLP over chunks of this many positions (models/mlp.py): its [B*T, d_ff] intermediates are then
    # held for one chunk at a time, forward and backward; 0 = the whole sequence at once.
    mlp_chunk: int = 0
    # One scan over groups of `layer_period()` layers, params held stacked `layers_stacked/p{j}` [G, ...]
    # (models/scan.py; HF files stay per layer). LoRA dropout masks differ from the unrolled model's.
    scan_layers: bool = False
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
        object.__setattr__(self, "lora_targets", _expand_lora_targets(self.family, self.lora_targets))
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if self.rope_scaling is not None:  # JSON gives lists; longrope factors are lists of floats
            object.__setattr__(
                self,
                "rope_scaling",
                tuple(
                    sorted(
                        (str(k), tuple(v) if isinstance(v, (list, tuple)) else v)
                        for k, v in (
                            self.rope_scaling.items() if isinstance(self.rope_scaling, dict) else self.rope_scaling
                        )
                    )
                ),
            )
        unknown = [t for t in self.lora_targets if t not in _PROJECTIONS]
        if self.family not in FAMILIES:
            raise ValueError(f"family={self.family!r}; supported: {', '.join(FAMILIES)}")
        if unknown or self.lora_rank < 0 or self.quant not in ("", "int8") or not 0 <= self.lora_dropout < 1:
            raise ValueError(
                f"lora_targets={self.lora_targets} (each one of {_PROJECTIONS}), lora_rank="
                f"{self.lora_rank} (>= 0), lora_dropout={self.lora_dropout} (in [0, 1)), "
                f"quant={self.quant!r} ('' or 'int8'): invalid value"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")
        if self.attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention={self.attention!r}; one of {ATTENTION_IMPLS}")
        if self.logits_chunk < 0:
            raise ValueError(f"logits_chunk={self.logits_chunk}; >= 0 (0 = full logits)")
        if self.mlp_chunk < 0:
            raise ValueError(f"mlp_chunk={self.mlp_chunk}; >= 0 (0 = the MLP over the whole sequence)")
        if self.remat_policy not in _REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r}; one of {sorted(_REMAT_POLICIES)}")
        if self.layer_types is not None and (
            len(self.layer_types) != self.n_layers or any(t not in LAYER_TYPES for t in self.layer_types)
        ):
            raise ValueError(
                f"layer_types={self.layer_types}: expected {self.n_layers} entries, each one of {LAYER_TYPES}"
            )
        if not 0 < rotary_dim(self) <= self.head_dim or rotary_dim(self) % 2:
            raise ValueError(
                f"rotary_pct={self.rotary_pct} with head_dim={self.head_dim} gives rotary dim "
                f"{rotary_dim(self)}; it must be even and in (0, head_dim]"
            )

    @property
    def is_gpt2(self) -> bool:
        return self.family == "gpt2"

    @property
    def is_gemma(self) -> bool:
        """RMSNorm x (1 + w), embeddings x sqrt(d), norms before and after attention and MLP."""
        return self.family in ("gemma2", "gemma3_text")

    @property
    def uses_layernorm(self) -> bool:
        """LayerNorm with bias (gpt2, gpt_neox) rather than RMSNorm."""
        return self.family in ("gpt2", "gpt_neox")

    @property
    def gated_mlp(self) -> bool:
        """act(gate_proj x) * up_proj x (llama style) rather than act(up_proj x) (gpt2, gpt_neox)."""
        return self.family not in ("gpt2", "gpt_neox")

    def layer_window(self, layer: int) -> Optional[int]:
        """Sliding window of layer `layer` (None: full attention)."""
        if self.sliding_window is None:
            return None
        if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
            return None
        return self.sliding_window

    def is_local_layer(self, layer: int) -> bool:
        """A sliding-window layer of a model with per-layer types (gemma2/3 'local' layers)."""
        return self.layer_types is not None and self.layer_types[layer] == "sliding_attention"

    def layer_period(self) -> int:
        """Smallest P with every layer i configured like layer i % P (window, local RoPE): 1 for
        uniform stacks, 2 for gemma2's alternation, 6 for gemma3's 5 local + 1 global."""
        kinds = [(self.layer_window(i), self.is_local_layer(i)) for i in range(self.n_layers)]
        return next(
            p for p in range(1, self.n_layers + 1) if all(kinds[i] == kinds[i % p] for i in range(self.n_layers))
        )

    def replace(self, **changes) -> TransformerConfig:
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
    cache: Optional[Any]  # updated KV cache (list of {'k','v'}; scan_layers: see models/scan.py) or None


def init_cache(config: TransformerConfig, batch_size: int, max_len: int, dtype=None) -> list:
    """Zero KV cache: one {'k','v'} of [B, Hkv, S, D] per layer (heads before slots: each decode
    step's attention reads contiguous [S, D] blocks per head)."""
    dtype = jnp.dtype(dtype or config.dtype)
    shape = (batch_size, config.n_kv_heads, max_len, config.head_dim)
    layers = [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(config.n_layers)]
    return init_stacked_cache(config, layers)  # scan_layers: stacked per period position (models/scan.py)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """Position ids that skip padding: 0 at the first real token of each row. [B, T]."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """Position ids of packed rows: 0 at the first token of every (contiguous) segment. [B, T]."""
    t = segment_ids.shape[-1]
    index = jnp.arange(t, dtype=jnp.int32)
    previous = jnp.concatenate([jnp.full_like(segment_ids[..., :1], -1), segment_ids[..., :-1]], axis=-1)
    starts = jnp.where(segment_ids != previous, index, 0)  # [B, T] index where each segment begins
    return index - jax.lax.cummax(starts, axis=segment_ids.ndim - 1)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis. plus_one (Gemma): x_hat * (1 + w) in float32, w initialised 0;
    otherwise (Llama): x_hat cast to the compute dtype, times w (initialised 1)."""

    eps: float
    dtype: Any
    param_dtype: Any
    plus_one: bool = False

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.plus_one else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.plus_one:
            return (normed * (1.0 + scale.astype(jnp.float32))).astype(self.dtype)
        return normed.astype(self.dtype) * scale.astype(self.dtype)


def _norm(config: TransformerConfig, name: str):
    dtype, pdtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    if config.uses_layernorm:
        return nn.LayerNorm(epsilon=config.norm_eps, dtype=dtype, param_dtype=pdtype, name=name)
    return RMSNorm(eps=config.norm_eps, dtype=dtype, param_dtype=pdtype, plus_one=config.is_gemma, name=name)


class Attention(nn.Module):
    config: TransformerConfig
    layer: int = 0  # index of the block: picks the layer's window and RoPE (local/global)

    @nn.compact
    def __call__(self, x, positions, kv_mask, q_slots, cache, cache_index, segment_ids=None):
        """x: rows [B*T, d] (Block's layout); positions [B, T] give B and T. Returns rows [B*T, d]."""
        cfg = self.config
        b, t = positions.shape
        h, kvh, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        q = _dense(cfg, h * hd, cfg.qkv_bias, "q_proj")(x).reshape(b, t, h, hd)
        k = _dense(cfg, kvh * hd, cfg.qkv_bias, "k_proj")(x).reshape(b, t, kvh, hd)
        v = _dense(cfg, kvh * hd, cfg.qkv_bias, "v_proj")(x).reshape(b, t, kvh, hd)
        if cfg.qk_norm:  # per head, over head_dim, before RoPE (qwen3, gemma3)
            q, k = _norm(cfg, "q_norm")(q), _norm(cfg, "k_norm")(k)
        if not cfg.is_gpt2:
            inv_freq, factor = rope_inv_freq(cfg, local=cfg.is_local_layer(self.layer), positions=positions)
            q, k = apply_rope(q, positions, inv_freq, factor), apply_rope(k, positions, inv_freq, factor)

        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, T, D], the cache layout
        if cache is not None:
            # Write the new keys/values at slots [cache_index, cache_index + T).
            zero = jnp.zeros((), jnp.int32)
            start = (zero, zero, jnp.asarray(cache_index, jnp.int32), zero)
            k_all = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start)
            v_all = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)
            cache = {"k": k_all, "v": v_all}
            k, v = k_all.astype(q.dtype), v_all.astype(q.dtype)
        scale = 1.0 / math.sqrt(cfg.query_pre_attn_scalar if cfg.query_pre_attn_scalar else hd)
        impl = resolve_attention_impl(
            cfg.attention,
            q_len=t,
            kv_len=k.shape[2],
            dtype=q.dtype,
            head_dim=hd,
            softcap=cfg.attn_softcap,
            self_attention=cache is None,
        )
        out = attend(
            q,
            k,
            v,
            q_slots=q_slots,
            kv_mask=kv_mask,
            scale=scale,
            sliding_window=cfg.layer_window(self.layer),
            softcap=cfg.attn_softcap,
            impl=impl,
            segment_ids=segment_ids,
        ).reshape(b * t, h * hd)
        return _dense(cfg, cfg.d_model, cfg.o_bias, "o_proj")(out), cache


class Block(nn.Module):
    """One layer. Pre-norm residual x + attn(norm x), then x + mlp(norm x); Gemma also norms each
    branch's output (post_attn_norm, post_mlp_norm); GPT-NeoX's parallel residual feeds both
    branches from the same x."""

    config: TransformerConfig
    layer: int = 0

    @nn.compact
    def __call__(self, x, positions, kv_mask, q_slots, cache, cache_index, segment_ids=None):
        cfg = self.config
        b, t, d = x.shape
        # The residual stream, norms and projections run on rows [B*T, d]; only the attention core
        # sees [B, T, H, D]. Same numbers; XLA:CPU then sums bias and norm-scale gradients over one
        # axis instead of through its much slower multi-axis reduction trees.
        x = x.reshape(b * t, d)

        def mlp(rows):  # over chunks of cfg.mlp_chunk positions when the sequence is longer (models/mlp.py)
            return mlp_rows(cfg, rows, b, t, initializing=self.is_initializing())

        attn_out, cache = Attention(cfg, layer=self.layer, name="attn")(
            _norm(cfg, "attn_norm")(x), positions, kv_mask, q_slots, cache, cache_index, segment_ids
        )
        if cfg.is_gemma:
            attn_out = _norm(cfg, "post_attn_norm")(attn_out)
        if cfg.parallel_residual:
            return (x + attn_out + mlp(_norm(cfg, "mlp_norm")(x))).reshape(b, t, d), cache
        x = x + attn_out
        mlp_out = mlp(_norm(cfg, "mlp_norm")(x))
        if cfg.is_gemma:
            mlp_out = _norm(cfg, "post_mlp_norm")(mlp_out)
        return (x + mlp_out).reshape(b, t, d), cache


def _checkpointed(cfg: TransformerConfig, cls):
    """cls with jax.checkpoint on its __call__ when cfg.remat (else cls)."""
    return nn.remat(cls, policy=_REMAT_POLICIES[cfg.remat_policy], prevent_cse=True) if cfg.remat else cls


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
        segment_ids: Optional[jax.Array] = None,  # [B, T] packed rows: 0 padding, 1, 2, ... per sequence
    ) -> Output:
        cfg = self.config
        dtype, pdtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
        t = input_ids.shape[1]
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids (packed rows) are for training and scoring forwards, not KV-cache decoding")
        if cache is None:
            if positions is None:
                positions = (
                    positions_from_mask(attention_mask) if segment_ids is None else positions_from_segments(segment_ids)
                )
            q_slots = jnp.arange(t)
        else:
            if positions is None or cache_index is None:
                raise ValueError("decoding with a KV cache needs explicit positions and cache_index")
            q_slots = jnp.asarray(cache_index, jnp.int32) + jnp.arange(t)

        embed = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            dtype=dtype,
            param_dtype=pdtype,
            embedding_init=nn.initializers.normal(0.02),
            name="embed",
        )
        x = embed(input_ids)
        if cfg.is_gemma:  # HF multiplies by sqrt(d) rounded to the compute dtype
            x = x * jnp.asarray(math.sqrt(cfg.d_model), dtype)
        if cfg.is_gpt2:
            x = x + nn.Embed(
                cfg.max_position_embeddings,
                cfg.d_model,
                dtype=dtype,
                param_dtype=pdtype,
                embedding_init=nn.initializers.normal(0.01),
                name="pos_embed",
            )(positions)

        checkpointed = functools.partial(_checkpointed, cfg)
        block_cls = checkpointed(Block)
        new_cache = [] if cache is not None else None
        first_unrolled, stacked_cache, layer_caches = 0, None, cache
        if cfg.scan_layers:  # layers 0 .. G*P-1: one scan over stacked params (models/scan.py)
            x, stacked_cache, layer_caches, first_unrolled = scan_layer_groups(
                cfg, Block, x, positions, attention_mask, q_slots, cache, cache_index, segment_ids,
                wrap=checkpointed, initializing=self.is_initializing(),
            )  # fmt: skip
        for i in range(first_unrolled, cfg.n_layers):
            layer_cache = None if cache is None else layer_caches[i - first_unrolled]
            x, layer_cache = block_cls(cfg, layer=i, name=f"layers_{i}")(
                x, positions, attention_mask, q_slots, layer_cache, cache_index, segment_ids
            )
            if new_cache is not None:
                new_cache.append(layer_cache)
        if stacked_cache is not None:
            new_cache = {"stacked": stacked_cache, "layers": new_cache}
        x = _norm(cfg, "final_norm")(x)

        logits = None
        if return_logits:
            if cfg.tie_embeddings:
                logits = embed.attend(x)
            else:
                logits = nn.Dense(
                    cfg.vocab_size,
                    use_bias=False,
                    dtype=dtype,
                    param_dtype=pdtype,
                    kernel_init=nn.initializers.normal(0.02),
                    name="lm_head",
                )(x)
            logits = logits.astype(jnp.float32)
            if cfg.final_softcap is not None:
                logits = cfg.final_softcap * jnp.tanh(logits / cfg.final_softcap)
        return Output(logits=logits, hidden_states=x.astype(jnp.float32), cache=new_cache)


def init_params(config: TransformerConfig, rng: jax.Array) -> dict:
    """Random parameters of `config` (for tests and from-scratch runs)."""
    ids = jnp.zeros((1, 2), jnp.int32)
    return Transformer(config).init(rng, ids, jnp.ones_like(ids))["params"]
