"""Compile time of the RM step, the SFT step and the PPO rollout and update against depth.

  python -m benchmarks.compile_time [--layers 2,16,32] [--scan] [--out benchmarks/results/compile_time.json]

Each step is the trainer's own function, jitted as the trainer jits it and compiled for
abstract arguments (`jax.ShapeDtypeStruct`s from `jax.eval_shape`: nothing is allocated), at
the Llama-3.2-1B shape (benchmarks/memory.py's SHAPES['1b']) with its layer count replaced.
The time is `jit(...).lower(...).compile()` wall-clock on this machine's CPU backend (XLA:CPU
at its default options, as a run would compile). Workloads are small (the compile time
depends on the program, hardly on the batch): RM 2 pairs x 256, SFT 2 x 256, PPO 2 rollouts
x (64 + 32). `--scan` sets TransformerConfig.scan_layers (params stacked per period position and one
scan over the layer groups, in the training and scoring forwards and in KV-cache decoding;
models/scan.py).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

from benchmarks.memory_setup import (
    SHAPES,
    Variant,
    make_tx,
    model_config,
    ppo_setup,
    rm_setup,
)
from common.mesh import make_mesh
from common.train_state import build_train_state
from models.sharding import REPLICATED_RULES
from models.transformer import init_params
from ppo.rollout import ModelSpecs, make_rollout_fn
from rm.model import rm_params_from_backbone
from sft.train import train_step as sft_train_step

WORKLOAD = dict(rm_pairs=2, rm_len=256, ppo_rollouts=2, prompt_len=64, response_len=32)
ROLLOUT_SETTINGS = dict(
    max_new_tokens=WORKLOAD["response_len"],
    temperature=0.7,
    top_k=0,
    top_p=1.0,
    eos_token_id=1,
    stop_token_ids=(),
    missing_eos_penalty=1.0,
    kl_estimator="k1",
    gamma=1.0,
    lam=0.95,
    whiten_rewards=False,
)


def sft_setup(dims, variant):
    tx, schedule = make_tx()
    cfg = model_config(dims, variant)

    def build():
        params = init_params(cfg, jax.random.key(0))
        mesh = make_mesh((1, 1), devices=jax.devices()[:1])  # the trainer's state builder, on one device
        state = build_train_state(params, {}, tx, mesh=mesh, rules=REPLICATED_RULES, rng=jax.random.key(0)).state
        ids = jnp.ones((2, WORKLOAD["rm_len"]), jnp.int32)
        return state, {"input_ids": ids, "attention_mask": ids, "loss_mask": ids}

    step = jax.jit(
        functools.partial(sft_train_step, model_config=cfg, tx=tx, schedule=schedule, accum_steps=1, nan_step=-1),
        donate_argnums=(0,),
    )
    return step, build


def rollout_setup(dims, variant):
    """The PPO rollout (sampling, policy/reference/value forwards, RM score, GAE) as one jit."""
    cfg = model_config(dims, variant)
    specs = ModelSpecs(policy=cfg, reward=cfg, value=cfg, reference=cfg)
    fn = jax.jit(make_rollout_fn(specs, ROLLOUT_SETTINGS))
    b, p = WORKLOAD["ppo_rollouts"], WORKLOAD["prompt_len"]

    def build():
        policy = init_params(cfg, jax.random.key(0))
        rm = rm_params_from_backbone(cfg, init_params(cfg, jax.random.key(1)), jax.random.key(2))
        ids = jnp.ones((b, p), jnp.int32)
        return (
            {"policy": policy, "value": rm},
            policy,
            rm,
            jnp.ones((2,), jnp.float32),
            jnp.float32(0.05),
            ids,
            ids,
            jax.random.key(3),
        )

    return fn, build


def timed_compile(step, build) -> float:
    args = jax.eval_shape(build)
    t0 = time.time()
    step.lower(*args).compile()
    return time.time() - t0


STEPS = {
    "rm_step": lambda dims, v: rm_setup(dims, v, WORKLOAD),
    "sft_step": sft_setup,
    "ppo_update": lambda dims, v: ppo_setup(dims, v, WORKLOAD),
    "ppo_rollout": rollout_setup,
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", default="2,16,32")
    ap.add_argument("--steps", default=",".join(STEPS))
    ap.add_argument("--variant", default="bf16", help="benchmarks.memory Variant base: fp32 | bf16")
    ap.add_argument("--scan", action="store_true", help="scan_layers=True (lax.scan over the layers)")
    ap.add_argument("--out", default="benchmarks/results/compile_time.json")
    args = ap.parse_args(argv)
    variant = Variant(args.variant, scan_layers=args.scan)
    results = {}
    for name in args.steps.split(","):
        results[name] = {}
        for layers in (int(x) for x in args.layers.split(",")):
            dims = dict(SHAPES["1b"], n_layers=layers)
            seconds = timed_compile(*STEPS[name](dims, variant))
            results[name][str(layers)] = round(seconds, 1)
            print(f"{name:12s} {layers:3d} layers: {seconds:6.1f} s", file=sys.stderr, flush=True)
    report = {
        "shape": "Llama-3.2-1B dims, n_layers varied",
        "variant": args.variant,
        "scan_layers": args.scan,
        "workload": WORKLOAD,
        "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "compile_s": results,
    }
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
