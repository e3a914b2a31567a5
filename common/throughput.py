"""Throughput in every log: real (non-pad) tokens/s, step time and model FLOPs utilisation.

Model FLOPs (what is counted; the PaLM / Chinchilla convention, useful work only):
  matmuls     2 * N_matmul FLOPs per token and forward pass, N_matmul = every parameter that
              multiplies an activation (projections, MLPs, the LM head or the tied embedding when
              logits are computed; not the embedding lookups, norms or biases);
  attention   4 * n_heads * head_dim FLOPs per layer for each (query, key) pair a real token
              attends to (QK^T and AV): for a token at position p of its sequence, p + 1 keys,
              min(p + 1, window) on sliding-window layers. Masked-out pairs (padding, other
              segments of a packed row) are not counted, even where a kernel computes them;
  training    forward + backward = 3 forward passes (rematerialisation's extra forward is not
              counted: MFU, not hardware FLOPs utilisation).
MFU = model FLOPs / s / peak: the device's dense bf16 peak from `PEAK_FLOPS` (by
jax's device_kind), `logging.peak_flops` when set, or on CPU a measured fp32 matmul peak
(`measured_cpu_peak`: a ~0.3 s probe, once per process).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

# Dense (no sparsity) bf16 peak FLOP/s per device, by jax's `device_kind` (substring match, first wins).
PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100", 989e12),  # SXM; PCIe parts are lower (756e12), matched by the 'PCIe' entry first below
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("V100", 125e12),  # fp16 tensor cores (no bf16)
    ("TPU v6", 918e12),
    ("TPU v5p", 459e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v4", 275e12),
    ("TPU v3", 123e12),
)
_PCIE = (("H100 PCIe", 756e12),)


def device_peak_flops(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s of one device of this kind, or None when unknown."""
    for name, peak in _PCIE + PEAK_FLOPS:
        if name.lower() in device_kind.lower():
            return peak
    return None


@functools.lru_cache(maxsize=1)
def measured_cpu_peak(size: int = 1024, seconds: float = 0.3) -> float:
    """FLOP/s of a float32 [size, size] matmul on this host's CPU backend, measured once per process."""
    a = jnp.ones((size, size), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        matmul(a).block_until_ready()
        runs += 1
    return 2.0 * size**3 * runs / (time.perf_counter() - start)


def peak_flops(configured: float = 0.0) -> tuple[float | None, str]:
    """(peak FLOP/s of all local devices together, where it came from). configured > 0 wins
    (per device); < 0 turns MFU off."""
    devices = jax.local_devices()
    if configured > 0:
        return configured * len(devices), "logging.peak_flops"
    if configured < 0:
        return None, "off"
    kind = devices[0].device_kind
    if devices[0].platform == "cpu":
        return measured_cpu_peak(), "measured fp32 matmul"
    peak = device_peak_flops(kind)
    return (None, f"unknown device {kind!r}") if peak is None else (peak * len(devices), f"bf16 table ({kind})")


def matmul_params(config, *, lm_head: bool) -> int:
    """N_matmul of a TransformerConfig: parameters that multiply activations, per token."""
    c = config
    attn = c.d_model * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads)  # q, o and k, v
    mlp = c.d_model * c.d_ff * (3 if c.gated_mlp else 2)
    return c.n_layers * (attn + mlp) + (c.d_model * c.vocab_size if lm_head else 0)


def token_stats(real, positions, *, window=None) -> dict:
    """Device metrics of one batch: real tokens and the (query, key) pairs they attend to.

    real [..., T] 1 on real tokens; positions [..., T] each token's position in its sequence.
    Returns float32 scalars: tokens, slots (all positions, real or not), attended (sum of p + 1)
    and, with a window, attended_window (sum of min(p + 1, window)).
    """
    realf = (jnp.asarray(real) > 0).astype(jnp.float32)
    keys = jnp.asarray(positions).astype(jnp.float32) + 1.0
    out = {
        "tokens": jnp.sum(realf),
        "slots": jnp.asarray(realf.size, jnp.float32),
        "attended": jnp.sum(realf * keys),
    }
    if window is not None:
        out["attended_window"] = jnp.sum(realf * jnp.minimum(keys, float(window)))
    return out


def positions_of_mask(mask):
    """Positions of right- or left-padded rows: cumsum(mask) - 1 (as models/transformer.py)."""
    return jnp.maximum(jnp.cumsum(jnp.asarray(mask).astype(jnp.int32), axis=-1) - 1, 0)


def forward_flops(config, *, tokens, attended, attended_window=0.0, lm_head: bool) -> float:
    """Model FLOPs of one forward pass over `tokens` real tokens (see the module docstring)."""
    windowed = sum(1 for i in range(config.n_layers) if config.layer_window(i) is not None)
    per_pair = 4.0 * config.n_heads * config.head_dim
    attention = per_pair * ((config.n_layers - windowed) * attended + windowed * attended_window)
    return 2.0 * matmul_params(config, lm_head=lm_head) * tokens + attention


class Meter:
    """Turns the loop's per-step device metrics (with `token_stats`' keys) into perf/ fields.

    flops_fn(summed_metrics) -> model FLOPs of those steps. `mark(step)` starts the clock (the
    loop marks after the first step has finished, so compilation is left out of the rates);
    `fields(step, per_step_metrics)` measures the steps since the last mark and marks again.
    """

    def __init__(self, flops_fn, *, peak: float | None):
        self.flops_fn, self.peak = flops_fn, peak
        self._step, self._time = None, None

    def mark(self, step: int) -> None:
        self._step, self._time = step, time.perf_counter()

    def fields(self, step: int, per_step: list[dict]) -> dict:
        """perf/tokens_per_s, perf/step_time_s, perf/model_flops_per_s and perf/mfu (when a peak is
        known) over the steps since the last mark; {} when none."""
        if self._step is None or step <= self._step:
            return {}
        elapsed = max(time.perf_counter() - self._time, 1e-9)
        steps = step - self._step
        recent = per_step[-steps:]
        totals = {k: float(np.sum([m[k] for m in recent])) for k in recent[0] if k in _SUMMED}
        flops = self.flops_fn(totals)
        out = {
            "perf/tokens_per_s": totals.get("tokens", 0.0) / elapsed,
            "perf/step_time_s": elapsed / steps,
            "perf/model_flops_per_s": flops / elapsed,
        }
        if self.peak:
            out["perf/mfu"] = flops / elapsed / self.peak
        self.mark(step)
        return out


_SUMMED = ("tokens", "slots", "attended", "attended_window")


def training_meter(config, model_config, *, lm_head: bool) -> Meter:
    """A Meter for a supervised trainer (RM, SFT): 3 forward passes of `model_config` per token."""
    configured = float(config.logging.get("peak_flops", 0.0)) if "logging" in config else 0.0
    peak, source = peak_flops(configured)
    print(f"throughput: MFU against {'no peak' if peak is None else f'{peak:.3g} FLOP/s'} ({source})", flush=True)

    def flops(totals):
        return 3.0 * forward_flops(
            model_config,
            tokens=totals.get("tokens", 0.0),
            attended=totals.get("attended", 0.0),
            attended_window=totals.get("attended_window", 0.0),
            lm_head=lm_head,
        )

    return Meter(flops, peak=peak)


def progress_fields(perf: dict) -> dict:
    """The short perf postfix of a progress bar: tokens/s and MFU (when known)."""
    out = {}
    if "perf/tokens_per_s" in perf:
        out["tok/s"] = perf["perf/tokens_per_s"]
    if "perf/mfu" in perf:
        out["mfu"] = perf["perf/mfu"]
    return out


def ppo_iteration_flops(
    specs, *, tokens, response_tokens, attended, attended_window=0.0, epochs, reward_members=1
) -> float:
    """Model FLOPs of one PPO iteration over sequences of `tokens` real (query + response) tokens.

    specs: ppo/rollout.py ModelSpecs. Counted: generation (a policy forward over every token, the
    LM head on response tokens only), scoring (policy and reference forwards with their LM heads on
    response tokens, the value model unless its head sits on the policy, each of `reward_members`
    reward models), and
    `epochs` update passes (3 forwards of the policy and of a separate value model).
    """
    pairs = dict(attended=attended, attended_window=attended_window)

    def lm(config):  # a causal-LM forward: body over all tokens, LM head over the response tokens
        body = forward_flops(config, tokens=tokens, lm_head=False, **pairs)
        return body + 2.0 * config.d_model * config.vocab_size * response_tokens

    value = 0.0
    if specs.critic and not specs.value_head_on_policy:
        value = forward_flops(specs.value, tokens=tokens, lm_head=False, **pairs)
    generation = lm(specs.policy)
    scoring = lm(specs.policy) + lm(specs.reference_config()) + value
    scoring += reward_members * forward_flops(specs.reward, tokens=tokens, lm_head=False, **pairs)
    update = epochs * 3.0 * (lm(specs.policy) + value)
    return generation + scoring + update


def ppo_iteration_perf(specs, rollout, *, times, epochs, peak, reward_members=1) -> dict:
    """perf/ fields of one PPO iteration (ppo/train.py): real tokens/s overall, of generation and
    of the update, the step time, the model FLOPs rate and MFU. rollout: ppo/rollout.py Rollout;
    times: (generation_s, scoring_s, update_s). The first iteration's times include compilation."""
    generation_s, scoring_s, update_s = times
    mask = jnp.concatenate([rollout.query_mask, rollout.response_mask], axis=1)
    stats = jax.device_get(token_stats(mask, positions_of_mask(mask), window=specs.policy.sliding_window))
    response_tokens = float(jax.device_get(jnp.sum(rollout.response_mask > 0)))
    tokens, elapsed = float(stats["tokens"]), max(generation_s + scoring_s + update_s, 1e-9)
    flops = ppo_iteration_flops(
        specs,
        tokens=tokens,
        response_tokens=response_tokens,
        attended=float(stats["attended"]),
        attended_window=float(stats.get("attended_window", 0.0)),
        epochs=epochs,
        reward_members=reward_members,
    )
    out = {
        "perf/tokens": tokens,
        "perf/response_tokens": response_tokens,
        "perf/tokens_per_s": tokens / elapsed,
        "perf/generation_tokens_per_s": response_tokens / max(generation_s, 1e-9),
        "perf/update_tokens_per_s": epochs * tokens / max(update_s, 1e-9),
        "perf/step_time_s": elapsed,
        "perf/model_flops_per_s": flops / elapsed,
        "perf/pad_fraction": 1.0 - tokens / float(stats["slots"]),  # of the [B, P + N] update rows
    }
    if peak:
        out["perf/mfu"] = flops / elapsed / peak
    return out
