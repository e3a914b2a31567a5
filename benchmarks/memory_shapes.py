"""Memory of the RM step and the PPO update at real shapes, on 1 device and on an 8-device FSDP mesh.

  python -m benchmarks.memory_shapes --table benchmarks/results/ms_*.json   (the README table)
  python -m benchmarks.memory_shapes [--devices 1|8] [--shapes llama3.2-1b,qwen3-1.7b,llama3.1-8b]
      [--modes before,after] [--depths 2,4] [--out benchmarks/results/memory_shapes_d1.json]

Same accounting as benchmarks/memory.py (it reuses its step builders, `memory_stats` and
`compiler_options`): each step is compiled for abstract arguments and XLA's
`memory_analysis()` gives per-device bytes, peak = argument + temp + output - alias. On the
8-device mesh (fake CPU devices, `--xla_force_host_platform_device_count=8`, mesh (data=8,
model=1)) parameters, Adam moments and frozen trees are split FSDP-style by models/sharding.py's
DEFAULT_RULES ('embed' over 'data') and batches by their leading dim; the figures are per device.

Modes
  before  attention='xla' (float32 [B, H, T, T] scores) and logits_chunk=0 (full [B, T, V] logits).
  after   attention='chunked' (blockwise, models/attention.py) and logits_chunk=128 (models/lm_head.py).
  after_scan  after + scan_layers=True: params (and Adam moments) held stacked [G, ...] per period
          position, one checkpointed scan over the layers (models/scan.py); use --depths ''.

Configuration: bf16 parameters and compute, remat on every block (nothing_saveable), full
fine-tuning of policy and value model (benchmarks/memory.py's 'bf16+remat'). Workloads (global
batch; per device it is divided by the device count): RM 8 pairs x 2048 tokens (a [16, 2048]
forward); PPO 8 rollouts x (1024 prompt + 1024 response), one minibatch, all four models
resident. `--rm-len 4096` gives the RM step at 4096 tokens (the linear-growth check).

Depth: compiling 16-32 layers of 1B-8B models on a 2-core CPU takes minutes each, so with
`--depths 2,4` (the default) each figure is compiled at 2 and 4 layers and every byte count is
extrapolated linearly to the real depth (the layer stack is affine in depth: one remat
residual [B, T, d] and one layer's parameters/moments per layer); `--depths ''` compiles at
full depth.

Qwen3-1.7B is measured with a llama-family config of its dims (head_dim 128, 16 heads / 8 KV
heads, tied embeddings): qwen3's q/k norms add only 2 x 128 parameters per layer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if __name__ == "__main__" and "--devices" in sys.argv and sys.argv[sys.argv.index("--devices") + 1] != "1":
    n = sys.argv[sys.argv.index("--devices") + 1]
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from benchmarks.memory import _affine, compiler_options, memory_stats  # noqa: E402
from benchmarks.memory_setup import SHAPES, Variant, ppo_setup, rm_setup  # noqa: E402
from common.mesh import batch_sharding, make_mesh  # noqa: E402
from models.sharding import DEFAULT_RULES, layer_sharding, tree_shardings  # noqa: E402

GIB = 2.0**30
REAL_SHAPES = {
    "llama3.2-1b": SHAPES["1b"],  # benchmarks/memory.py's 1B shape is Llama-3.2-1B
    "qwen3-1.7b": dict(
        vocab_size=151936,
        d_model=2048,
        n_layers=28,
        n_heads=16,
        n_kv_heads=8,
        head_dim=128,
        d_ff=6144,
        rope_theta=1000000.0,
        tie_embeddings=True,
    ),
    "llama3.1-8b": dict(
        vocab_size=128256,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        head_dim=128,
        d_ff=14336,
        rope_theta=500000.0,
        tie_embeddings=False,
    ),
}
MODES = {
    "before": dict(attention="xla", logits_chunk=0),
    "after": dict(attention="chunked", logits_chunk=128),
    # after + a scan over stacked layers: the scan body is checkpointed, so only its carries (one
    # residual per layer) are saved for the backward pass whatever the CPU scheduler does.
    "after_scan": dict(attention="chunked", logits_chunk=128, scan_layers=True),
    # after_scan + the MLP over chunks of 512 positions (models/mlp.py): one chunk's [rows, d_ff] intermediates.
    "after_scan_mlp": dict(attention="chunked", logits_chunk=128, scan_layers=True, mlp_chunk=512),
}
VARIANT = Variant("bf16", remat=True)


def _place(tree, sharding_fn):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sharding_fn(tree))


def compiled_memory(kind, dims, workload, mesh, *, variant=VARIANT, layer_constraint=True, **setup_options) -> dict:
    """Per-device XLA memory of one step; params/moments FSDP on `mesh`, batches split (None: 1 device).

    layer_constraint: trace inside models.sharding.layer_sharding(mesh) as the trainers do (scanned
    layers constrain each layer's params and gradients to their shards); False: GSPMD alone.
    setup_options: passed to the step builder (ppo: sequential_value_update)."""
    setup = {"rm": rm_setup, "ppo": ppo_setup}[kind]
    step, build = setup(dims, variant, workload, **setup_options)
    args = list(jax.eval_shape(build))
    if mesh is not None:
        batch_index = 1  # rm: (state, batch, frozen); ppo: (state, rollout, frozen, reference, reward)
        for i, tree in enumerate(args):
            if tree is None:
                continue
            if i == batch_index:
                args[i] = _place(tree, lambda t: jax.tree.map(lambda _: batch_sharding(mesh), t))
            else:
                args[i] = _place(tree, lambda t: tree_shardings(t, mesh, DEFAULT_RULES))
    t0 = time.time()
    with layer_sharding(mesh if layer_constraint else None, DEFAULT_RULES):  # the step is traced in lower()
        compiled = step.lower(*args).compile(compiler_options("memory"))
    out = memory_stats(compiled)
    out["compile_s"] = time.time() - t0
    return out


def measure(kind, dims, workload, mesh, depths) -> dict:
    target = dims["n_layers"]
    if not depths:
        return dict(compiled_memory(kind, dims, workload, mesh), method=f"compiled at {target} layers")
    points = {d: compiled_memory(kind, dict(dims, n_layers=d), workload, mesh) for d in depths}
    out = _affine(points, target)
    out["method"] = f"extrapolated linearly from {depths[0]} and {depths[1]} layers"
    out["points"] = {str(d): p for d, p in points.items()}
    # The depth-independent part (embedding, LM head, logits, losses): the fit at 0 layers.
    out["at_0_layers"] = {k: v for k, v in _affine(points, 0).items() if k != "compile_s"}
    return out


def markdown(paths) -> str:
    """One table (GiB per device) from the JSON reports `paths` written by --out."""
    rows = []
    for path in paths:
        with open(path) as f:
            report = json.load(f)
        for r in report["rows"]:
            rows.append(
                (
                    r["shape"],
                    r["kind"],
                    report["workload"]["rm_len"] if r["kind"] == "rm" else 2048,
                    r["devices"],
                    r["mode"],
                    r,
                )
            )
    lines = [
        "| shape | step | tokens | devices | mode | peak | argument | temp | temp at 0 layers | [B,T,V] f32 logits |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for shape, kind, t, n, mode, r in sorted(rows, key=lambda x: x[:5]):
        zero = r.get("at_0_layers", {}).get("temp")
        logits = r.get("full_logits_f32_bytes_per_device")
        cells = [shape, kind, str(t), str(n), mode] + [f"{r[k] / GIB:.2f}" for k in ("peak", "argument", "temp")]
        cells += [f"{zero / GIB:.2f}" if zero is not None else "-", f"{logits / GIB:.2f}" if logits else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    if argv is None and sys.argv[1:2] == ["--table"]:
        print(markdown(sys.argv[2:]))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", default="1", help="1, or 8 (fake CPU devices; an FSDP mesh data=8)")
    ap.add_argument("--shapes", default=",".join(REAL_SHAPES))
    ap.add_argument("--modes", default="before,after")
    ap.add_argument("--kinds", default="rm,ppo")
    ap.add_argument("--depths", default="2,4")
    ap.add_argument("--rm-len", type=int, default=2048)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    n = int(args.devices)
    if jax.device_count() < n:
        raise SystemExit(f"--devices {n} but JAX sees {jax.device_count()} devices")
    mesh = make_mesh((n, 1), ("data", "model")) if n > 1 else None
    depths = tuple(int(d) for d in args.depths.split(",") if d.strip())
    workload = dict(rm_pairs=8, rm_len=args.rm_len, ppo_rollouts=8, prompt_len=1024, response_len=1024)
    rows = []
    for shape in args.shapes.split(","):
        for mode in args.modes.split(","):
            dims = dict(REAL_SHAPES[shape], **MODES[mode])
            for kind in args.kinds.split(","):
                m = measure(kind, dims, workload, mesh, depths)
                b = workload["ppo_rollouts"] // n
                logits = b * (workload["prompt_len"] + workload["response_len"]) * dims["vocab_size"] * 4
                row = dict(shape=shape, mode=mode, kind=kind, devices=n, **m)
                if kind == "ppo":
                    row["full_logits_f32_bytes_per_device"] = logits
                    if "at_0_layers" in m:
                        row["depth_independent_temp_below_logits"] = m["at_0_layers"]["temp"] < logits
                rows.append(row)
                extra = f"  temp@0 layers {m['at_0_layers']['temp'] / GIB:6.2f}" if "at_0_layers" in m else ""
                print(
                    f"{shape:12s} {mode:6s} {kind:3s} T={args.rm_len if kind == 'rm' else 2048} {n}dev: peak {m['peak'] / GIB:7.2f} GiB  temp "
                    f"{m['temp'] / GIB:7.2f}  arg {m['argument'] / GIB:7.2f}  ({m['compile_s']:.0f} s compiling){extra}",
                    file=sys.stderr,
                    flush=True,
                )
    report = {
        "variant": VARIANT.name,
        "workload": workload,
        "modes": MODES,
        "devices": n,
        "depths": list(depths),
        "formula": "peak = argument + temp + output - alias, per device",
        "rows": rows,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
