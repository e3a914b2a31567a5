"""What is live at the peak of one compiled step: XLA's own live-range report, grouped.

  python -m benchmarks.memory_peak [--kind ppo|rm] [--shape llama3.2-1b] [--mode after_scan] [--layers 16]
      [--variant bf16+remat] [--sequential-value-update] [--mlp-chunk 512] [--top 25]
      [--out benchmarks/results/memory_peak_ppo.json]

Compiles the step as benchmarks/memory_shapes.py does (1 device or the 8-device FSDP mesh, bf16
+ remat, XLA:CPU memory-optimised scheduler; figures per device) with `--xla_dump_to`, then reads the dump's `*-live-range.txt` ("Live ranges
at N (peak)": every buffer live at the peak of the heap simulation, with its size) and the
`*-buffer-assignment.txt` (each buffer's shape). Buffers named after the step's arguments
(state, rollout, frozen trees) are arguments; everything else is temp. The temp buffers are
printed largest first with shape and the op that made them, and summed by dtype, so one can see
which of them a GPU would hold in bf16 (XLA:CPU computes bf16 dots and elementwise ops in f32).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
import tempfile
from collections import defaultdict

ARG_PREFIXES = ("state", "rollout", "frozen", "ref_params", "reward_params", "batch")
_SPMD_PARAM = re.compile(r"^param\.\d+$")  # entry parameters of an SPMD-partitioned module (8 devices)


def _is_argument(name: str) -> bool:
    return name.startswith(ARG_PREFIXES) or bool(_SPMD_PARAM.match(name))


GIB = 2.0**30


def parse_dump(folder: str) -> dict:
    """{'peak_bytes', 'buffers': [(name, bytes, shape)]} of the largest module's peak in `folder`."""
    ranges = sorted(glob.glob(os.path.join(folder, "*-live-range.txt")), key=os.path.getsize)
    if not ranges:
        raise FileNotFoundError(f"no *-live-range.txt in {folder}: XLA wrote no dump")
    live_path = ranges[-1]
    text = open(live_path).read()
    section = re.search(r"Live ranges at \d+ \(peak\):\n(.*?)\n  \S", text, re.S)
    if section is None:
        raise ValueError(f"{live_path}: no 'Live ranges at N (peak)' section")
    shapes = {}
    for line in open(live_path.replace("-live-range.txt", "-buffer-assignment.txt")):
        m = re.match(r"\s*value: <\d+ (\S+) @\d+> \(size=\d+,offset=\d+\): (\S+?)(\{[^}]*\})?$", line.strip())
        if m:
            shapes.setdefault(m.group(1), m.group(2))
    buffers = []
    for line in section.group(1).splitlines():
        m = re.match(r"\s*(\S+?)(\{[^}]*\})?: (\d+) bytes", line)
        if m:
            buffers.append((m.group(1), int(m.group(3)), shapes.get(m.group(1), "?")))
    return {"file": os.path.basename(live_path), "buffers": buffers, "peak_bytes": sum(b for _, b, _ in buffers)}


def summarize(report: dict, top: int) -> dict:
    args = [b for b in report["buffers"] if _is_argument(b[0])]
    temps = sorted((b for b in report["buffers"] if not _is_argument(b[0])), key=lambda b: -b[1])
    by_dtype = defaultdict(int)
    for _, size, shape in temps:
        by_dtype[shape.split("[")[0]] += size
    return {
        "peak_bytes": report["peak_bytes"],
        "argument_bytes_live": sum(b for _, b, _ in args),
        "temp_bytes_live": sum(b for _, b, _ in temps),
        "temp_bytes_by_dtype": dict(sorted(by_dtype.items(), key=lambda kv: -kv[1])),
        "largest_temps": [{"name": n, "bytes": b, "shape": s} for n, b, s in temps[:top]],
        "n_temps": len(temps),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kind", default="ppo", choices=("ppo", "rm"))
    ap.add_argument("--shape", default="llama3.2-1b")
    ap.add_argument("--mode", default="after_scan")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--devices", type=int, default=1, help="1, or 8 (fake CPU devices, FSDP mesh data=8)")
    ap.add_argument(
        "--variant", default="bf16+remat", help="benchmarks.memory_setup.parse_variant name, e.g. fp32+remat"
    )
    ap.add_argument("--no-layer-constraint", action="store_true", help="8 devices: GSPMD alone inside the layer scan")
    ap.add_argument(
        "--sequential-value-update",
        action="store_true",
        help="ppo: train.sequential_value_update (policy step, then value step, one optimizer each)",
    )
    ap.add_argument(
        "--mlp-chunk", type=int, default=0, help="model.mlp_chunk: the MLP over chunks of this many positions"
    )
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    folder = tempfile.mkdtemp(prefix="xla_dump_")
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_dump_to={folder} --xla_dump_hlo_module_re=.*step.* --xla_dump_hlo_pass_re=NOTHING"
        + (f" --xla_force_host_platform_device_count={args.devices}" if args.devices > 1 else "")
    ).strip()
    if args.devices > 1:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from benchmarks.memory_setup import parse_variant
    from benchmarks.memory_shapes import MODES, REAL_SHAPES, compiled_memory  # jax reads XLA_FLAGS on import
    from common.mesh import make_mesh

    dims = dict(REAL_SHAPES[args.shape], **MODES[args.mode], n_layers=args.layers, mlp_chunk=args.mlp_chunk)
    workload = dict(rm_pairs=8, rm_len=2048, ppo_rollouts=8, prompt_len=1024, response_len=1024)
    mesh = make_mesh((args.devices, 1), ("data", "model")) if args.devices > 1 else None
    stats = compiled_memory(
        args.kind,
        dims,
        workload,
        mesh,
        variant=parse_variant(args.variant),
        layer_constraint=not args.no_layer_constraint,
        **({"sequential_value_update": True} if args.sequential_value_update else {}),
    )
    out = dict(vars(args), memory_analysis=stats, **summarize(parse_dump(folder), args.top))
    print(
        f"{args.shape} {args.mode} {args.variant}{' sequential' if args.sequential_value_update else ''}"
        f"{f' mlp_chunk {args.mlp_chunk}' if args.mlp_chunk else ''} "
        f"{args.kind} {args.layers} layers, {args.devices} device(s): XLA temp {stats['temp'] / GIB:.2f} GiB; "
        f"at the peak {out['peak_bytes'] / GIB:.2f} GiB live = arguments {out['argument_bytes_live'] / GIB:.2f} "
        f"+ temps {out['temp_bytes_live'] / GIB:.2f} ({out['n_temps']} buffers)"
    )
    print("  temps by dtype: " + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in out["temp_bytes_by_dtype"].items()))
    for t in out["largest_temps"]:
        print(f"  {t['bytes'] / 2**20:9.1f} MiB  {t['shape']:28s} {t['name'][:110]}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    sys.exit(main() and 0)
