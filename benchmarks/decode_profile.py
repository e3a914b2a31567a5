"""Where one KV-cache decode step of our sampler spends its time: per-op-category thread time from a
jax.profiler trace of one `generate` call, thunks per step and per layer, and the GFLOP/s of the dots.

    python -m benchmarks.decode_profile [--shapes small-12L,gpt2-small] [--pin 1] [--variant default]

The model is benchmarks/generation.py's (random HF weights loaded by models/hf.py, 16 prompts of 16
tokens, 48 new tokens at temperature 0.7, EOS off). Trace events are XLA:CPU thunks; each one is
classified from the compiled HLO (its opcode, batch dims and the op_name metadata). Times are thread
busy time summed over the call, divided by the number of decode steps (the prefill is a few percent
of one call and is counted in with the step it precedes). FLOPs of each dot come from its shapes in
the HLO. On a loaded machine the event durations include descheduled time: pin to one core and
compare the CPU-time column with the trace total.
"""

from __future__ import annotations

import argparse
import collections
import glob
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]\S* (\w[\w\-]*)\(")


def _parse_hlo(text: str) -> dict:
    """name -> (dtype, shape, opcode, line) for every instruction of the compiled HLO."""
    out = {}
    for line in text.splitlines():
        m = _INSTR.match(line)
        if m:
            name, dtype, dims, opcode = m.groups()
            shape = tuple(int(d) for d in dims.split(",") if d)
            out[name] = (dtype, shape, opcode, line)
    return out


def _dot_flops(instrs: dict, name: str) -> float:
    """2 * |output| * |contracted| of a dot instruction (0 when it cannot be read)."""
    _, shape, _, line = instrs[name]
    lhs = re.search(r"dot\(%([\w.\-]+)", line)
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
    if not lhs or lhs.group(1) not in instrs or not contracting:
        return 0.0
    lhs_shape = instrs[lhs.group(1)][1]
    k = math.prod(lhs_shape[int(i)] for i in contracting.group(1).split(",") if i)
    return 2.0 * math.prod(shape) * k


def _category(instrs: dict, name: str) -> str:
    """Category of one thunk (trace event name = HLO instruction name)."""
    if name not in instrs:
        return "other (control flow, runtime)"
    _, _, opcode, line = instrs[name]
    op_name = re.search(r'op_name="([^"]*)"', line)
    op_name = op_name.group(1) if op_name else ""
    if opcode == "dot":
        return "attention dot (q.k, p.v)" if "lhs_batch_dims" in line else "projection / lm-head dot"
    if "dynamic-update-slice" in name:
        return "cache write (dynamic-update-slice fusion)"
    if "Transformer" not in op_name and op_name and "while/body" in op_name:
        return "sampling (vocab side, bookkeeping)"
    if "attn/" in op_name or "select" in name or "exponential" in name:
        return "attention softmax / mask"
    if "norm" in op_name or "rsqrt" in name or "reduce" in name:
        return "norms (reductions)"
    if opcode == "copy":
        return "copy"
    return "other elementwise fusion"


def profile_shape(shape: str, args) -> dict:
    import jax
    import numpy as np
    from jax.profiler import ProfileData

    from benchmarks.generation import TEMPERATURE, build_models
    from models.sampling import make_generate_fn

    b, p, n = args.batch, args.prompt_len, args.new_tokens
    with tempfile.TemporaryDirectory() as folder:
        _, config, params = build_models(shape, folder)
    prompts = np.random.default_rng(0).integers(1, config.vocab_size, (b, p)).astype(np.int32)
    mask = np.ones_like(prompts)
    fn = make_generate_fn(config, max_new_tokens=n, temperature=TEMPERATURE, eos_token_id=-1)
    key = jax.random.key(0)
    instrs = _parse_hlo(fn.lower(params, prompts, mask, key).compile().as_text())
    jax.block_until_ready(fn(params, prompts, mask, key))
    wall, cpu = [], []
    for rep in range(args.reps):
        t, c = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn(params, prompts, mask, jax.random.key(rep)))
        wall.append(1000 * (time.perf_counter() - t) / n)
        cpu.append(1000 * (time.process_time() - c) / n)

    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        jax.block_until_ready(fn(params, prompts, mask, jax.random.key(99)))
        jax.profiler.stop_trace()
        path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))[-1]
        ms, events, flops = collections.Counter(), collections.Counter(), collections.Counter()
        per_op = collections.Counter()
        for plane in ProfileData.from_file(path).planes:
            for line in plane.lines:
                if line.name == "python":
                    continue
                for ev in line.events:
                    if ev.name.startswith(("ThunkExecutor", "end: ", "while", "$")):
                        continue
                    cat = _category(instrs, ev.name)
                    ms[cat] += ev.duration_ns / 1e6 / n
                    events[cat] += 1 / n
                    per_op[ev.name] += ev.duration_ns / 1e6 / n
                    if ev.name in instrs and instrs[ev.name][2] == "dot":
                        flops[cat] += _dot_flops(instrs, ev.name) / n
    return dict(
        shape=shape,
        layers=config.n_layers,
        wall_ms_per_step=statistics.median(wall),
        cpu_ms_per_step=statistics.median(cpu),
        traced_ms_per_step=sum(ms.values()),
        ms=dict(ms),
        events=dict(events),
        flops=dict(flops),
        top_ops=per_op.most_common(args.top),
    )


def _print(r: dict) -> None:
    total = r["traced_ms_per_step"]
    print(
        f"\n### {r['shape']}: {r['wall_ms_per_step']:.2f} ms wall, {r['cpu_ms_per_step']:.2f} ms CPU per decode step "
        f"(median); trace: {total:.2f} ms thread time, {sum(r['events'].values()):.0f} thunks per step "
        f"({sum(r['events'].values()) / r['layers']:.1f} per layer)\n"
    )
    print("| category | ms / step | share | thunks / step | GFLOP/s |")
    print("|---|---:|---:|---:|---:|")
    for cat, v in sorted(r["ms"].items(), key=lambda kv: -kv[1]):
        gflops = f"{r['flops'][cat] / v / 1e6:.1f}" if r["flops"].get(cat) else ""
        print(f"| {cat} | {v:.3f} | {100 * v / total:.1f}% | {r['events'][cat]:.1f} | {gflops} |")
    print("\ntop ops (ms / step): " + ", ".join(f"{k} {v:.3f}" for k, v in r["top_ops"]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default="small-12L,gpt2-small")
    parser.add_argument("--pin", type=int, default=1, help="pin to this many cores (0 = all)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--xla-ynn", choices=["default", "off"], default="off")
    args = parser.parse_args(argv)
    if args.pin:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.pin])
    if args.xla_ynn == "off":
        from benchmarks.generation import YNN_OFF_FLAG

        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + YNN_OFF_FLAG).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; `{uptime}`; pinned {args.pin}; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
    )
    for shape in args.shapes.split(","):
        _print(profile_shape(shape, args))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
