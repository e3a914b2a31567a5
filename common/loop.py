"""The step loop every trainer runs (rm/train.py, sft/train.py, ppo/train.py), and the start of a run.

It owns what every such run must get right, in one place:
  * metrics are fetched from the device in groups (every `log_every` steps, before a save and at
    the end), not every step, so dispatch never stalls; each fetched loss is checked for NaN/Inf
    and the error names the step and the last good checkpoint;
  * checkpoints every `save_every` steps (the caller's CheckpointManager) except at the last step,
    which the caller saves with its final extras (or the loop, with LoopHooks.save_last);
  * periodic evaluation through the caller's `run_eval(step, state)`;
  * SIGTERM (PreemptionHandler): flush, force a checkpoint, and report `preempted`;
  * `LoopHooks`: what a trainer adds (PPO: per-step host metrics for its KL controller and
    samples, the controller's state in every checkpoint, its metric names and NaN checks).

And the start of every run (RM, SFT, PPO), in this order, before any data is read:
`start_run` checks the config (mesh against the devices, quant without LoRA, paths that must
exist, logging backends), compares it with the run being resumed (common/resume.py), and only
then writes config.json and provenance.json and turns on the compilation cache. After the
data is read, `RunStart.check_data` compares the data's identity with the checkpoint's.
`open_checkpoints` restores the newest intact checkpoint (damaged ones reported and moved
aside).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np

from common import resume, tracking
from common.checkpoint import CheckpointManager
from common.metrics import MetricsWriter, Progress, write_config_json
from common.run_utils import PreemptionHandler, check_finite
from common.throughput import progress_fields


def flat_data_stats(stats: dict) -> dict:
    """{'train': {'rows': 10, ...}, 'eval': None} -> {'data/train/rows': 10, ...} (numbers only), for metrics.jsonl."""
    return {
        f"data/{split}/{k}": v
        for split, s in stats.items()
        for k, v in (s or {}).items()
        if isinstance(v, (int, float))
    }


def _checkpoint_steps(workdir: str) -> list[int]:
    """Committed checkpoint steps under workdir/checkpoints, read from the folder names."""
    root = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(root):
        return []
    return sorted(
        int(n)
        for n in os.listdir(root)
        if n.isdigit() and os.path.exists(os.path.join(root, n, "_CHECKPOINT_METADATA"))
    )


PATH_KEYS = ("init_from", "tokenizer", "workdir")  # config fields naming folders that must exist


def preflight(config) -> None:
    """Checks what can be checked without reading data: raises ValueError / FileNotFoundError.

    The mesh against the visible devices, quant without LoRA, every `*.init_from`,
    `*.tokenizer`, `*.workdir` and `data.*_files` path, and the logging backends."""
    from common.mesh import make_mesh
    from common.run_utils import DATA_EXTENSIONS, looks_like_local_path

    if "mesh" in config:
        try:
            make_mesh(tuple(config.mesh.shape), tuple(config.mesh.axis_names))
        except ValueError as e:
            raise ValueError(f"config.mesh.shape={tuple(config.mesh.shape)}: {e}") from None
    for name, sec in config.items():
        if hasattr(sec, "keys") and "quant" in sec and "lora_rank" in sec:
            if sec.quant not in ("", "int8"):
                raise ValueError(f"config.{name}.quant={sec.quant!r}; expected '' or 'int8'")
            if sec.quant and sec.lora_rank <= 0:
                raise ValueError(
                    f"config.{name}.quant={sec.quant!r} needs config.{name}.lora_rank > 0: int8 is the "
                    "frozen base under LoRA (QLoRA); a fully fine-tuned model cannot have int8 weights"
                )
    for key, value in resume.flatten(resume.config_dict(config)).items():
        field = key.rsplit(".", 1)[-1]
        if not isinstance(value, str) or not value:
            continue
        if field in PATH_KEYS and (field != "tokenizer" or looks_like_local_path(value)):
            if not os.path.exists(value):
                raise FileNotFoundError(f"config.{key}={value!r}: {value} does not exist")
            if field == "init_from" and not os.path.exists(os.path.join(value, "config.json")):
                raise FileNotFoundError(
                    f"config.{key}={value!r}: {value} is not a Hugging Face model folder (no config.json in it)"
                )
        elif key.startswith("data.") and field.endswith("_files"):
            for path in (p.strip() for p in value.split(",") if p.strip()):
                local = looks_like_local_path(path) or os.path.splitext(path)[1].lower() in DATA_EXTENSIONS
                if local and not os.path.exists(path):
                    raise FileNotFoundError(f"config.{key}: {path} does not exist")
    tracking.check_logging(config)


@dataclasses.dataclass
class RunStart:
    """What `start_run` found: the workdir, the checkpoint step on disk (None: a fresh start), whether
    config/data changes are allowed, and the compilation cache folder."""

    workdir: str
    resume_step: int | None
    allow_change: bool
    compilation_cache: str | None

    def check_data(self, files, *, rows: int | None) -> dict:
        """The training data's identity (paths, sizes, SHA-256, rows), checked against the newest
        readable checkpoint's; returns it for the checkpoints' extra dict ('data')."""
        identity = resume.data_identity(files, rows=rows)
        if self.resume_step is None:
            return identity
        ckpt = CheckpointManager(os.path.join(self.workdir, "checkpoints"), save_every=1)
        try:
            for step in sorted(ckpt.all_steps(), reverse=True):
                try:
                    stored = ckpt.read_extra(step).get("data")
                except Exception:  # a damaged step: open_checkpoints reports it; try the next one
                    continue
                resume.check_data_identity(self.workdir, stored, identity, step=step, allow=self.allow_change)
                break
        finally:
            ckpt.close()
        return identity


def start_run(config, workdir: str) -> RunStart:
    """Preflight checks, the resume comparison, then config.json, provenance.json and the cache.

    Nothing is written to the workdir before the checks pass."""
    preflight(config)
    runtime = tracking.section(config, "runtime", tracking.RUNTIME_DEFAULTS)
    # --allow_config_change of experiments.run sets RLHF_ALLOW_CONFIG_CHANGE (it reaches sub-runs too).
    allow = bool(runtime["allow_config_change"]) or os.environ.get("RLHF_ALLOW_CONFIG_CHANGE", "") == "1"
    steps = _checkpoint_steps(workdir)
    resume_step = max(steps) if steps else None
    if resume_step is not None:
        resume.check_resume_config(workdir, config, step=resume_step, allow=allow)
    from common.distributed import is_main_process

    os.makedirs(workdir, exist_ok=True)
    if is_main_process():
        write_config_json(workdir, config)
        tracking.write_provenance(workdir)
    cache = tracking.setup_compilation_cache(config)
    return RunStart(workdir=workdir, resume_step=resume_step, allow_change=allow, compilation_cache=cache)


def open_checkpoints(workdir: str, template: Any, *, save_every: int, keep: int, config=None):
    """The run's CheckpointManager (workdir/checkpoints) and where to start from.

    Returns (ckpt, tree, extra, start_step): with a checkpoint on disk, `tree` is the newest
    intact one restored into `template`'s structure and shardings (damaged newer ones are
    reported in one line each and moved to checkpoints_damaged/), `extra` its bookkeeping
    dict and start_step its step; otherwise `template` itself, {} and 0. `config`'s
    runtime.async_checkpointing turns on Orbax's background saves."""
    runtime = tracking.section(config, "runtime", tracking.RUNTIME_DEFAULTS)
    ckpt = CheckpointManager(
        os.path.join(workdir, "checkpoints"),
        save_every=save_every,
        max_to_keep=keep,
        async_save=bool(runtime["async_checkpointing"]),
    )
    step, tree, extra = ckpt.restore_newest_intact(template, report=lambda line: print(line, flush=True))
    if step is None:
        return ckpt, template, {}, 0
    start_step = int(extra["step"])
    print(f"Resuming from checkpoint at step {start_step} in {workdir}/checkpoints", flush=True)
    return ckpt, tree, extra, start_step


@dataclasses.dataclass
class LoopResult:
    state: Any
    step: int
    preempted: bool
    last_metrics: dict  # the last metrics line the loop wrote ({} when no step ran)


@dataclasses.dataclass
class LoopHooks:
    """What a trainer adds to the shared step loop (PPO: its KL controller, samples and naming).

    on_step(step, state, metrics): after every step, with that step's metrics fetched to the host
      (given, the loop fetches and checks them every step instead of in groups, and writes a
      metrics line at log steps and the last step only).
    checkpoint_extra(): bookkeeping saved in every checkpoint's extra dict (e.g. {'kl': state}).
    """

    on_step: Callable[[int, Any, dict], None] | None = None
    checkpoint_extra: Callable[[], dict] | None = None
    metrics_prefix: str = "train/"  # metrics are written as prefix + key
    reduce: str = "mean"  # a logged group of steps is written as their 'mean' or the 'last' step's values
    finite_keys: tuple[str, ...] = ("loss",)  # metrics that must be finite (NaN/Inf stops the run)
    save_last: bool = False  # True: the loop saves the last step itself (force); False: the caller does


def run_train_loop(
    *,
    step_fn: Callable[[Any, Any], tuple[Any, dict]],
    state: Any,
    batches: Iterator[Any],
    start_step: int,
    total_steps: int,
    ckpt,
    metrics_writer: MetricsWriter,
    workdir: str,
    log_every: int,
    eval_every: int,
    run_eval: Callable[[int, Any], Any],
    to_save: Callable[[Any], Any] = lambda s: s,
    desc: str = "train",
    progress_keys: tuple[str, ...] | dict[str, str] = ("loss", "accuracy"),
    extra: dict | None = None,
    hooks: LoopHooks | None = None,
    throughput=None,
) -> LoopResult:
    """Runs steps start_step+1 .. total_steps. `batches` yields ready (sharded) batches; `step_fn`
    is the jitted `(state, batch) -> (state, device metrics)` with at least 'loss'. Metrics are
    written as 'train/<key>' averages over the fetched group. `to_save(state)` is the checkpoint
    tree; `extra` (e.g. {'data': identity}) goes into every checkpoint's extra dict besides 'step'.
    `progress_keys` are shown on the progress bar (a dict maps shown names to metric keys);
    `hooks` (LoopHooks) adapt the loop to a trainer (PPO). `throughput` (common/throughput.py Meter)
    adds perf/ fields (real tokens/s, step time, MFU) to each metrics line and the progress bar
    (a trainer whose step metrics carry perf/ fields itself, as PPO's, passes none). Returns the final state and step,
    whether a SIGTERM stopped the run, and the last metrics written."""
    hooks = hooks or LoopHooks()
    prefix = hooks.metrics_prefix
    shown_keys = progress_keys if isinstance(progress_keys, dict) else {k: k for k in progress_keys}
    last_saved = ckpt.latest_step()
    base_extra = dict(extra or {})
    pending = []  # metrics not yet written (device arrays, or host values with hooks.on_step)

    def checkpoint_extra(step):
        return dict(base_extra, **(hooks.checkpoint_extra() if hooks.checkpoint_extra else {}), step=step)

    def check(fetched, step):
        for i, m in enumerate(fetched):
            for key in hooks.finite_keys:
                check_finite(
                    m[key],
                    step=step - len(fetched) + i + 1,
                    name=prefix + key,
                    workdir=workdir,
                    last_checkpoint_step=last_saved,
                )

    def flush(step):
        nonlocal pending
        if not pending:
            return {}
        fetched = jax.device_get(pending)
        if hooks.on_step is None:  # with on_step every step was checked when it was fetched
            check(fetched, step)
        if hooks.reduce == "last":
            line = {prefix + k: v for k, v in fetched[-1].items()}
        else:
            line = {prefix + k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
        if throughput is not None:
            line.update(throughput.fields(step, fetched))
        metrics_writer.write(step, line)
        pending = []
        return line

    progress = Progress(total_steps, initial=start_step, desc=desc)
    step, shown, preempted, last = start_step, start_step, False, {}
    with PreemptionHandler() as preemption:
        while step < total_steps:
            state, m = step_fn(state, next(batches))
            step += 1
            if throughput is not None and step == start_step + 1:
                jax.block_until_ready(m)  # the first step carries the compilation: rates start after it
                throughput.mark(step)
            if hooks.on_step is not None:
                m = jax.device_get(m)
                check([m], step)
                hooks.on_step(step, state, m)
            pending.append(m)
            is_last = step == total_steps
            # Without on_step a group is also fetched (and checked) before a save, so a NaN never
            # reaches a checkpoint; with on_step every step was checked already.
            if step % log_every == 0 or is_last or (hooks.on_step is None and ckpt.should_save(step)):
                last = flush(step)
                shown_values = {name: last[prefix + key] for name, key in shown_keys.items()}
                progress.update(step - shown, **shown_values, **progress_fields(last))
                shown = step
            if eval_every and step % eval_every == 0 and not is_last:
                run_eval(step, state)
            if (not is_last or hooks.save_last) and ckpt.save(
                step, to_save(state), checkpoint_extra(step), force=is_last and hooks.save_last
            ):
                last_saved = step
            if preemption.sync_requested():
                if hooks.on_step is None:
                    flush(step)
                ckpt.save(step, to_save(state), checkpoint_extra(step), force=True)
                preempted = True
                break
    progress.close()
    if preempted:
        print(f"SIGTERM: saved a checkpoint at step {step}; re-run the same command to resume.", flush=True)
    return LoopResult(state=state, step=step, preempted=preempted, last_metrics=last)
