"""Multi-process (multi-host) runs on JAX's own distributed runtime.

Every process runs the same command; `experiments/run.py` calls `initialize(config)`
before anything touches a device. Where the coordinator, the process count and this
process's id come from, first match wins per value:

  1. `config.distributed.coordinator_address / num_processes / process_id`,
  2. the environment: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID,
  3. with `config.distributed.auto=True`, JAX's cluster auto-detection (SLURM,
     Open MPI, Cloud TPU, Kubernetes ...) for whatever is still unset.

With none of these the run is a plain single process and nothing is started.

  # two processes on one machine (each sees its own devices):
  JAX_COORDINATOR_ADDRESS=127.0.0.1:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 python -m experiments.run ...
  JAX_COORDINATOR_ADDRESS=127.0.0.1:1234 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=1 python -m experiments.run ...

In such a run every process computes on the global arrays (`jax.Array`s spanning
all processes' devices), feeds only its own rows of each batch
(`common.mesh.local_rows`), calls every checkpoint method, and only process 0
writes files (`is_main_process`).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np

__all__ = ["initialize", "is_main_process", "gather_to_host", "resolve_settings"]

ENV_ADDRESS = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


def _env_int(name: str, environ) -> int | None:
    value = environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"Environment variable {name}={value!r} must be an integer.") from None


def resolve_settings(section: Any = None, environ=None) -> dict[str, Any] | None:
    """The (coordinator_address, num_processes, process_id, auto) to start with, or None.

    Args:
      section: `config.distributed` (a ConfigDict or dict; None = all unset).
      environ: mapping read for the JAX_* variables (default `os.environ`).

    Returns:
      None for a single-process run; otherwise a dict whose unset values are None
      (left to JAX's cluster auto-detection, which needs `auto` or a coordinator).

    Raises:
      ValueError: for contradictory or out-of-range settings, naming where each came from.
    """
    environ = os.environ if environ is None else environ
    get = (lambda k, d: section.get(k, d)) if section is not None else (lambda k, d: d)
    address = str(get("coordinator_address", "") or "") or environ.get(ENV_ADDRESS, "").strip() or None
    num = int(get("num_processes", 0) or 0)
    num = num if num > 0 else _env_int(ENV_NUM_PROCESSES, environ)
    pid = int(get("process_id", -1))
    pid = pid if pid >= 0 else _env_int(ENV_PROCESS_ID, environ)
    auto = bool(get("auto", False))
    if address is None and not auto:
        if num not in (None, 1) or pid not in (None, 0):
            raise ValueError(
                f"distributed: num_processes={num} / process_id={pid} are set but no coordinator: set "
                f"config.distributed.coordinator_address (or {ENV_ADDRESS}=HOST:PORT), or "
                "config.distributed.auto=True to detect the cluster."
            )
        return None
    if num is not None and num < 1:
        raise ValueError(
            f"distributed: num_processes must be >= 1, got {num} "
            f"(config.distributed.num_processes or {ENV_NUM_PROCESSES})."
        )
    if pid is not None and (pid < 0 or (num is not None and pid >= num)):
        raise ValueError(
            f"distributed: process_id={pid} must be in [0, num_processes={num}) "
            f"(config.distributed.process_id or {ENV_PROCESS_ID})."
        )
    if address is not None and ":" not in address:
        raise ValueError(
            f"distributed: coordinator_address {address!r} must be HOST:PORT "
            f"(config.distributed.coordinator_address or {ENV_ADDRESS})."
        )
    return {"coordinator_address": address, "num_processes": num, "process_id": pid, "auto": auto}


def _use_cpu_collectives() -> None:
    """Cross-process collectives on the CPU backend need an implementation (gloo).

    Newer JAX already defaults to gloo; an explicit user choice (e.g. 'mpi') is kept.
    Has no effect on GPU/TPU backends.
    """
    name = "jax_cpu_collectives_implementation"
    if hasattr(jax.config, name) and getattr(jax.config, name) in (None, "", "none"):
        jax.config.update(name, "gloo")


def initialize(config: Any = None, *, environ=None) -> bool:
    """Starts JAX's distributed runtime when configured; returns True if it runs.

    Call once per process before any JAX computation or device query. Safe to call
    again (a runtime already started is left as is).

    Args:
      config: the experiment ConfigDict; its optional `distributed` section is read.
      environ: mapping read for the JAX_* variables (default `os.environ`).
    """
    section = config.get("distributed", None) if config is not None and hasattr(config, "get") else None
    settings = resolve_settings(section, environ)
    if settings is None:
        return False
    if jax.distributed.is_initialized():
        return True
    _use_cpu_collectives()
    try:
        jax.distributed.initialize(
            coordinator_address=settings["coordinator_address"],
            num_processes=settings["num_processes"],
            process_id=settings["process_id"],
        )
    except (ValueError, RuntimeError) as e:
        shown = {k: v for k, v in settings.items() if k != "auto"}
        raise RuntimeError(
            f"jax.distributed.initialize failed with {shown} (unset values left to cluster "
            f"auto-detection): {e}\nEvery process needs the same coordinator HOST:PORT and "
            "process count and its own process id; process 0 must be reachable there."
        ) from e
    expected = settings["num_processes"]
    if expected is not None and jax.process_count() != expected:
        raise RuntimeError(f"distributed: expected {expected} processes, JAX reports {jax.process_count()}.")
    logging.warning(
        "distributed: process %d of %d, %d local / %d global devices (coordinator %s).",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        settings["coordinator_address"] or "auto-detected",
    )
    return True


def is_main_process() -> bool:
    """True on process 0, the one process that writes files other than checkpoints."""
    return jax.process_index() == 0


def gather_to_host(tree: Any) -> Any:
    """Every leaf as a full NumPy array on every process (a collective: all processes call it).

    Arrays whose shards live on other processes are all-gathered; fully addressable
    (e.g. single-process or replicated) arrays are simply fetched. Use it before a
    process-0-only write of model weights or rollout samples.
    """

    def fetch(leaf):
        if isinstance(leaf, jax.Array) and not (leaf.is_fully_addressable or leaf.is_fully_replicated):
            from jax.experimental import multihost_utils  # Local: only multi-process runs need it.

            return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        return np.asarray(jax.device_get(leaf)) if isinstance(leaf, (jax.Array, np.ndarray)) else leaf

    return jax.tree.map(fetch, tree)
