"""The transformer's projections and MLP, and the MLP over sequence chunks (`mlp_chunk`).

At real shapes the MLP's intermediates are the largest activations of a layer: [B*T, d_ff] per
gate / up / activation and their cotangents, e.g. 8 x 2048 tokens x 8192 x 2 B = 256 MiB each at a
1B Llama shape in bf16, about seven of them live in a remat'd layer's backward pass. They are
token-wise, so `mlp_chunk = C` runs the MLP over chunks of C positions of every sequence at a time
(a scan whose body is rematerialised, so each chunk's intermediates exist only while that chunk is
computed, in the forward and in the backward pass), as long-sequence trainers tile their MLPs
(e.g. ArcticTraining's TiledMLP). Same parameters and the same per-row products; the weight
gradients are summed chunk by chunk (float rounding). Costs one more MLP forward in the backward
pass. Each chunk takes the same positions of every row, so a batch sharded over devices keeps every
device busy in every chunk.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.projections import LoRADense, QuantDense, RowsDense


def dense(config, features: int, use_bias: bool, name: str):
    """Projection `name`: int8 QuantDense (config.quant), LoRADense (named in lora_targets), or RowsDense."""
    lora = config.lora_rank > 0 and name in config.lora_targets
    common = dict(
        features=features,
        use_bias=use_bias,
        dtype=jnp.dtype(config.dtype),
        param_dtype=jnp.dtype(config.param_dtype),
        kernel_init=nn.initializers.normal(0.02),
        name=name,
    )
    if config.quant == "int8":  # frozen int8 base, float adapters when also LoRA (QLoRA-style)
        rank = config.lora_rank if lora else 0
        return QuantDense(lora_rank=rank, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, **common)
    if lora:
        return LoRADense(rank=config.lora_rank, alpha=config.lora_alpha, dropout=config.lora_dropout, **common)
    return RowsDense(**common)


def activation(name: str):
    if name == "gelu_new":
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name == "silu":
        return jax.nn.silu
    if name == "relu":
        return jax.nn.relu
    raise ValueError(f"activation={name!r}; supported: gelu_new, gelu, silu, relu")


class MLP(nn.Module):
    config: object

    @nn.compact
    def __call__(self, x):  # rows [N, d] -> [N, d]
        cfg = self.config
        act = activation(cfg.activation)
        if not cfg.gated_mlp:
            hidden = act(dense(cfg, cfg.d_ff, cfg.mlp_bias, "up_proj")(x))
        else:
            gate = dense(cfg, cfg.d_ff, cfg.mlp_bias, "gate_proj")(x)
            hidden = act(gate) * dense(cfg, cfg.d_ff, cfg.mlp_bias, "up_proj")(x)
        return dense(cfg, cfg.d_model, cfg.mlp_bias, "down_proj")(hidden)


class _MLPChunkStep(MLP):
    """MLP as a scan body: (carry, rows of one chunk) -> (carry, MLP(rows))."""

    def __call__(self, carry, x):
        return carry, super().__call__(x)


def chunk_count(length: int, chunk: int) -> int:
    """Chunks of `chunk` positions that cover `length` (1: the MLP runs unchunked)."""
    return 1 if chunk <= 0 or length <= chunk else math.ceil(length / chunk)


def mlp_rows(config, x, batch: int, length: int, *, initializing: bool = False, name: str = "mlp"):
    """The block's MLP on rows x [batch * length, d] -> [batch * length, d]; over chunks of
    config.mlp_chunk positions when the sequence is longer (see the module docstring). The
    parameters are those of MLP(config, name=name) either way."""
    n = chunk_count(length, config.mlp_chunk)
    if n == 1 or initializing:
        return MLP(config, name=name)(x)
    d = x.shape[-1]
    size = math.ceil(length / n)
    seq = x.reshape(batch, length, d)
    if n * size != length:  # zero positions at the end of every row: token-wise, then dropped
        seq = jnp.pad(seq, ((0, 0), (0, n * size - length), (0, 0)))
    # [n, batch * size, d]: chunk i holds positions i*size .. (i+1)*size - 1 of every row
    chunks = seq.reshape(batch, n, size, d).swapaxes(0, 1).reshape(n, batch * size, d)
    scan = nn.scan(
        nn.remat(_MLPChunkStep, prevent_cse=False),  # inside a scan, CSE cannot merge across steps
        variable_broadcast="params",
        split_rngs={"params": False, "dropout": True},
        length=n,
    )
    _, out = scan(config, name=name)(jnp.zeros((), jnp.int32), chunks)
    out = out.reshape(n, batch, size, d).swapaxes(0, 1).reshape(batch, n * size, d)[:, :length]
    return out.reshape(batch * length, d)
