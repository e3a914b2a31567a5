"""Run a test file as a worker subprocess (its `--worker` branch), e.g. on fake devices, and read
its one-line JSON report.

XLA_FLAGS such as --xla_force_host_platform_device_count=8 must be set before jax is imported, so
the multi-device tests run themselves in a fresh process with the flags added to the environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_worker(script: str, *, xla_flags: str = "", args=("--worker",), timeout: int = 600) -> dict:
    """`python script --worker` with the repo on PYTHONPATH, CPU JAX and `xla_flags` appended to
    XLA_FLAGS; asserts exit 0 (showing the worker's output tail) and returns its last stdout line
    parsed as JSON."""
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + xla_flags).strip(),
    )
    proc = subprocess.run(
        [sys.executable, os.path.abspath(script), *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])
