"""Peak host memory of loading a Hugging Face folder onto an 8-device mesh: whole on one device then
resharded (what the trainers did before loading onto their mesh) vs straight onto the shardings.

  python benchmarks/mesh_load_memory.py [--dir /tmp/mesh_load_bench] [--rounds 2]

Writes (once) a random Llama-shaped folder of about 360 MB (fp32; the largest tensors are the
[32000, 1024] embedding and lm_head, 131 MB each), then loads it in fresh subprocesses on 8 fake CPU
devices (XLA_FLAGS=--xla_force_host_platform_device_count=8), alternating the two ways, and reports
for each the peak resident memory above the process's baseline (after imports and mesh creation):
VmHWM (peak RSS, reset through /proc/self/clear_refs) and the peak anonymous RSS sampled every 2 ms
(memory-mapped file pages the loader reads count in RSS but not in RssAnon), with glibc's mmap threshold
fixed at 128 KiB so freed buffers leave RSS at once (MALLOC_MMAP_THRESHOLD_). On fake CPU devices
the devices' buffers are host memory too, so the placed model itself (1x, split over 8 devices) is
part of both figures; the difference is the whole-model copy on device 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SHAPE = dict(family="llama", vocab_size=32000, d_model=1024, n_layers=2, n_heads=8, n_kv_heads=8, head_dim=128)


def _status() -> dict:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024  # kB -> bytes
    return out


def write_folder(folder: str) -> None:
    """A random Llama-shaped HF folder (fp32), written with the project's own writer (no torch)."""
    import jax
    import numpy as np

    from models.hf import save_hf_checkpoint
    from models.transformer import TransformerConfig, init_params

    config = TransformerConfig(**SHAPE, d_ff=2816)
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.02 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
    save_hf_checkpoint(config, params, folder)


def child(folder: str, way: str) -> dict:
    """Loads `folder` onto a (2, 4) mesh one way; returns the memory figures (bytes)."""
    import jax

    from common.mesh import make_mesh
    from models.hf import load_hf_checkpoint
    from models.sharding import DEFAULT_RULES, shard_params

    mesh = make_mesh((2, 4))
    jax.block_until_ready(jax.device_put(jax.numpy.zeros(8), jax.devices()[1]))  # backend started
    base = _status()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    peak_anon, done = [base["RssAnon"]], threading.Event()

    def sample():
        while not done.is_set():
            peak_anon[0] = max(peak_anon[0], _status()["RssAnon"])
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    if way == "before":  # whole on the default device, then resharded
        _, params = load_hf_checkpoint(folder)
        params = shard_params(params, mesh, DEFAULT_RULES)
    else:
        _, params = load_hf_checkpoint(folder, mesh=mesh, rules=DEFAULT_RULES)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    end = _status()
    leaves = jax.tree.leaves(params)
    return {
        "way": way,
        "seconds": seconds,
        "model_bytes": sum(x.nbytes for x in leaves),
        "largest_tensor_bytes": max(x.nbytes for x in leaves),
        "device0_bytes": sum(s.data.nbytes for x in leaves for s in x.addressable_shards if s.device.id == 0),
        "peak_rss_above_base": end["VmHWM"] - base["VmRSS"],
        "peak_anon_above_base": peak_anon[0] - base["RssAnon"],
        "end_anon_above_base": end["RssAnon"] - base["RssAnon"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/mesh_load_bench")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", choices=("before", "after"))
    args = parser.parse_args()
    folder = os.path.join(args.dir, "llama")
    if args.child:
        print(json.dumps(child(folder, args.child)))
        return
    if not os.path.exists(os.path.join(folder, "config.json")):
        write_folder(folder)
    # A fixed glibc mmap threshold returns every freed large buffer to the system at once, so RSS shows
    # what is live rather than what malloc kept after a peak.
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        MALLOC_MMAP_THRESHOLD_=os.environ.get("MALLOC_MMAP_THRESHOLD_", "131072"),
    )
    results = {"before": [], "after": []}
    for _ in range(args.rounds):
        for way in ("before", "after"):  # interleaved, so load on the machine hits both alike
            proc = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--dir", args.dir, "--child", way],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            results[way].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    mib = 2**20
    first = results["after"][0]
    print(
        f"model {first['model_bytes'] / mib:.0f} MiB, largest tensor {first['largest_tensor_bytes'] / mib:.0f} MiB, "
        f"device 0 holds {first['device0_bytes'] / mib:.1f} MiB after either load; uptime: {os.getloadavg()}"
    )
    for way, runs in results.items():
        median = {k: statistics.median(r[k] for r in runs) for k in runs[0] if k != "way"}
        print(
            f"{way:>6}: peak RSS +{median['peak_rss_above_base'] / mib:.0f} MiB, "
            f"peak anon +{median['peak_anon_above_base'] / mib:.0f} MiB, "
            f"anon after +{median['end_anon_above_base'] / mib:.0f} MiB, {median['seconds']:.2f} s "
            f"(median of {len(runs)})"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    main()
