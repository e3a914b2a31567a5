"""Independent stages of an experiment in parallel worker processes, each writing to its own log file.

Used by the drivers whose seeds (or noise levels) share nothing but finished inputs (the world, the SFT
policy). On this 2-core CPU one process of the Gao driver keeps 1.4 cores busy on average (small
matmuls, Python between steps, single-threaded scoring), so processes side by side use the idle rest.
Workers are spawned, not forked: a forked child would inherit the parent's JAX runtime and thread pools.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from concurrent.futures import ProcessPoolExecutor


class _Preempted:
    """A worker's StagePreempted, carried back as a value (the exception's own pickling loses its result)."""

    def __init__(self, result):
        self.result = result


def _call_logged(target, log_path: str, kwargs: dict):
    """target(**kwargs) with this process's stdout and stderr appended to log_path."""
    from experiments.pipeline import StagePreempted

    os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    with open(log_path, "a", buffering=1) as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        try:
            return target(**kwargs)
        except StagePreempted as stopped:
            return _Preempted(stopped.result)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()


def run_in_processes(target, jobs: list[dict], *, workers: int, log_paths: list[str]) -> list:
    """[target(**job) for job in jobs], at most `workers` at a time, each in a spawned process whose output
    goes to its log path; results in job order.

    target must be a module-level function (it is pickled by name), and jobs and results picklable. When a
    job fails, the others still finish (their stages stay resumable), then the first failure is raised with
    its log path. A job whose trainer was preempted (SIGTERM) raises StagePreempted here, after the others.
    """
    from experiments.pipeline import StagePreempted, log

    if workers < 1:
        raise ValueError(f"run_in_processes: workers must be >= 1, got {workers}")
    if len(log_paths) != len(jobs):
        raise ValueError(f"run_in_processes: {len(jobs)} jobs but {len(log_paths)} log paths")
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context) as pool:
        futures = [pool.submit(_call_logged, target, path, job) for job, path in zip(jobs, log_paths)]
        for path in log_paths:
            log(f"worker log: {path}")
        outcomes = []
        for future, path in zip(futures, log_paths):
            try:
                outcomes.append(("ok", future.result()))
            except Exception as error:  # noqa: BLE001 (re-raised below, once every job has ended)
                outcomes.append(("error", (error, path)))
    results = []
    for kind, value in outcomes:
        if kind == "error":
            error, path = value
            raise RuntimeError(f"worker job failed ({type(error).__name__}: {error}); its log: {path}") from error
        results.append(value)
    for value in results:
        if isinstance(value, _Preempted):
            raise StagePreempted(value.result)
    return results
