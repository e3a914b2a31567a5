"""Run outputs people read: metrics.jsonl, config.json and a progress bar.

`metrics.jsonl` holds one JSON object per line, `{"step": 12, "train/loss": 0.69,
...}`, with flat '/'-separated keys (nested dicts passed to `write` are
flattened). Read it back with `read_metrics`, or with pandas:
`pd.read_json(path, lines=True)`.

Only process 0 writes; other processes get no-op writers, so trainers call these
unconditionally.
"""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

__all__ = ["MetricsWriter", "write_config_json", "read_metrics", "Progress"]

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"


def _is_main_process() -> bool:
    return jax.process_index() == 0


def _to_python(key: str, value: Any) -> Any:
    """Converts one metric value to a JSON-friendly Python scalar."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (str, type(None))):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        array = np.asarray(jax.device_get(value))
        if array.size != 1:
            raise TypeError(
                f"Metric {key!r} must be a scalar, got an array of shape {array.shape}; "
                "reduce it (mean/sum) before logging."
            )
        item = array.reshape(()).item()
        return bool(item) if array.dtype == np.bool_ else item
    raise TypeError(
        f"Metric {key!r} has unsupported type {type(value).__name__}; "
        "expected a number, a scalar array, a string or None."
    )


def _flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, prefix=f"{name}/"))
        else:
            flat[name] = _to_python(name, value)
    return flat


def _read_lines(path: str) -> list[dict[str, Any]]:
    """Parses a metrics file, skipping a torn last line left by a killed run."""
    records = []
    with open(path) as f:
        lines = f.read().splitlines()
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if line_number == len(lines):
                break  # A process killed mid-write leaves a partial final line.
            raise ValueError(f"{path}:{line_number}: not a JSON object ({e}).") from e
    return records


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Reads a metrics.jsonl file (or a workdir containing one) into a list of dicts."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    return _read_lines(path)


class MetricsWriter:
    """Appends one JSON line per `write(step, metrics)` to `workdir/metrics.jsonl`.

    Args:
      workdir: run directory (created if missing).
      resume_step: when given, the file is first rewritten keeping only lines
        with `step <= resume_step`, so steps re-run after a resume are not
        duplicated. Pass the restored checkpoint's step, or -1 for a fresh run
        that should discard lines from an earlier attempt that never
        checkpointed. None appends to the file as is.

    Each line is flushed as it is written, so the file is readable while the run
    goes on. NaN/inf are written as JSON's NaN/Infinity extensions, which Python's
    json and pandas read back.
    """

    def __init__(self, workdir: str | os.PathLike, *, resume_step: int | None = None, sinks: tuple | list = ()):
        self.path = os.path.join(os.fspath(workdir), METRICS_FILE)
        self._file = None
        # Other destinations (TensorBoard, W&B: common/tracking.py) get every record as written here.
        self._sinks = list(sinks)
        if not _is_main_process():
            return
        os.makedirs(os.fspath(workdir), exist_ok=True)
        if resume_step is not None and os.path.exists(self.path):
            kept = [
                r for r in _read_lines(self.path) if isinstance(r.get("step"), int) and r["step"] <= int(resume_step)
            ]
            # Write-then-rename so a crash here never loses the kept lines.
            tmp_path = self.path + ".tmp"
            with open(tmp_path, "w") as f:
                for record in kept:
                    f.write(json.dumps(record) + "\n")
            os.replace(tmp_path, self.path)
        self._file = open(self.path, "a")

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Writes `{"step": step, **flatten(metrics)}` as one line."""
        if self._file is None:
            return
        flat = _flatten(metrics)
        if "step" in flat:
            raise ValueError("MetricsWriter.write: 'step' is reserved; pass it as the first argument, not as a metric.")
        record = {"step": int(step), **flat}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for sink in self._sinks:
            sink.write(int(step), flat)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        for sink in self._sinks:
            sink.close()
        self._sinks = []

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_config_json(workdir: str | os.PathLike, config: Any) -> str | None:
    """Writes the run's config to `workdir/config.json` (process 0 only).

    Args:
      workdir: run directory (created if missing).
      config: an ml_collections ConfigDict (anything JSON-unfriendly is written
        best-effort as a string) or a plain dict.

    Returns:
      The path written, or None on processes other than 0.
    """
    if not _is_main_process():
        return None
    os.makedirs(os.fspath(workdir), exist_ok=True)
    path = os.path.join(os.fspath(workdir), CONFIG_FILE)
    if hasattr(config, "to_json_best_effort"):
        text = config.to_json_best_effort(indent=2, sort_keys=True)
    else:
        text = json.dumps(config, indent=2, sort_keys=True, default=str)
    with open(path, "w") as f:
        f.write(text + "\n")
    return path


class Progress:
    """A thin tqdm progress bar, silent on processes other than 0.

    Example::

      bar = Progress(total_steps, initial=start_step, desc='rm')
      for step in range(start_step, total_steps):
        ...
        bar.update(loss=float(loss), acc=float(acc))
      bar.close()
    """

    def __init__(self, total: int, *, initial: int = 0, desc: str | None = None):
        from tqdm.auto import tqdm  # Local import: only trainers need tqdm.

        self._bar = tqdm(total=total, initial=initial, desc=desc, disable=not _is_main_process(), dynamic_ncols=True)

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Advances by `n` steps; keyword values are shown after the bar."""
        if postfix:
            shown = {}
            for key, value in postfix.items():
                value = _to_python(key, value)
                shown[key] = f"{value:.4g}" if isinstance(value, float) else value
            self._bar.set_postfix(shown, refresh=False)
        self._bar.update(n)

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
