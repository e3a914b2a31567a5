"""Keeping long runs safe: graceful preemption and early NaN detection.

with PreemptionHandler() as preemption:
  for step in range(start, total):
    state, metrics = train_step(state, batch, rng)
    check_finite(metrics['loss'], step=step, name='train/loss', workdir=workdir,
                 last_checkpoint_step=ckpt.latest_step())
    ckpt.save(step + 1, state, extra)
    if preemption.sync_requested():
      ckpt.save(step + 1, state, extra, force=True)
      break
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

import numpy as np

__all__ = [
    "PreemptionHandler",
    "check_finite",
    "EXIT_OK",
    "EXIT_ERROR",
    "EXIT_USER_ERROR",
    "EXIT_DIVERGED",
    "EXIT_PREEMPTED",
    "USER_ERRORS",
    "debug_enabled",
    "exit_on_user_error",
]

# Exit codes of `python -m experiments.run` (and of the rm/ppo/sft CLIs):
EXIT_OK = 0  # finished
EXIT_ERROR = 1  # an unexpected error (a bug): Python's traceback is printed
EXIT_USER_ERROR = 2  # a setting, file, row or workdir the user can fix: one line, no traceback
EXIT_DIVERGED = 3  # NaN/Inf loss: stopped, the last good checkpoint is kept
EXIT_PREEMPTED = 75  # SIGTERM: a checkpoint was saved, the run is NOT finished; re-run to resume
# (75 = EX_TEMPFAIL, "try again": schedulers and experiments.sweep requeue it)

# What a user can cause and fix: bad settings, paths, files, rows, workdirs.
USER_ERRORS = (
    ValueError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    ModuleNotFoundError,
)


def looks_like_local_path(path) -> bool:
    """True for what can only be a filesystem path (absolute, ./, ~, or more than one '/');
    'org/name' could be a hub name."""
    path = os.fspath(path)
    return os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1


DATA_EXTENSIONS = (".jsonl", ".json", ".parquet")  # local data files (rm/data.py reads these)


def debug_enabled() -> bool:
    """True when tracebacks are wanted: `--debug` (sets RLHF_DEBUG=1) or RLHF_DEBUG=1 in the environment."""
    return os.environ.get("RLHF_DEBUG", "") not in ("", "0", "false", "False")


class exit_on_user_error:
    """Context manager for CLIs: a user error prints `PROG: error: message` and exits 2 (3 for a
    diverged loss) instead of a traceback; with RLHF_DEBUG=1 the exception propagates."""

    def __init__(self, prog: str):
        self.prog = prog

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or debug_enabled():
            return False
        if isinstance(exc, FloatingPointError):
            code = EXIT_DIVERGED
        elif isinstance(exc, USER_ERRORS):
            code = EXIT_USER_ERROR
        else:
            from common.checkpoint import NoIntactCheckpoint

            if not isinstance(exc, NoIntactCheckpoint):
                return False  # a bug: keep the traceback
            code = EXIT_USER_ERROR
        import sys

        message = " ".join(str(exc).split("\n")) or type(exc).__name__
        print(
            f"{self.prog}: error: {message}\n(set RLHF_DEBUG=1 or pass --debug for the traceback)",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(code)


class PreemptionHandler:
    """Context manager that turns SIGTERM into a flag instead of death.

    Cluster schedulers send SIGTERM shortly before killing a job. Inside the
    `with` block the signal only sets `.requested = True`; the training loop
    checks it, saves a checkpoint and returns. The previous handler is restored
    on exit. Outside the main thread Python cannot install signal handlers, so
    the handler then does nothing (and logs a warning).

    Args:
      signals: which signals to catch (default: SIGTERM only, so Ctrl-C still
        interrupts).
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.signals = tuple(signals)
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        del frame
        logging.warning("Received signal %d: will checkpoint and stop after this step.", signum)
        self.requested = True

    def __enter__(self) -> PreemptionHandler:
        if threading.current_thread() is not threading.main_thread():
            logging.warning("PreemptionHandler: not in the main thread; signals are not caught.")
            return self
        for signum in self.signals:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            # getsignal() returns None for handlers not installed from Python;
            # SIG_DFL is the closest thing we can put back.
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def sync_requested(self) -> bool:
        """`.requested` agreed across processes: True if any process got the signal.

        In a multi-process run all processes must stop at the same step (a
        checkpoint save is collective), so use this rather than `.requested`.
        It costs a tiny all-gather per call when there are several processes.
        """
        import jax  # Local: keeps this module importable without initialising JAX.

        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        flags = multihost_utils.process_allgather(np.asarray(self.requested, np.int32))
        return bool(np.any(flags))


def check_finite(
    value: Any,
    *,
    step: int,
    name: str,
    workdir: str | os.PathLike | None = None,
    last_checkpoint_step: int | None = None,
) -> Any:
    """Raises FloatingPointError if `value` (scalar or array) has NaN or inf.

    Call it on the loss (or grad norm) every few steps so a diverged run stops
    early instead of writing NaN checkpoints. Returns `value` unchanged.

    Args:
      value: a number or array (fetched to host).
      step: training step that produced it.
      name: what it is, e.g. 'train/loss'.
      workdir: the run directory, named in the message.
      last_checkpoint_step: the newest checkpoint's step, named in the message
        as the state to resume from.
    """
    array = np.asarray(value, dtype=np.float64)
    if np.all(np.isfinite(array)):
        return value
    shown = (
        array.item()
        if array.size == 1
        else (f"array of shape {array.shape} with {int(np.sum(~np.isfinite(array)))} non-finite entries")
    )
    message = f"{name} is {shown} at step {step}, not a finite number."
    checkpoints = os.path.join(os.fspath(workdir), "checkpoints") if workdir else "the checkpoint directory"
    if last_checkpoint_step is not None:
        message += (
            f" The last good checkpoint (step {last_checkpoint_step}) in {checkpoints} "
            "is kept; lower the learning rate or fix the data, then re-run the same "
            "command to resume from it."
        )
    else:
        message += f" No checkpoint has been written yet to {checkpoints}."
    raise FloatingPointError(message)
