"""Memory of one reward-model train step and one PPO update step: fp32, bf16, LoRA, LoRA + int8.

  python -m benchmarks.memory [--out benchmarks/results/memory.json] [--variants fp32,lora_int8+remat]
      [--depths 2,4] [--scheduler memory|default] [--crosscheck] [--rss-steps 2]

XLA figure (the headline). Each step is jitted as its trainer jits it (state donated) and compiled
for abstract arguments (`jax.ShapeDtypeStruct`s from `jax.eval_shape` of the same builders the
trainers use: nothing of the 1B model is allocated). `compiled.memory_analysis()` gives
argument, output, temp and alias (donated inputs reused as outputs) bytes, and
    peak ~= argument + temp + output - alias.
Arguments are what stays resident (train state with Adam moments, frozen trees, batch): exact
for any backend. Temps (activations, gradients, scratch) are what XLA:CPU's buffer assignment
needs; GPU/TPU fuse and schedule differently. See `compiler_options` for the CPU scheduler used
(the default one undoes remat) and --scheduler to switch.

Measured peak RSS (small shape): each (configuration, step) runs in a fresh subprocess that
builds the real trees, compiles and runs --rss-steps steps; it reports its high-water RSS
(VmHWM; getrusage's ru_maxrss alongside, see `_peak_rss`) and the RSS after JAX started
(rss_baseline). RSS includes the runtime and the compiler's own peak.

Steps (the trainers' own functions; no copy of their maths):
  RM   `rm.train.train_step(state, batch, frozen)`: 8 pairs x 512 tokens (one [16, 512]
       forward), Bradley-Terry loss, AdamW + clipping (`common.optim.make_optimizer`), no
       accumulation. Trees as rm/train.py makes them (rm_params_from_backbone ->
       add_lora_and_quant -> split_trainable).
  PPO  `ppo.update.ppo_update(state, rollout, frozen)` with `ppo_loss`: 8 rollouts x (128 prompt
       + 128 response), 1 epoch of 1 minibatch (epochs and minibatches are a lax.scan: their
       number does not move the peak). All four models are arguments: policy and value
       (trainable parts in the donated state, frozen bases in `frozen`), reference and reward
       (with keep_unused=True: the update does not read them, the run keeps them resident).
       Trees as ppo/train.py makes them: value = the reward model's tree (+ LoRA); reference =
       a separate copy without LoRA, or 'adapters_off' (no copy) with LoRA.

Configurations, each without and with remat (jax.checkpoint on every block, nothing_saveable):
  fp32       parameters, Adam moments and compute in float32; everything trains.
  bf16       parameters (so Adam moments) and compute in bfloat16; everything trains.
  lora       as fp32, but policy, value model and RM train LoRA rank 16 (alpha 32) on q/k/v/o
             and the scalar heads; the float32 bases are frozen (no gradients, no moments).
  lora_int8  lora with int8 weight-only projections in every frozen base: the policy's (QLoRA;
             the reference is its adapters-off view), the reward model's, the value model's
             (value.quant=int8) and the RM step's. Embeddings and norms stay float32.

Shapes
  1b     Llama-3.2-1B: d 2048, 16 layers, 32 heads, 8 KV heads, head_dim 64, d_ff 8192, vocab
         128256, tied embeddings (1,235,814,400 parameters). Compiled at all 16 layers (~25 s
         an RM step, ~40-60 s a PPO step on an idle 2-core CPU). `--depths 2,4` compiles 2 and
         4 layers and extrapolates every byte count linearly instead (~2x faster): exact for
         the arguments and, with the default scheduler, for temps too, but the memory-optimised
         scheduler is not affine in depth (temps 10-30% low at 16 layers), so it is a preview.
  small  4 layers, d 256, 4 heads, 2 KV heads, head_dim 64, d_ff 1024, vocab 32000, tied; RM 4
         pairs x 128, PPO 4 rollouts x (64 + 64). Compiled at full depth and run (RSS).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp

from benchmarks.memory_setup import (
    ARG_NAMES,
    GIB,
    LORA_TARGETS,
    MIB,
    PPO_SETTINGS,
    SETUPS,
    SHAPES,
    VARIANTS,
    WORKLOADS,
    Variant,
    variant_by_name,
)
from models.quant import param_bytes

# ----------------------------------------------------------------------------- XLA accounting

SCHEDULERS = ("memory", "default")


def compiler_options(scheduler: str = "memory") -> dict | None:
    """XLA:CPU options of every compile here (None on other backends: their defaults apply).

    xla_backend_optimization_level=0: LLVM's optimisation level changes the speed of the
    generated code, not buffer assignment (an HLO pass): same figures, ~2x faster compiles.
    scheduler 'memory' (xla_cpu_scheduler_type=MEMORY_OPTIMIZED): XLA:CPU's default scheduler
    orders for concurrency and hoists the recomputation of rematerialised blocks to the start
    of the backward pass, where it keeps every block's activations alive at once and undoes
    remat (a toy 4-block chain: 302 MiB temp with remat vs 80 MiB with this scheduler). The
    memory-optimised scheduler is the nearer stand-in for a memory-aware accelerator scheduler,
    though even it keeps part of each block's activations in the RM step (temps well above one
    block's worth), so remat rows are upper bounds of what remat can reach.
    """
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler={scheduler!r}; expected one of {SCHEDULERS}")
    if jax.default_backend() != "cpu":
        return None
    options = {"xla_backend_optimization_level": 0}
    if scheduler == "memory":
        options["xla_cpu_scheduler_type"] = "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"
    return options


def memory_stats(compiled) -> dict:
    """Bytes of `compiled.memory_analysis()` and peak = argument + temp + output - alias."""
    m = compiled.memory_analysis()
    out = {k: int(getattr(m, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")}
    out["peak"] = out["argument"] + out["temp"] + out["output"] - out["alias"]
    return out


def tree_breakdown(kind: str, args) -> dict:
    """Bytes of each argument tree (state split into params / opt_state) from shapes alone."""
    named = dict(zip(ARG_NAMES[kind], args))
    state = named.pop("state")
    out = {"trainable_params": param_bytes(state["params"]), "opt_state": param_bytes(state["opt_state"])}
    out.update({name: param_bytes(tree) for name, tree in named.items()})
    return out


def abstract_memory(kind: str, dims: dict, variant: Variant, workload: dict, *, scheduler: str = "memory") -> dict:
    """XLA memory of one `kind` ('rm' | 'ppo') step at `dims`, compiled for abstract arguments."""
    step, build = SETUPS[kind](dims, variant, workload)
    args = jax.eval_shape(build)  # ShapeDtypeStructs only
    t0 = time.time()
    compiled = step.lower(*args).compile(compiler_options(scheduler))
    stats = memory_stats(compiled)
    stats["compile_s"] = time.time() - t0
    stats["trees"] = tree_breakdown(kind, args)
    return stats


def _affine(points: dict[int, dict], layers: int):
    """Linear fit through two (n_layers, bytes) points of every byte field, evaluated at `layers`."""
    (l1, a), (l2, b) = sorted(points.items())[:2]

    def fit(x, y):
        if isinstance(x, dict):
            return {k: fit(x[k], y[k]) for k in x}
        return int(round(x + (y - x) * (layers - l1) / (l2 - l1)))

    out = fit({k: v for k, v in a.items() if k != "compile_s"}, {k: v for k, v in b.items() if k != "compile_s"})
    out["compile_s"] = a["compile_s"] + b["compile_s"]
    return out


def scaled_memory(
    kind: str, dims: dict, variant: Variant, workload: dict, depths: tuple[int, ...], *, scheduler: str = "memory"
) -> dict:
    """abstract_memory at dims['n_layers'], compiled there (depths empty) or extrapolated from `depths`."""
    target = dims["n_layers"]
    if not depths or target in depths:
        return dict(
            abstract_memory(kind, dims, variant, workload, scheduler=scheduler), method=f"compiled at {target} layers"
        )
    if len(depths) != 2:
        raise ValueError(f"--depths needs two layer counts, got {depths}")
    points = {d: abstract_memory(kind, dict(dims, n_layers=d), variant, workload, scheduler=scheduler) for d in depths}
    out = _affine(points, target)
    out["method"] = f"extrapolated linearly from {depths[0]} and {depths[1]} layers"
    out["points"] = {str(d): {k: v for k, v in p.items() if k != "trees"} for d, p in points.items()}
    return out


# ----------------------------------------------------------------------------- measured RSS


def _ru_maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _peak_rss() -> int:
    """High-water RSS of this program image: VmHWM (Linux), else ru_maxrss.

    Linux carries ru_maxrss over from the parent through fork + exec, so a worker started while
    the main process is large would report the parent's size; VmHWM starts afresh at exec.
    Both are recorded.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return _ru_maxrss()


def rss_worker(kind: str, variant: Variant, shape: str, steps: int, scheduler: str = "memory") -> dict:
    """In a fresh process: build real trees, compile, run `steps` steps; peak RSS and XLA stats.

    rss_baseline: after JAX starts; rss_built: after the trees exist (jitted init, so no
    per-op eager buffers); rss_peak: after compiling and running the step (a high-water
    mark, so it also covers the compiler's own peak).
    """
    jnp.zeros(1).block_until_ready()  # start the runtime before taking the baseline
    baseline = _peak_rss()
    step, build = SETUPS[kind](SHAPES[shape], variant, WORKLOADS[shape])
    args = jax.block_until_ready(jax.jit(build)())  # optimised code: random init is slow at -O0
    built = _peak_rss()
    compiled = step.lower(*args).compile(compiler_options(scheduler))  # the program the XLA column reports
    stats = memory_stats(compiled)
    state, rest = args[0], args[1:]
    del args  # the state is donated: drop every other reference to it
    t0 = time.time()
    for _ in range(steps):
        state, metrics = compiled(state, *rest)
    loss = float(jax.device_get(metrics["loss"] if kind == "rm" else metrics["policy/pg_loss"]))
    jax.block_until_ready(state)
    return {
        "kind": kind,
        "variant": variant.name,
        "shape": shape,
        "steps": steps,
        "rss_peak": _peak_rss(),
        "ru_maxrss": _ru_maxrss(),
        "rss_baseline": baseline,
        "rss_built": built,
        "xla": stats,
        "step_s": (time.time() - t0) / steps,
        "last_loss": loss,
    }


def run_rss(jobs: list[tuple[str, Variant]], *, shape: str, steps: int, scheduler: str, results: dict) -> None:
    """One fresh subprocess per (kind, variant), one at a time, into results[(kind, name)] (a thread)."""
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for kind, v in jobs:
        cmd = [
            sys.executable,
            "-m",
            "benchmarks.memory",
            "--worker",
            kind,
            "--variants",
            v.name,
            "--shape",
            shape,
            "--rss-steps",
            str(steps),
            "--scheduler",
            scheduler,
        ]
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            results["error"] = f"RSS worker {kind} {v.name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
            return
        results[(kind, v.name)] = r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(
            f"  rss {kind:3s} {v.name:16s} small {r['rss_peak'] / MIB:7.0f} MiB peak RSS "
            f"(baseline {r['rss_baseline'] / MIB:.0f})",
            file=sys.stderr,
            flush=True,
        )


# ----------------------------------------------------------------------------- report


def _g(x):
    return f"{x / GIB:.2f}"


def markdown(report: dict) -> str:
    """The summary table and the 1B PPO breakdown (GiB; RSS in MiB)."""
    base = report["reference_ppo_peak"]
    lines = [
        "| config | RM step GiB (1B) | PPO step GiB (1B) | PPO / fp32 PPO | RSS RM small MiB | "
        "RSS PPO small MiB | XLA PPO small MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["results"]:
        rss, small, ppo = row["rss"], row["small"], row["1b"]["ppo"]["peak"]
        cells = [row["variant"], _g(row["1b"]["rm"]["peak"]), _g(ppo), f"{ppo / base:.1%}" if base else "-"]
        cells += [f"{rss[k]['rss_peak'] / MIB:.0f}" if k in rss else "-" for k in ("rm", "ppo")]
        lines.append("| " + " | ".join(cells + [f"{small['ppo']['peak'] / MIB:.0f}" if "ppo" in small else "-"]) + " |")
    lines += [
        "",
        "PPO step at 1B, GiB (argument = the trees + rollout; temp = activations, gradients, scratch):",
        "| config | trainable | opt_state | frozen | reference | reward | argument | temp |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["results"]:
        p = row["1b"]["ppo"]
        cells = [p["trees"][k] for k in ("trainable_params", "opt_state", "frozen", "reference", "reward")]
        lines.append("| " + " | ".join([row["variant"]] + [_g(x) for x in cells + [p["argument"], p["temp"]]]) + " |")
    return "\n".join(lines)


def run(variants, *, depths, scheduler, rss_steps, crosscheck) -> dict:
    """All measurements -> the JSON report (RSS workers run in a thread beside the compiles)."""
    t0 = time.time()
    rss, thread = {}, None
    if rss_steps > 0:
        jobs = [(k, v) for v in variants for k in ("rm", "ppo")]
        thread = threading.Thread(
            target=run_rss,
            args=(jobs,),
            daemon=True,
            kwargs=dict(shape="small", steps=rss_steps, scheduler=scheduler, results=rss),
        )
        thread.start()
    results = []
    for v in variants:
        row = {"variant": v.name, "1b": {}, "small": {}, "rss": {}}
        for kind in ("rm", "ppo"):
            row["1b"][kind] = m = scaled_memory(kind, SHAPES["1b"], v, WORKLOADS["1b"], depths, scheduler=scheduler)
            print(
                f"  xla {kind:3s} {v.name:16s} 1B {m['peak'] / GIB:7.2f} GiB ({m['compile_s']:.0f} s compiling)",
                file=sys.stderr,
                flush=True,
            )
        results.append(row)
    by_name = {r["variant"]: r for r in results}
    other = None
    if crosscheck and {"fp32", "lora_int8+remat"} <= set(by_name):  # the target ratio, other scheduler
        alt = [x for x in SCHEDULERS if x != scheduler][0]
        peaks = {
            n: scaled_memory("ppo", SHAPES["1b"], variant_by_name(n), WORKLOADS["1b"], depths, scheduler=alt)["peak"]
            for n in ("fp32", "lora_int8+remat")
        }
        other = {"scheduler": alt, "peaks": peaks, "ratio": peaks["lora_int8+remat"] / peaks["fp32"]}
    if thread is not None:
        thread.join()
        if "error" in rss:
            raise RuntimeError(rss["error"])
    for row in results:
        for kind in ("rm", "ppo"):
            if (kind, row["variant"]) in rss:
                row["rss"][kind] = r = dict(rss[(kind, row["variant"])])
                row["small"][kind] = r.pop("xla")
    base = by_name["fp32"]["1b"]["ppo"]["peak"] if "fp32" in by_name else None
    report = {
        "formula": "peak = argument + temp + output - alias (bytes from compiled.memory_analysis())",
        "backend": jax.default_backend(),
        "scheduler": scheduler,
        "compiler_options": compiler_options(scheduler),
        "shapes": SHAPES,
        "workloads": WORKLOADS,
        "ppo": PPO_SETTINGS,
        "lora": {"rank": VARIANTS[4].lora_rank, "alpha": VARIANTS[4].lora_alpha, "targets": LORA_TARGETS},
        "depths": list(depths) or "full",
        "reference_ppo_peak": base,
        "results": results,
    }
    if base and "lora_int8+remat" in by_name:
        ratio = by_name["lora_int8+remat"]["1b"]["ppo"]["peak"] / base
        report["target"] = {
            "what": "lora_int8+remat PPO peak / fp32 PPO peak (1B)",
            "ratio": ratio,
            "limit": 0.35,
            "met": ratio <= 0.35,
            "other_scheduler": other,
        }
    report["wall_s"] = time.time() - t0
    return report


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/memory.json")
    ap.add_argument("--variants", default=",".join(v.name for v in VARIANTS), help="comma-separated names")
    ap.add_argument(
        "--depths",
        default="",
        help="two layer counts to extrapolate the 1B shape from (preview); default: compile all 16 layers",
    )
    ap.add_argument("--scheduler", default="memory", choices=SCHEDULERS, help="XLA:CPU scheduler (compiler_options)")
    ap.add_argument("--rss-steps", type=int, default=2, help="steps each RSS subprocess runs (0: no RSS runs)")
    ap.add_argument("--crosscheck", action="store_true", help="also the target ratio under the other scheduler")
    ap.add_argument("--worker", choices=sorted(SETUPS), help=argparse.SUPPRESS)
    ap.add_argument("--shape", default="small", choices=sorted(SHAPES), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    variants = [variant_by_name(n.strip()) for n in args.variants.split(",") if n.strip()]
    if args.worker:
        print(json.dumps(rss_worker(args.worker, variants[0], args.shape, args.rss_steps, args.scheduler)), flush=True)
        return
    depths = tuple(int(d) for d in args.depths.split(",") if d.strip())
    report = run(
        variants, depths=depths, scheduler=args.scheduler, rss_steps=args.rss_steps, crosscheck=args.crosscheck
    )
    print(markdown(report) if report["reference_ppo_peak"] else json.dumps(report["results"], indent=1))
    target = report.get("target")
    if target:
        print(
            f"\nLoRA + int8 frozen models + remat / full fp32, PPO step at 1B ({args.scheduler} scheduler): "
            f"{target['ratio']:.1%} (target <= 35%: {'met' if target['met'] else 'NOT met'})"
        )
        if target["other_scheduler"]:
            o = target["other_scheduler"]
            print(
                f"The same with XLA:CPU's {o['scheduler']} scheduler: {o['ratio']:.1%} "
                f"({_g(o['peaks']['lora_int8+remat'])} / {_g(o['peaks']['fp32'])} GiB)"
            )
    print(f"total {report['wall_s']:.0f} s", file=sys.stderr)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
