"""Reward-model training throughput: ours (JAX) vs TRL's RewardTrainer vs a plain PyTorch step.

  python -m benchmarks.rm_throughput [--shapes tiny,small] [--reps 3] [--steps N] [--threads 2] \
      [--lengths full|variable|longtail] [--variants ...] [--out benchmarks/results/rm_throughput.json]

About 10 minutes at the defaults on an idle 2-core machine (much longer on a busy one).

What is measured
  Non-pad tokens per second of one reward-model optimizer step: a forward pass of the
  concatenated [2B, T] chosen+rejected batch, the Bradley-Terry loss
  -mean(log_sigmoid(r_c - r_r)), the backward pass, global-norm gradient clipping at 1.0 and
  an AdamW update (weight decay 0, lr 1e-5, fp32 everywhere). The time is the steady-state wall
  time of the training loop after warm-up, so it includes what each loop does per step beyond
  the maths (batch collation and host->device placement, TRL's per-step metric `.item()`s,
  our periodic metric fetch):

  ours        `rm.train.train_step`, jitted with `donate_argnums=(0,)` and built exactly as
              `rm/train.py` builds it (load_hf_checkpoint -> rm_params_from_backbone ->
              make_optimizer -> common.train_state.build_train_state, replicated, on a `make_mesh` mesh; each batch goes through
              `trim_to_bucket` (bucket 64) and `shard_batch`; metrics are fetched every 10 steps as
              the trainer's log_every does). Run twice: with the process's XLA_FLAGS
              ("xla-default") and with `--xla_cpu_experimental_ynn_fusion_type=` appended
              ("ynn-off"). The faster median is the headline "ours"; both are reported.
  ours-bf16   `model.dtype = "bfloat16"`: bf16 compute (activations and the matmuls' operands) with float32
              parameters, AdamW state and loss, XLA_FLAGS as given. Not a candidate for the headline
              "ours" (which is fp32); reported beside it with its own ratios.
  ours-packed `data.packing` batches (common/packing.py pack_pairs: first-fit-decreasing rows of
              max_length with segment ids, one group, the layout planned over the benchmark's
              batches) with `data.pack_row_buckets` = PACK_ROW_BUCKETS (4): each step takes the
              smallest of 4 row counts it fits in; every bucket's compilation happens in an
              untimed warm-up step (its time is kept as bucket_compile_plus_step_s), YNN off.
  ours-packed-static  the same with one row count for every step (pack_row_buckets=1, the most
              rows any batch needs).
  trl-default `trl.RewardTrainer` with `RewardConfig` at its defaults except what a fair fp32
              CPU benchmark needs (bf16=False, use_cpu, no eval/saving/logging/tqdm, report_to
              none, dataloader workers 0, sequential sampler so every framework sees the same
              batches). RewardConfig turns gradient checkpointing ON by default (it overrides
              TrainingArguments' False); the worker records args.gradient_checkpointing and the
              model's is_gradient_checkpointing to show it. Optimizer: the Trainer's default
              (adamw_torch_fused with torch >= 2.8), linear schedule. Step time = interval between
              consecutive `on_step_end` callbacks (includes the dataloader + collator).
  trl-no-gc   the same with gradient_checkpointing=False.
  torch       the bar: AutoModelForSequenceClassification forward on the [2B, T] batch, BT
              loss, backward, clip_grad_norm_, fused torch.optim.AdamW, zero_grad; eager mode,
              tensors prepared ahead.

Model and data
  GPT-2 built from a random-weight Hugging Face checkpoint (GPT2ForSequenceClassification,
  num_labels=1, dropout 0, vocab 1024, biases and LayerNorms perturbed as in
  tests/hf_fixtures.py) saved once per shape; every framework loads the same file, and ours
  takes its scalar head from score.weight (bias 0, as HF's GPT-2 score has none), so all
  start from identical weights. The first-step loss of every run is printed as a check that
  the same computation is being timed (they agree to ~1e-7).
    tiny:  2 layers, d_model 64, 4 heads, seq 64
    small: 4 layers, d_model 256, 4 heads, seq 128
    gpt2-small: 12 layers, d_model 768, 12 heads, seq 256, 4 pairs
    smollm-135m: a released Llama-family shape (LlamaForSequenceClassification: 30 layers, d_model 576,
           9 query / 3 KV heads, SwiGLU 1536, tied embeddings, its own 49,152-token vocabulary), seq 256, 4 pairs
  Batch: 16 pairs (so 32 sequences a step). Token ids are uniform in [1, 1024) (pad id 0
  never appears inside a sequence). --lengths full (default): every sequence is T tokens long,
  so each step has exactly 2*B*T non-pad tokens and nobody pays for padding. --lengths
  variable: lengths uniform in [T/2, T] with one full-length sequence per batch (so padded
  shapes stay fixed); only non-pad tokens are counted.

Fairness
  Each (framework, repetition) runs in its own subprocess, so thread settings and allocator
  state do not leak: torch uses torch.set_num_threads(--threads) and OMP_NUM_THREADS, XLA sizes
  its pool from the cores it may use; with --threads below the machine's core count every
  worker is pinned (sched_setaffinity) to that many cores. Repetitions are interleaved (ours,
  ours-ynn-off, trl-default, trl-no-gc, torch, ours, ...) so slow drift of the machine hits
  everybody alike. Ours reuses its compiled step across repetitions through JAX's persistent
  compilation cache (compilation is never timed; this only saves wall time). Reported: median
  tokens/s over repetitions (with min-max), the ratios ours/trl-default, ours/trl-no-gc and
  ours/torch, tokens per CPU-second and the 1-min load average seen before each run.

Reading the numbers on a shared machine
  When other jobs keep the load above the thread count, wall-clock numbers with 2 threads mostly
  measure how each runtime copes with oversubscription: torch's OpenMP pool (spinning barriers
  after every small op) loses far more than XLA's thread pool, which flatters ours. The
  load-robust comparison is `--threads 1`: one pinned thread each, where tokens per CPU-second
  is the work each framework needs per token whatever else runs (CPU time of a single thread
  does not include the time it spends descheduled).

Output: a markdown table on stdout and a JSON file (--out) with every repetition.
Internal: `--worker KIND --dir D ...` runs one measurement and prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from benchmarks._rm_bench import (
    LEARNING_RATE,
    LENGTHS,
    N_DISTINCT_BATCHES,
    SHAPES,
    WARMUP_STEPS,
    batch_at,
    load_pairs,
    now,
    pairs_per_batch,
    shape_vocab,
    tokens_in,
    worker_prepare,
)

BUCKET = 64  # rm/configs default data.bucket
LOG_EVERY = 10  # rm/configs default train.log_every: ours fetches metrics this often
YNN_OFF_FLAG = "--xla_cpu_experimental_ynn_fusion_type="
VARIANTS = (
    "ours",
    "ours-ynn-off",
    "ours-bf16",
    "ours-packed",
    "ours-packed-static",
    "trl-default",
    "trl-no-gc",
    "torch",
)
PACK_ROW_BUCKETS = 4  # ours-packed: data.pack_row_buckets (ours-packed-static: 1, one worst-case shape)
QUICK = dict(reps=3, steps={"tiny": 10, "small": 2, "gpt2-small": 1, "smollm-135m": 1})


# ----------------------------------------------------------------------------- workers


def worker_ours(directory: str, steps: int, packed: bool = False, row_buckets: int = 1, dtype: str = "float32") -> dict:
    """rm.train.train_step, jitted with donation as rm/train.py builds it; dtype: the compute dtype
    (`model.dtype`; parameters, optimizer state and the loss stay float32); packed: data.packing's
    batches (common/packing.py, one group, rows of max_length, layout planned over all batches,
    `row_buckets` row counts, each compiled during warm-up)."""
    import functools

    import jax
    import jax.numpy as jnp

    from common import packing
    from common.mesh import make_mesh, shard_batch
    from common.optim import make_optimizer
    from common.train_state import build_train_state
    from models.hf import load_hf_checkpoint
    from models.sharding import REPLICATED_RULES
    from rm.data import trim_to_bucket
    from rm.model import rm_params_from_backbone
    from rm.train import train_step

    pairs = load_pairs(directory)
    model_config, backbone, leftovers = load_hf_checkpoint(directory, with_leftovers=True)
    model_config = model_config.replace(remat=False, remat_policy="nothing_saveable", dtype=dtype)
    rng = jax.random.key(0)
    params = rm_params_from_backbone(model_config, backbone, jax.random.fold_in(rng, 1))
    # Same head as the torch runs (HF's GPT-2 and Llama score layers have no bias).
    params["head"] = {
        "kernel": jnp.asarray(leftovers["score.weight"], jnp.float32).T,
        "bias": jnp.zeros((1,), jnp.float32),
    }
    tx, schedule = make_optimizer(
        learning_rate=LEARNING_RATE, total_steps=10**6, warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0
    )
    mesh = make_mesh((-1, 1), ("data", "model"))
    # The trainer's own state builder (rm/train.py), replicated: data parallel only.
    state = build_train_state(params, {}, tx, mesh=mesh, rules=REPLICATED_RULES, rng=jax.random.fold_in(rng, 2)).state
    step_fn = jax.jit(
        functools.partial(
            train_step,
            model_config=model_config,
            tx=tx,
            schedule=schedule,
            accum_steps=1,
            center_coef=0.0,
            use_margin=False,
            nan_step=-1,
        ),
        donate_argnums=(0,),
    )

    def place(step):
        if packed:
            return shard_batch(packing.pack_pairs(batch_at(pairs, step), layout, pad_id=0, bucket=BUCKET), mesh)
        return shard_batch(trim_to_bucket(batch_at(pairs, step), BUCKET), mesh)

    if packed:
        b = pairs_per_batch(pairs)
        layout = packing.plan_pair_layout(
            pairs["chosen_mask"].sum(1),
            pairs["rejected_mask"].sum(1),
            lambda step: np.arange(step * b, (step + 1) * b),
            steps=range(N_DISTINCT_BATCHES),
            groups=1,
            length=int(pairs["chosen_ids"].shape[1]),
            row_buckets=row_buckets,
        )

    t0 = time.perf_counter()
    state, m = step_fn(state, place(0))
    first_loss = float(m["loss"])
    first_step_s = time.perf_counter() - t0  # compile + one step
    for s in range(1, WARMUP_STEPS):
        state, m = step_fn(state, place(s))
    jax.block_until_ready(state)
    compile_s = {}  # packed: one untimed step per row bucket not met yet, so no compile is timed
    if packed:
        seen = {int(place(s)["input_ids"].shape[1]) for s in range(WARMUP_STEPS)}
        for s in range(N_DISTINCT_BATCHES):
            batch = place(s)
            rows = int(batch["input_ids"].shape[1])
            if rows not in seen:
                t = time.perf_counter()
                state, m = step_fn(state, batch)
                jax.block_until_ready(state)
                seen.add(rows)
                compile_s[rows] = time.perf_counter() - t

    pending = []
    t0 = now()
    for s in range(WARMUP_STEPS, WARMUP_STEPS + steps):
        state, m = step_fn(state, place(s))
        pending.append(m)
        if len(pending) == LOG_EVERY:  # the trainer fetches (and NaN-checks) metrics every log_every steps
            jax.device_get(pending)
            pending = []
    jax.device_get(pending)
    jax.block_until_ready(state)
    t1 = now()
    return {
        "seconds": t1[0] - t0[0],
        "cpu_seconds": t1[1] - t0[1],
        "steps": steps,
        "tokens": tokens_in(pairs, WARMUP_STEPS, steps),
        "first_loss": first_loss,
        "compile_plus_first_step_s": first_step_s,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "compute_dtype": dtype,
        "jax": jax.__version__,
        "packed_rows": layout.rows if packed else None,
        "packed_row_buckets": list(layout.row_buckets) if packed else None,
        "slots": _packed_slots(pairs, layout, WARMUP_STEPS, steps) if packed else None,
        "bucket_compile_plus_step_s": compile_s,
    }


def _packed_slots(pairs: dict, layout, first: int, count: int) -> int:
    """Token slots (real + padding) of the packed batches first .. first+count-1."""
    from common import packing

    return sum(
        int(packing.pack_pairs(batch_at(pairs, s), layout, pad_id=0)["input_ids"].size)
        for s in range(first, first + count)
    )


def run_worker(kind: str, directory: str, steps: int, shape: dict, lengths: str) -> dict:
    if kind == "prepare":
        return worker_prepare(shape, directory, lengths)
    if kind in ("ours", "ours-ynn-off"):
        return worker_ours(directory, steps)
    if kind == "ours-bf16":
        return worker_ours(directory, steps, dtype="bfloat16")
    if kind in ("ours-packed", "ours-packed-static"):
        return worker_ours(directory, steps, packed=True, row_buckets=PACK_ROW_BUCKETS if kind == "ours-packed" else 1)
    from benchmarks import _torch_rm

    if kind == "torch":
        return _torch_rm.worker_torch(directory, steps)
    if kind in ("trl-default", "trl-no-gc"):
        return _torch_rm.worker_trl(directory, steps, None if kind == "trl-default" else False)
    raise ValueError(f"unknown worker kind {kind!r}")


# ----------------------------------------------------------------------------- driver


def spawn(kind: str, directory: str, steps: int, shape_name: str, lengths: str, threads: int) -> dict:
    """Runs one worker in a fresh interpreter; returns its JSON result."""
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        TRANSFORMERS_VERBOSITY="error",
        DATASETS_VERBOSITY="error",
        HF_DATASETS_DISABLE_PROGRESS_BARS="1",
        TF_CPP_MIN_LOG_LEVEL="2",
    )
    if kind in ("ours-ynn-off", "ours-packed", "ours-packed-static"):  # packed: the setting that wins on this CPU
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + YNN_OFF_FLAG).strip()
    if kind.startswith("ours"):
        # Repetitions reuse the compiled step (compilation is never timed; this only saves wall time).
        env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(directory, "jax_cache"))
        env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.rm_throughput",
        "--worker",
        kind,
        "--dir",
        directory,
        "--steps",
        str(steps),
        "--shapes",
        shape_name,
        "--lengths",
        lengths,
        "--threads",
        str(threads),
    ]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    load = os.getloadavg()[0]  # other work on the machine skews everything; kept with each run
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"worker {kind} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return dict(json.loads(lines[-1][len("RESULT ") :]), load_avg_1min_before=load)


def summarise(runs: list[dict]) -> dict:
    rates = [r["tokens"] / r["seconds"] for r in runs]
    step_ms = [1000 * r["seconds"] / r["steps"] for r in runs]
    return {
        "tokens_per_s_median": statistics.median(rates),
        "tokens_per_s_min": min(rates),
        "tokens_per_s_max": max(rates),
        "ms_per_step_median": statistics.median(step_ms),
        "tokens_per_cpu_s_median": statistics.median(r["tokens"] / r["cpu_seconds"] for r in runs),
        "load_avg_median": statistics.median(r["load_avg_1min_before"] for r in runs),
        "first_loss": runs[0]["first_loss"],
    }


OURS = ("ours", "ours-ynn-off")  # padded (trim_to_bucket) runs; the faster median is the headline
BARS = ("trl-default", "trl-no-gc", "torch")


def benchmark_shape(
    name: str, *, reps: int, steps: int | None, lengths: str, threads: int, variants: tuple = VARIANTS
) -> dict:
    shape = SHAPES[name]
    steps = steps or shape["steps"]
    with tempfile.TemporaryDirectory(prefix=f"rm_throughput_{name}_") as directory:
        info = spawn("prepare", directory, steps, name, lengths, threads)
        runs = {v: [] for v in variants}
        for rep in range(reps):
            for variant in variants:
                t0 = time.time()
                result = spawn(variant, directory, steps, name, lengths, threads)
                runs[variant].append(result)
                print(
                    f"[{name} rep {rep + 1}/{reps}] {variant:13s} {result['tokens'] / result['seconds']:10.0f} tok/s "
                    f"({1000 * result['seconds'] / steps:.1f} ms/step, wall {time.time() - t0:.0f}s, "
                    f"load {result['load_avg_1min_before']:.1f})",
                    file=sys.stderr,
                    flush=True,
                )
    summary = {v: summarise(r) for v, r in runs.items()}
    ratios, targets = {}, {}
    ours = [v for v in OURS if v in summary]
    best = max(ours, key=lambda v: summary[v]["tokens_per_s_median"]) if ours else None
    heads = ([("ours", best)] if best else []) + [(v, v) for v in summary if v not in OURS and v not in BARS]
    for label, v in heads:  # 'ours' (best padded setting) and any other ours-* variant vs every bar
        for bar in BARS:
            if bar in summary:
                ratios[f"{label}/{bar}"] = summary[v]["tokens_per_s_median"] / summary[bar]["tokens_per_s_median"]
    floors = [("ours/trl-default", 1.2), ("ours/trl-no-gc", 1.2), ("ours/torch", 1.0)]
    if lengths == "longtail":
        floors.append(("ours-packed/trl-no-gc", 2.0))
    for key, floor in floors:
        if key in ratios:
            targets[f"{key}>={floor}"] = ratios[key] >= floor
    losses = [s["first_loss"] for s in summary.values()]
    return {
        "shape": dict(
            shape,
            steps=steps,
            vocab=shape_vocab(shape),
            lengths=lengths,
            warmup_steps=WARMUP_STEPS,
            params=info["params"],
            threads=threads,
        ),
        "ours_best_variant": best,
        "summary": summary,
        "ratios": ratios,
        "first_loss_spread": max(losses) - min(losses),
        "targets_met": targets,
        "runs": runs,
        "uptime": _uptime(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def markdown(results: dict) -> str:
    lines = [
        "| shape | lengths | run | real tokens/s (median) | min-max | ms/step | ratios | tokens/CPU-s | load | first loss |",
        "|---|---|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for name, res in results.items():
        sm, best = res["summary"], res["ours_best_variant"]
        for v, s in sm.items():
            label = {"ours": "ours (xla-default)", "ours-ynn-off": "ours (ynn-off)"}.get(v, v)
            if v == best:
                label += " *"
            key = "ours" if v == best else (None if v in OURS else v)
            ratio = ", ".join(f"{r.split('/')[1]} {x:.2f}x" for r, x in res["ratios"].items() if r.split("/")[0] == key)
            lines.append(
                f"| {name} | {res['shape']['lengths']} | {label} | {s['tokens_per_s_median']:,.0f} | "
                f"{s['tokens_per_s_min']:,.0f}-{s['tokens_per_s_max']:,.0f} | {s['ms_per_step_median']:.1f} | "
                f"{ratio} | {s['tokens_per_cpu_s_median']:,.0f} | {s['load_avg_median']:.1f} | {s['first_loss']:.6f} |"
            )
    lines.append("")
    first = next(iter(results.values()))
    lines.append(
        f"{first['shape']['threads']} thread(s) per framework; {first['date']}; `{first['uptime']}`. `*` = faster "
        "padded ours setting, used for the 'ours' ratios (this run's tokens/s over that bar's). load = median 1-min "
        "load average before the runs (above the thread count means shared cores)."
    )
    for name, res in results.items():
        met = ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in res["targets_met"].items())
        gc = res["runs"]["trl-default"][0]["gradient_checkpointing"] if "trl-default" in res["runs"] else "-"
        lines.append(
            f"- {name}: {met or 'no targets in this selection'}; first-step losses agree within "
            f"{res['first_loss_spread']:.1e}; TRL default gradient_checkpointing={gc}"
        )
    return "\n".join(lines)


def main(argv=None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="tiny,small", help=f"comma-separated, from {sorted(SHAPES)}")
    p.add_argument("--reps", type=int, default=5, help="interleaved repetitions per run (median reported)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (default: per shape)")
    p.add_argument("--lengths", default="full", choices=LENGTHS, help="sequence lengths, see docstring")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {VARIANTS}")
    p.add_argument("--quick", action="store_true", help=f"{QUICK['reps']} reps, fewer steps: a few minutes")
    p.add_argument(
        "--threads",
        type=int,
        default=2,
        help="threads (and, if fewer than this machine's cores, pinned cores) per framework",
    )
    p.add_argument("--out", default="benchmarks/results/rm_throughput.json", help="JSON results file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown or not shapes:
        p.error(f"--shapes: unknown {unknown}; choose from {sorted(SHAPES)}")
    if args.worker:
        shape = SHAPES[shapes[0]]
        cores = sorted(os.sched_getaffinity(0))
        if args.worker != "prepare" and args.threads < len(cores):
            # Before jax/torch start their thread pools: XLA sizes its pool from the affinity mask.
            os.sched_setaffinity(0, cores[: args.threads])
        result = run_worker(args.worker, args.dir, args.steps or shape["steps"], shape, args.lengths)
        print("RESULT " + json.dumps(result), flush=True)
        return None

    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    if not variants or any(v not in VARIANTS for v in variants):
        p.error(f"--variants {args.variants!r}: each one of {VARIANTS}")
    if args.reps < 1 or args.threads < 1:
        p.error("--reps and --threads must be >= 1")
    reps = QUICK["reps"] if args.quick else args.reps
    t0 = time.time()
    results = {
        name: benchmark_shape(
            name,
            reps=reps,
            steps=args.steps or (QUICK["steps"][name] if args.quick else None),
            lengths=args.lengths,
            threads=args.threads,
            variants=variants,
        )
        for name in shapes
    }
    table = markdown(results)
    print(table)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"results": results, "reps": reps, "wall_s": time.time() - t0, "table": table}, f, indent=2)
    print(f"\nwrote {args.out} ({time.time() - t0:.0f}s)", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
