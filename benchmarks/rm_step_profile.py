"""Where the reward-model step's time goes: ours (JAX) forward, forward+backward and full step
against the same three of a plain PyTorch step, plus a per-op breakdown of our backward pass.

    python -m benchmarks.rm_step_profile [--shape small|tiny|gpt2-small] [--threads 1] [--reps 5]

Each side runs in its own process on the weights and first batch of benchmarks/rm_throughput.py
(same random GPT-2 file, 2 x pairs sequences of max length, fp32). Reported per phase: median
wall ms and median CPU ms of the process (with --threads 1 the CPU time is the work done,
whatever else runs on the machine), and GFLOP/s from XLA's cost analysis of our forward+backward
(the same FLOPs serve for torch). The breakdown comes from a `jax.profiler` trace of three
forward+backward calls: thread-busy time per op category (dots, XLA:CPU's reduce-window trees,
layout copies/transposes, elementwise fusions), read back with jax.profiler.ProfileData.
--xla-flags appends flags for ours (default: YNN fusions off, as the throughput benchmark's
faster setting).
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks._rm_bench import SHAPES, batch_at, load_pairs, worker_prepare

YNN_OFF = "--xla_cpu_experimental_ynn_fusion_type="


def _timed(fn, reps: int) -> dict:
    fn()
    fn()
    wall, cpu = [], []
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(1000 * (time.perf_counter() - t))
        cpu.append(1000 * (time.process_time() - c))
    return {"wall_ms": statistics.median(wall), "cpu_ms": statistics.median(cpu)}


def _category(name: str) -> str:
    base = re.sub(r"\.\d+$", "", name)
    if base.startswith("wrapped_reduce-window"):
        return "reduce-window tree (multi-axis reduce_sum)"
    if "dot" in base:
        return "dot"
    if "transpose" in base or base.startswith("copy") or base == "copy":
        return "layout copy / transpose"
    if "reduce" in base:
        return "reduce"
    return "elementwise fusion"


def breakdown(trace_dir: str, calls: int) -> dict:
    """Thread-busy ms per call and op category from a jax.profiler trace (XLA:CPU thunk events)."""
    from jax.profiler import ProfileData

    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
    totals = collections.Counter()
    for plane in ProfileData.from_file(path).planes:
        for line in plane.lines:
            if line.name == "python":
                continue
            for ev in line.events:
                if not ev.name.startswith("ThunkExecutor"):
                    totals[_category(ev.name)] += ev.duration_ns / 1e6 / calls
    return dict(totals.most_common())


def worker_ours(directory: str, reps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    from models.hf import load_hf_checkpoint
    from rm.model import rm_params_from_backbone
    from rm.train import pair_rewards

    config, backbone, leftovers = load_hf_checkpoint(directory, with_leftovers=True)
    params = rm_params_from_backbone(config, backbone, jax.random.key(1))
    params["head"] = {"kernel": jnp.asarray(leftovers["score.weight"]).T, "bias": jnp.zeros((1,), jnp.float32)}
    batch = {k: jnp.asarray(v) for k, v in batch_at(load_pairs(directory), 0).items()}

    def loss(p):
        chosen, rejected = pair_rewards(config, p, batch)
        return -jnp.mean(jax.nn.log_sigmoid(chosen - rejected))

    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-5, weight_decay=0.0))

    def step(p, o):
        updates, o = tx.update(jax.grad(loss)(p), o, p)
        return optax.apply_updates(p, updates), o

    fwd, fwd_bwd, step_fn = jax.jit(loss), jax.jit(jax.grad(loss)), jax.jit(step, donate_argnums=(0, 1))
    cost = fwd_bwd.lower(params).compile().cost_analysis()
    flops = (cost[0] if isinstance(cost, list) else cost)["flops"]
    state = [params, tx.init(params)]

    def run_step():
        state[0], state[1] = step_fn(*state)
        jax.block_until_ready(state[0])

    out = {
        "fwd": _timed(lambda: fwd(state[0]).block_until_ready(), reps),
        "fwd_bwd": _timed(lambda: jax.block_until_ready(fwd_bwd(state[0])), reps),
        "step": _timed(run_step, reps),
        "fwd_bwd_gflop": flops / 1e9,
    }
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        for _ in range(3):
            jax.block_until_ready(fwd_bwd(state[0]))
        jax.profiler.stop_trace()
        out["fwd_bwd_breakdown_ms"] = breakdown(trace_dir, 3)
    return out


def worker_torch(directory: str, reps: int) -> dict:
    import torch

    from benchmarks._torch_rm import _load_torch_model

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    model = _load_torch_model(directory)
    model.train()
    b = batch_at(load_pairs(directory), 0)
    ids = torch.from_numpy(np.concatenate([b["chosen_ids"], b["rejected_ids"]])).long()
    mask = torch.from_numpy(np.concatenate([b["chosen_mask"], b["rejected_mask"]])).long()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, fused=True)

    def loss():
        rewards = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.squeeze(-1)
        chosen, rejected = rewards.chunk(2)
        return -torch.nn.functional.logsigmoid(chosen - rejected).mean()

    def fwd():
        with torch.no_grad():
            loss()

    def fwd_bwd():
        loss().backward()
        model.zero_grad(set_to_none=True)

    def step():
        loss().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return {"fwd": _timed(fwd, reps), "fwd_bwd": _timed(fwd_bwd, reps), "step": _timed(step, reps)}


def _spawn(kind: str, args, directory: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
    cmd = [sys.executable, "-m", "benchmarks.rm_step_profile", "--worker", kind, "--dir", directory]
    cmd += ["--shape", args.shape, "--threads", str(args.threads), "--reps", str(args.reps)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"worker {kind} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="small", choices=sorted(SHAPES))
    p.add_argument(
        "--threads", type=int, default=1, help="threads per side (pinned cores when fewer than the machine's)"
    )
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--xla-flags", default=YNN_OFF, help="appended to XLA_FLAGS for ours")
    p.add_argument("--out", default="benchmarks/results/rm_step_profile.json")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        cores = sorted(os.sched_getaffinity(0))
        if args.threads < len(cores):
            os.sched_setaffinity(0, cores[: args.threads])
        result = (worker_ours if args.worker == "ours" else worker_torch)(args.dir, args.reps)
        print("RESULT " + json.dumps(result), flush=True)
        return None
    with tempfile.TemporaryDirectory() as directory:
        worker_prepare(SHAPES[args.shape], directory, "full")
        ours, torch_ = _spawn("ours", args, directory), _spawn("torch", args, directory)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    flops = ours["fwd_bwd_gflop"]
    print(
        f"shape {args.shape}, {args.threads} thread(s), {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, `{uptime}`"
    )
    print(f"XLA cost analysis: {flops:.1f} GFLOP per forward+backward\n")
    print("| phase | ours wall ms | ours CPU ms | torch wall ms | torch CPU ms | torch/ours (CPU) |")
    print("|---|---:|---:|---:|---:|---:|")
    for phase in ("fwd", "fwd_bwd", "step"):
        o, t = ours[phase], torch_[phase]
        print(
            f"| {phase} | {o['wall_ms']:.0f} | {o['cpu_ms']:.0f} | {t['wall_ms']:.0f} | {t['cpu_ms']:.0f} | "
            f"{t['cpu_ms'] / o['cpu_ms']:.2f}x |"
        )
    cpu_s = ours["fwd_bwd"]["cpu_ms"] / 1000
    print(
        f"\nours forward+backward: {flops / cpu_s:.0f} GFLOP per CPU-second; torch {flops / (torch_['fwd_bwd']['cpu_ms'] / 1000):.0f}"
    )
    total = sum(ours["fwd_bwd_breakdown_ms"].values())
    print("\n| ours forward+backward, by op category | thread-busy ms per call | share |\n|---|---:|---:|")
    for cat, ms in ours["fwd_bwd_breakdown_ms"].items():
        print(f"| {cat} | {ms:.0f} | {100 * ms / total:.0f}% |")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            {"shape": args.shape, "threads": args.threads, "uptime": uptime, "ours": ours, "torch": torch_}, f, indent=1
        )
    return ours, torch_


if __name__ == "__main__":
    main()
