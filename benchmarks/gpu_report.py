"""Markdown tables and the environment record of benchmarks/gpu.py's JSON report."""

from __future__ import annotations

import dataclasses
import platform

import flax
import jax

from benchmarks.gpu_shapes import Sizes, non_embedding_params
from models.transformer import TransformerConfig

# ----------------------------------------------------------------------------- report


def _fmt(value, digits=3):
    if value is None:
        return "n/a"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}g}"


def markdown_table(report: dict) -> str:
    """The headline numbers as a markdown table."""
    res = {k: v for k, v in report["results"].items() if "error" not in v}
    rows = [(name, "FAILED", "n/a", r["error"].split(":")[0]) for name, r in report["results"].items() if "error" in r]
    if "rm" in res:
        r = res["rm"]
        setting = f"{r['pairs']} pairs x {r['seq_len']} tok"
        rows += [
            ("RM train step", setting, _fmt(r["tokens_per_s"]), "tokens/s"),
            ("RM train step", setting, _fmt(r["step_s"] * 1e3), "ms/step"),
            ("RM train step", "6N + 12 L (H D) T", _fmt(r["model_tflops_per_s"]), "model TFLOP/s"),
            (
                "RM train step",
                "peak n/a" if r["peak_flops"] is None else f"peak {r['peak_flops'] / 1e12:g} TFLOP/s",
                "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
                "MFU",
            ),
        ]
    if "sampling" in res:
        r = res["sampling"]
        setting = f"B {r['batch']}, prompt {r['prompt_len']}, +{r['new_tokens']}"
        rows += [
            ("Sampling (KV cache)", setting, _fmt(r["tokens_per_s"]), "new tokens/s"),
            ("Sampling (KV cache)", setting, _fmt(r["ms_per_decode_step"]), "ms/token step"),
        ]
    if "ppo" in res:
        r = res["ppo"]
        setting = f"B {r['batch']}, prompt {r['prompt_len']}, +{r['new_tokens']}"
        update = f"{r['ppo_epochs']} epoch(s) x {r['num_minibatches']} minibatches of {r['minibatch_size']}"
        for key, label, where in (
            ("generation_and_scoring_s", "generation + RM scoring + GAE (derived)", setting),
            ("policy_value_ref_forward_s", "policy/value/reference forward", setting),
            ("rollout_s", "rollout total (one jit)", setting),
            ("update_s", "update", update),
            ("iteration_s", "iteration = rollout + update", setting),
        ):
            rows.append((f"PPO: {label}", where, _fmt(r[key] * 1e3), "ms"))
    lines = ["| measurement | setting | value | unit |", "|---|---|---:|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines)


def comparison_table(report: dict) -> str:
    """New paths (the run's attention / logits_chunk) against the plain ones (xla, full logits)."""
    res = report["results"]
    keys = (
        ("rm", "step_s", "RM step s"),
        ("rm", "xla_temp_bytes", "RM step XLA temp MiB"),
        ("rm", "peak_memory_bytes", "RM device peak MiB"),
        ("ppo", "rollout_s", "PPO rollout s"),
        ("ppo", "update_s", "PPO update s"),
        ("ppo", "update_xla_temp_bytes", "PPO update XLA temp MiB"),
        ("ppo", "peak_memory_bytes", "PPO device peak MiB"),
    )
    lines = ["| measurement | plain (xla attention, full logits) | new | new / plain |", "|---|---:|---:|---:|"]
    for section, key, label in keys:
        new, plain = res.get(section, {}).get(key), res.get(section + "_plain", {}).get(key)
        if new is None or plain is None:
            continue
        scale = 2.0**20 if key.endswith("bytes") else 1.0
        lines.append(f"| {label} | {_fmt(plain / scale)} | {_fmt(new / scale)} | {new / plain:.2f} |")
    return "\n".join(lines)


def environment(shape: str, config: TransformerConfig, sizes: Sizes, remat: bool, reps: int) -> dict:
    device = jax.devices()[0]
    return {
        "device_kind": device.device_kind,
        "platform": device.platform,
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
        "flax_version": flax.__version__,
        "python": platform.python_version(),
        "shape": shape,
        "model_config": dataclasses.asdict(config),
        "sizes": dataclasses.asdict(sizes),
        "remat": remat,
        "reps": reps,
        "precision": "float32 params/Adam, bfloat16 compute; frozen models bf16",
        "non_embedding_params": non_embedding_params(config),
        "params_with_embedding": config.num_params(),
    }
