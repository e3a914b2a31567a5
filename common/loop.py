"""The step loop shared by the supervised trainers (rm/train.py, sft/train.py).

It owns what every such run must get right, in one place:
  * metrics are fetched from the device in groups (every `log_every` steps, before a save and at
    the end), not every step, so dispatch never stalls; each fetched loss is checked for NaN/Inf
    and the error names the step and the last good checkpoint;
  * checkpoints every `save_every` steps (the caller's CheckpointManager) except at the last step,
    which the caller saves with its final extras;
  * periodic evaluation through the caller's `run_eval(step, state)`;
  * SIGTERM (PreemptionHandler): flush, force a checkpoint, and report `preempted`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Iterator

import jax
import numpy as np

from common.checkpoint import CheckpointManager
from common.metrics import MetricsWriter, Progress
from common.run_utils import PreemptionHandler, check_finite


def write_json(path: str, obj: Any) -> None:
    """Writes obj as indented, key-sorted JSON, on the main process only (multi-process runs have one writer)."""
    from common.distributed import is_main_process
    if not is_main_process():
        return
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)


def flat_data_stats(stats: dict) -> dict:
    """{'train': {'rows': 10, ...}, 'eval': None} -> {'data/train/rows': 10, ...} (numbers only), for metrics.jsonl."""
    return {f"data/{split}/{k}": v for split, s in stats.items() for k, v in (s or {}).items()
            if isinstance(v, (int, float))}


def open_checkpoints(workdir: str, template: Any, *, save_every: int, keep: int):
    """The run's CheckpointManager (workdir/checkpoints) and where to start from.

    Returns (ckpt, tree, extra, start_step): with a checkpoint on disk, `tree` is the latest one
    restored into `template`'s structure and shardings, `extra` its bookkeeping dict and
    start_step its step; otherwise `template` itself, {} and 0."""
    ckpt = CheckpointManager(os.path.join(workdir, "checkpoints"), save_every=save_every, max_to_keep=keep)
    if ckpt.latest_step() is None:
        return ckpt, template, {}, 0
    tree, extra = ckpt.restore(template)
    start_step = int(extra["step"])
    print(f"Resuming from checkpoint at step {start_step} in {workdir}/checkpoints", flush=True)
    return ckpt, tree, extra, start_step


@dataclasses.dataclass
class LoopResult:
    state: Any
    step: int
    preempted: bool
    last_train_metrics: dict


def run_train_loop(*, step_fn: Callable[[Any, Any], tuple[Any, dict]], state: Any, batches: Iterator[Any],
                   start_step: int, total_steps: int, ckpt, metrics_writer: MetricsWriter, workdir: str,
                   log_every: int, eval_every: int, run_eval: Callable[[int, Any], Any],
                   to_save: Callable[[Any], Any] = lambda s: s, desc: str = "train",
                   progress_keys: tuple[str, ...] = ("loss", "accuracy")) -> LoopResult:
    """Runs steps start_step+1 .. total_steps. `batches` yields ready (sharded) batches; `step_fn`
    is the jitted `(state, batch) -> (state, device metrics)` with at least 'loss'. Metrics are
    written as 'train/<key>' averages over the fetched group. `to_save(state)` is the checkpoint
    tree. Returns the final state and step, and whether a SIGTERM stopped the run."""
    last_saved = ckpt.latest_step()
    pending = []  # device metrics not yet fetched

    def flush(step):
        nonlocal pending
        if not pending:
            return {}
        fetched = jax.device_get(pending)
        for i, m in enumerate(fetched):
            check_finite(m["loss"], step=step - len(fetched) + i + 1, name="train/loss", workdir=workdir,
                         last_checkpoint_step=last_saved)
        avg = {f"train/{k}": float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
        metrics_writer.write(step, avg)
        pending = []
        return avg

    progress = Progress(total_steps, initial=start_step, desc=desc)
    step, shown, preempted, last = start_step, start_step, False, {}
    with PreemptionHandler() as preemption:
        while step < total_steps:
            state, m = step_fn(state, next(batches))
            pending.append(m)
            step += 1
            is_last = step == total_steps
            if step % log_every == 0 or is_last or ckpt.should_save(step):
                last = flush(step)
                progress.update(step - shown, **{k: last[f"train/{k}"] for k in progress_keys})
                shown = step
            if eval_every and step % eval_every == 0 and not is_last:
                run_eval(step, state)
            if not is_last and ckpt.save(step, to_save(state), {"step": step}):
                last_saved = step
            if preemption.sync_requested():
                flush(step)
                ckpt.save(step, to_save(state), {"step": step}, force=True)
                preempted = True
                break
    progress.close()
    if preempted:
        print(f"SIGTERM: saved a checkpoint at step {step}; re-run the same command to resume.", flush=True)
    return LoopResult(state=state, step=step, preempted=preempted, last_train_metrics=last)
