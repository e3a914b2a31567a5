"""Token log-probs, entropies and next-token losses from hidden states, over sequence chunks.

The LM head maps [B, T, d] hidden states to [B, T, V] logits; at V = 128k-262k those logits
(float32) are the largest buffers of PPO's scoring and update and of SFT. Here the head is
applied to `chunk` positions at a time inside a `lax.scan` whose body is rematerialised
(jax.checkpoint): the forward keeps only [B, T] statistics per position and the backward
recomputes one chunk's logits at a time, so no [B, T, V] float32 buffer is ever live, only
[B, chunk, V]. Values equal the full-logits computation up to float32 rounding.

`logits_chunk` (TransformerConfig) sets the chunk length; 0 means "materialise the full
logits" (the callers then keep their plain path).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def lm_head_kernel(config, params: dict) -> jax.Array:
    """The LM head as a [d, V] matrix: the tied embedding (transposed) or lm_head's kernel."""
    if config.tie_embeddings:
        return params["embed"]["embedding"].T
    if "lm_head" not in params:
        raise ValueError("params have no lm_head (and tie_embeddings is False): not a causal LM")
    return params["lm_head"]["kernel"]


def _chunk_logits(hidden, kernel, *, compute_dtype, final_softcap, temperature):
    """[B, c, d] -> [B, c, V] float32 logits, the way the Transformer computes them."""
    dtype = jnp.dtype(compute_dtype)
    logits = jnp.einsum("bcd,dv->bcv", hidden.astype(dtype), kernel.astype(dtype)).astype(jnp.float32)
    if final_softcap is not None:
        logits = final_softcap * jnp.tanh(logits / final_softcap)
    return logits / temperature


def chunked_token_stats(
    *,
    hidden,
    kernel,
    tokens,
    compute_dtype="float32",
    temperature: float = 1.0,
    final_softcap: Optional[float] = None,
    chunk: int = 128,
    with_entropy: bool = False,
    with_argmax: bool = False,
) -> dict:
    """Per-position statistics of softmax(head(hidden) / temperature), chunk positions at a time.

    Args:
      hidden: [B, T, d] final hidden states (after the final norm).
      kernel: [d, V] LM head (see `lm_head_kernel`).
      tokens: [B, T] int ids whose log-probs are wanted (position t scores tokens[:, t]).
      compute_dtype: the head's matmul dtype (the model's `dtype`); logits are float32.
      final_softcap: logits <- cap * tanh(logits / cap) before the temperature (gemma2).

    Returns:
      {'logprobs': [B, T]} plus 'entropy' [B, T] and 'argmax' [B, T] int32 when asked; float32.
    """
    b, t, d = hidden.shape
    c = max(1, min(chunk, t))
    n = -(-t // c)
    pad = n * c - t
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    tokens = jnp.pad(tokens.astype(jnp.int32), ((0, 0), (0, pad)))
    hidden_chunks = hidden.reshape(b, n, c, d).transpose(1, 0, 2, 3)  # [n, B, c, d]
    token_chunks = tokens.reshape(b, n, c).transpose(1, 0, 2)  # [n, B, c]

    @jax.checkpoint
    def one_chunk(kernel, hidden_chunk, token_chunk):
        logits = _chunk_logits(
            hidden_chunk, kernel, compute_dtype=compute_dtype, final_softcap=final_softcap, temperature=temperature
        )  # [B, c, V]
        out = {}
        picked = jnp.take_along_axis(logits, token_chunk[..., None], axis=-1)[..., 0]  # [B, c]
        out["logprobs"] = picked - jax.nn.logsumexp(logits, axis=-1)
        if with_entropy:
            logp = jax.nn.log_softmax(logits, axis=-1)  # [B, c, V]
            safe_logp = jnp.where(jnp.isfinite(logp), logp, 0.0)  # 0 * -inf would be nan
            out["entropy"] = -jnp.sum(jnp.exp(logp) * safe_logp, axis=-1)
        if with_argmax:
            out["argmax"] = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return out

    _, stats = jax.lax.scan(lambda carry, xs: (carry, one_chunk(kernel, *xs)), None, (hidden_chunks, token_chunks))
    return {k: v.transpose(1, 0, 2).reshape(b, n * c)[:, :t] for k, v in stats.items()}  # each [B, T]


def token_logprobs_from_hidden(
    config,
    params: dict,
    hidden,
    tokens,
    *,
    temperature: float = 1.0,
    with_entropy: bool = False,
    final_softcap: Optional[float] = None,
) -> dict:
    """`chunked_token_stats` with the head, dtype and chunk length of a TransformerConfig."""
    if final_softcap is None:
        final_softcap = config.final_softcap
    return chunked_token_stats(
        hidden=hidden,
        kernel=lm_head_kernel(config, params),
        tokens=tokens,
        compute_dtype=config.dtype,
        temperature=temperature,
        final_softcap=final_softcap,
        chunk=config.logits_chunk or hidden.shape[1],
        with_entropy=with_entropy,
    )


def next_token_nll_from_hidden(config, params: dict, hidden, input_ids, loss_mask):
    """SFT's (nll, weights, correct), each [B, T-1], from hidden states [B, T, d] over chunks.

    Same contract as sft/train.py's `next_token_nll`: hidden[:, t] predicts input_ids[:, t + 1];
    nll and correct are multiplied by the weights loss_mask[:, 1:].
    """
    targets = input_ids[:, 1:].astype(jnp.int32)  # [B, T-1]
    weights = loss_mask[:, 1:].astype(jnp.float32)  # [B, T-1]
    stats = chunked_token_stats(
        hidden=hidden[:, :-1],
        kernel=lm_head_kernel(config, params),
        tokens=targets,
        compute_dtype=config.dtype,
        final_softcap=config.final_softcap,
        chunk=config.logits_chunk or hidden.shape[1],
        with_argmax=True,
    )
    nll = -stats["logprobs"] * weights
    correct = (stats["argmax"] == targets).astype(jnp.float32) * weights
    return nll, weights, correct
