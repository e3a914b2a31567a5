"""Batched autoregressive generation with a KV cache, compiled as one XLA program.

`generate(params, config, prompt_ids, prompt_mask, rng, max_new_tokens=N, ...)` takes LEFT-padded
prompts [B, P] of different lengths and returns prompt + response, the response mask and the
log-probs of the sampled tokens (`SampleOutput`).

How it runs (all inside one `jax.jit`, no Python loop per token):
  1. prefill: the first P-1 prompt slots go through the model in one forward pass, filling a
     KV cache of S = P + N slots (no logits are computed for the prompt);
  2. decode: a `lax.while_loop` feeds one token per step. Step t writes slot P-1+t (step 0 feeds
     the last prompt token, whose logits give the first new token) and samples the token that
     will sit in slot P+t. The loop stops when every row is done or after N steps.
Positions continue each row's own count: a row with L real prompt tokens gives its first new
token position L, whatever its padding. The valid-slot mask is [prompt_mask, 1 ... 1]; future
slots are hidden by the model's causal (slot-order) mask, so it never changes during decoding.

Sliding-window and global layers (mistral, phi3, qwen3 with use_sliding_window, gemma2/3) share
one cache layout: every layer keeps all S slots and a sliding layer masks keys more than its
window behind the query slot (slot distance, padding included, as Hugging Face's masks count it).

Stopping: a row is done once it emits `eos_token_id` or any of `stop_token_ids`; that token
is kept (mask 1), later tokens are `pad_token_id` with mask 0 and log-prob 0.

Sampling order (as in Hugging Face): logits / temperature -> top-k -> top-p (nucleus) ->
draw, with key `fold_in(rng, t)` at step t, so a fixed rng gives fixed samples (see
`sample_logits` for how tokens are drawn cheaply on CPU).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from models.lm_head import lm_head_kernel
from models.transformer import Transformer, TransformerConfig, init_cache, positions_from_mask


@flax.struct.dataclass
class SampleOutput:
    """Result of `generate`. N = max_new_tokens; positions after a row's stop are padding.

    logprobs: log-prob of each sampled token under softmax(logits / temperature), i.e. the
      tempered model distribution BEFORE top-k / top-p filtering (for greedy or temperature 0:
      under softmax(logits), temperature 1). 0 where response_mask is 0. They are what the
      sampler saw, computed with the KV cache in the config's dtype; PPO recomputes log-probs
      with a full forward pass anyway.
    """

    sequences: jax.Array  # [B, P + N] int32: prompt (left-padded, unchanged) then response
    response_ids: jax.Array  # [B, N] int32: new tokens, pad after the stop token
    response_mask: jax.Array  # [B, N] int32: 1 up to and including the stop token, 0 after
    response_lengths: jax.Array  # [B] int32: number of real response tokens (stop token included)
    ended_with_eos: jax.Array  # [B] bool: the row emitted eos_token_id or one of stop_token_ids
    logprobs: jax.Array  # [B, N] float32, see above


# ----------------------------------------------------------------------------- filters and draws
# CPU note: XLA:CPU sorts slowly (a [16, 2048] sort takes ~7 ms, longer than a small model's decode
# step) and Gumbel-max draws B*V random numbers per step, so the nucleus threshold is found by
# bisection and tokens are drawn by inverse CDF with one uniform per row. Both are exact up to
# float32 rounding and cost a few O(V) reductions on any backend.


def top_k_filter(logits: jax.Array, *, k: int) -> jax.Array:
    """Keep the k largest logits of each row, set the rest to -inf. k <= 0 (or >= V) is a no-op.

    Tokens tied with the k-th largest logit are all kept. logits [..., V].
    """
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth_largest = jax.lax.top_k(logits, k)[0][..., -1:]  # [..., 1]
    return jnp.where(logits >= kth_largest, logits, -jnp.inf)


def top_p_filter(logits: jax.Array, *, p: float) -> jax.Array:
    """Nucleus filter: keep the smallest set of most likely tokens whose total prob is >= p.

    Probabilities are softmax(logits). The most likely token is always kept; p >= 1 is a no-op.
    Tokens tied with the least likely kept token are kept too. Returns logits with the dropped
    entries set to -inf. logits [..., V].

    The kept set is {prob >= q*} with q* the largest q whose set still holds mass >= p. The mass
    is monotone in q, so q* is found by bisection over the bit patterns of non-negative float32
    values (ordered like the values): 31 halvings pin it exactly, with no sort.
    """
    if p >= 1.0:
        return logits
    logits = logits.astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1)  # [..., V]

    def mass_reaches_p(bits):  # [..., 1] int32 -> [..., 1] bool
        q = jax.lax.bitcast_convert_type(bits, jnp.float32)
        return jnp.sum(jnp.where(probs >= q, probs, 0.0), axis=-1, keepdims=True) >= p

    def halve(_, bounds):  # invariant: mass(lo) >= p > mass(hi), except that p may be <= 0
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        ok = mass_reaches_p(mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    max_bits = jax.lax.bitcast_convert_type(jnp.max(probs, axis=-1, keepdims=True), jnp.int32)
    lo, _ = jax.lax.fori_loop(0, 31, halve, (jnp.zeros_like(max_bits), max_bits + 1))
    threshold = jax.lax.bitcast_convert_type(lo, jnp.float32)  # [..., 1] = q*
    return jnp.where(probs >= threshold, logits, -jnp.inf)


def _inverse_cdf_draw(weights: jax.Array, uniform: jax.Array) -> jax.Array:
    """Index i with probability weights[i] / sum(weights), per row. weights [B, V] >= 0 (row max > 0),
    uniform [B] in [0, 1). Two levels (blocks of ~sqrt(V), then inside the chosen block) keep it
    O(V) with short cumsums. Zero-weight tokens are never returned."""
    b, v = weights.shape
    block = max(16, 1 << int(np.ceil(np.log2(np.sqrt(v)))))
    n_blocks = -(-v // block)
    blocks = jnp.pad(weights, ((0, 0), (0, n_blocks * block - v))).reshape(b, n_blocks, block)
    block_mass = blocks.sum(axis=-1)  # [B, nb]
    block_cdf = jnp.cumsum(block_mass, axis=-1)  # [B, nb]
    total = block_cdf[:, -1]
    # Target mass in [0, total); `<=` below skips zero-weight entries at the boundary.
    target = jnp.minimum(uniform * total, jnp.nextafter(total, 0.0))  # [B]
    chosen = jnp.minimum(jnp.sum(block_cdf <= target[:, None], axis=-1), n_blocks - 1)  # [B]
    inner = jnp.take_along_axis(blocks, chosen[:, None, None], axis=1)[:, 0]  # [B, block]
    inner_cdf = jnp.cumsum(inner, axis=-1)
    before = jnp.take_along_axis(block_cdf - block_mass, chosen[:, None], axis=1)[:, 0]
    rest = jnp.clip(target - before, 0.0, jnp.nextafter(inner_cdf[:, -1], 0.0))
    return chosen * block + jnp.sum(inner_cdf <= rest[:, None], axis=-1)


def sample_logits(
    logits: jax.Array,
    rng: Optional[jax.Array],
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    greedy: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Draw one token per row from logits [B, V]. Returns (tokens [B] int32, logprobs [B] f32).

    Order: logits / temperature -> top_k_filter -> top_p_filter -> draw (inverse CDF with
    `jax.random.uniform(rng, [B])`; float32 resolution, so tokens with probability below ~1e-7
    are drawn with a relative bias, as with JAX's default Gumbel sampler). greedy (or
    temperature == 0) takes the argmax and ignores rng. logprobs are those of the tempered,
    unfiltered distribution (see SampleOutput).
    """
    logits = logits.astype(jnp.float32)
    greedy = greedy or temperature == 0
    scaled = logits if greedy or temperature == 1.0 else logits / temperature
    log_probs = jax.nn.log_softmax(scaled, axis=-1)  # [B, V]
    if greedy:
        tokens = jnp.argmax(logits, axis=-1)
    else:
        filtered = top_p_filter(top_k_filter(scaled, k=top_k), p=top_p)
        weights = jnp.exp(filtered - jnp.max(filtered, axis=-1, keepdims=True))  # [B, V], max 1
        tokens = _inverse_cdf_draw(weights, jax.random.uniform(rng, (logits.shape[0],)))
    tokens = tokens.astype(jnp.int32)
    return tokens, jnp.take_along_axis(log_probs, tokens[:, None], axis=-1)[:, 0]


# ----------------------------------------------------------------------------- generation


def _check_settings(config, max_new_tokens, temperature, top_k, top_p):
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}")
    if not isinstance(config, TransformerConfig):
        raise TypeError(f"config must be a TransformerConfig, got {type(config).__name__}")


def make_generate_fn(
    config: TransformerConfig,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: Optional[int] = None,
    stop_token_ids: Sequence[int] = (),
    greedy: bool = False,
):
    """Jitted `fn(params, prompt_ids [B, P], prompt_mask [B, P], rng) -> SampleOutput`.

    Settings are compile-time constants; the function is cached per (config, settings), and
    jax.jit caches one program per prompt shape. eos_token_id None -> config.eos_token_id;
    pass -1 to disable EOS. Nothing is donated.
    """
    _check_settings(config, max_new_tokens, temperature, top_k, top_p)
    if eos_token_id is None:
        eos_token_id = config.eos_token_id
    stops = {int(i) for i in stop_token_ids}
    if eos_token_id is not None and eos_token_id >= 0:
        stops.add(int(eos_token_id))
    return _build_generate_fn(
        config,
        int(max_new_tokens),
        float(temperature),
        int(top_k),
        float(top_p),
        tuple(sorted(stops)),
        bool(greedy or temperature == 0),
    )


def _lay_out_tied_head() -> bool:
    """Whether generate lays a tied LM head out as [d, V] before decoding: on XLA:CPU only (see run)."""
    return jax.default_backend() == "cpu"


@functools.lru_cache(maxsize=64)
def _build_generate_fn(config, max_new_tokens, temperature, top_k, top_p, stop_ids, greedy):
    model = Transformer(config)
    n = max_new_tokens
    pad_id = config.pad_token_id
    if pad_id is None:
        pad_id = stop_ids[0] if stop_ids else 0
    stop_array = np.asarray(stop_ids, np.int32)  # [K], may be empty
    compute_dtype = jnp.dtype(config.dtype)

    def run(params, prompt_ids, prompt_mask, rng):
        b, p = prompt_ids.shape
        prompt_ids = prompt_ids.astype(jnp.int32)
        prompt_mask = (prompt_mask > 0).astype(jnp.int32)
        prompt_lengths = prompt_mask.sum(axis=-1)  # [B]
        # Response slots are all "valid": the causal slot mask hides those not yet written.
        kv_mask = jnp.concatenate([prompt_mask, jnp.ones((b, n), jnp.int32)], axis=1)  # [B, S]
        cache = init_cache(config, b, p + n)
        if p > 1:
            positions = positions_from_mask(prompt_mask)  # [B, P]
            cache = model.apply(
                {"params": params},
                prompt_ids[:, :-1],
                kv_mask,
                positions=positions[:, :-1],
                cache=cache,
                cache_index=0,
                return_logits=False,
            ).cache

        # On XLA:CPU the LM head is laid out (and cast) once before the loop as a [d, V] matrix: its Eigen dot runs
        # the tied head x . E^T (E [V, d], contracting E's minor axis) at ~3 GFLOP/s at V = 50k, x @ [d, V] at ~40
        # (benchmarks/decode_profile.py). Elsewhere a tied head stays E: a transposed copy would be V x d more
        # memory (1 GiB at 8B, V = 128k, bf16) for a layout GPU/TPU dots do not need. Same products and sums
        # either way, so the same logits up to float rounding.
        if config.tie_embeddings and not _lay_out_tied_head():
            embed = params["embed"]["embedding"]  # [V, d]

            def head_logits(h):  # [B, d] -> [B, V]
                return jnp.einsum("bd,vd->bv", h.astype(compute_dtype), embed.astype(compute_dtype))
        else:
            head = lm_head_kernel(config, params).astype(compute_dtype)  # [d, V]

            def head_logits(h):
                return jnp.dot(h.astype(compute_dtype), head)

        def cond(state):
            return (state["t"] < n) & ~jnp.all(state["done"])

        def body(state):
            t = state["t"]
            positions = (prompt_lengths - 1 + t)[:, None]  # [B, 1]
            out = model.apply(
                {"params": params},
                state["token"][:, None],
                kv_mask,
                positions=positions,
                cache=state["cache"],
                cache_index=p - 1 + t,
                return_logits=False,
            )
            logits = head_logits(out.hidden_states[:, 0]).astype(jnp.float32)  # [B, V]
            if config.final_softcap is not None:
                logits = config.final_softcap * jnp.tanh(logits / config.final_softcap)
            step_rng = None if greedy else jax.random.fold_in(rng, t)
            token, logprob = sample_logits(
                logits, step_rng, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy
            )  # [B], [B]
            live = ~state["done"]
            token = jnp.where(live, token, pad_id)
            logprob = jnp.where(live, logprob, 0.0)
            stopped = live & jnp.isin(token, stop_array) if stop_ids else jnp.zeros_like(live)
            return dict(
                t=t + 1,
                cache=out.cache,
                token=token,
                done=state["done"] | stopped,
                ended=state["ended"] | stopped,
                lengths=state["lengths"] + live.astype(jnp.int32),
                tokens=jax.lax.dynamic_update_slice(state["tokens"], token[:, None], (0, t)),
                logprobs=jax.lax.dynamic_update_slice(state["logprobs"], logprob[:, None], (0, t)),
            )

        init = dict(
            t=jnp.zeros((), jnp.int32),
            cache=cache,
            token=prompt_ids[:, -1],
            done=jnp.zeros((b,), bool),
            ended=jnp.zeros((b,), bool),
            lengths=jnp.zeros((b,), jnp.int32),
            tokens=jnp.full((b, n), pad_id, jnp.int32),
            logprobs=jnp.zeros((b, n), jnp.float32),
        )
        final = jax.lax.while_loop(cond, body, init)
        response_mask = (jnp.arange(n)[None, :] < final["lengths"][:, None]).astype(jnp.int32)  # [B, N]
        return SampleOutput(
            sequences=jnp.concatenate([prompt_ids, final["tokens"]], axis=1),
            response_ids=final["tokens"],
            response_mask=response_mask,
            response_lengths=final["lengths"],
            ended_with_eos=final["ended"],
            logprobs=final["logprobs"],
        )

    return jax.jit(run)


def _check_prompts(config, prompt_ids, prompt_mask, max_new_tokens):
    """Shape checks always; left-padding checks when the arrays are concrete (not traced)."""
    if prompt_ids.ndim != 2 or prompt_ids.shape != prompt_mask.shape:
        raise ValueError(f"prompt_ids {prompt_ids.shape} and prompt_mask {prompt_mask.shape} must both be [B, P]")
    if prompt_ids.shape[1] < 1:
        raise ValueError("prompts are empty (P = 0); every row needs at least one token")
    if isinstance(prompt_mask, jax.core.Tracer):
        return
    mask = np.asarray(prompt_mask) > 0
    lengths = mask.sum(axis=1)
    for row in range(mask.shape[0]):
        if lengths[row] == 0:
            raise ValueError(f"prompt row {row} has no real tokens (prompt_mask is all 0)")
        if not mask[row, mask.shape[1] - lengths[row] :].all():
            raise ValueError(
                f"prompt row {row} is not left-padded: prompt_mask must be 0...0 1...1, "
                f"got {mask[row].astype(int).tolist()}"
            )
    if config.is_gpt2 and lengths.max() + max_new_tokens > config.max_position_embeddings:
        raise ValueError(
            f"longest prompt ({lengths.max()}) + max_new_tokens ({max_new_tokens}) exceeds "
            f"max_position_embeddings={config.max_position_embeddings} of this GPT-2 model"
        )


def generate(
    params,
    config: TransformerConfig,
    prompt_ids,
    prompt_mask,
    rng,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: Optional[int] = None,
    stop_token_ids: Sequence[int] = (),
    greedy: bool = False,
) -> SampleOutput:
    """Sample up to max_new_tokens for each LEFT-padded prompt (see the module docstring).

    params: the Transformer's parameters; prompt_ids, prompt_mask: [B, P] (mask 1 = real token);
    rng: a PRNG key (may be None when greedy). temperature 0 or greedy=True -> argmax; top_k 0 and
    top_p 1.0 switch those filters off. eos_token_id None -> config.eos_token_id, -1 -> no EOS;
    stop_token_ids: extra ids that end a row like EOS. Returns SampleOutput.
    """
    prompt_ids, prompt_mask = jnp.asarray(prompt_ids), jnp.asarray(prompt_mask)
    _check_prompts(config, prompt_ids, prompt_mask, max_new_tokens)
    if rng is None:
        if not (greedy or temperature == 0):
            raise ValueError("rng is None but sampling is not greedy; pass a key from jax.random.key(seed)")
        rng = jax.random.key(0)  # unused by the greedy program
    fn = make_generate_fn(
        config,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        eos_token_id=eos_token_id,
        stop_token_ids=stop_token_ids,
        greedy=greedy,
    )
    return fn(params, prompt_ids, prompt_mask, rng)
