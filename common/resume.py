"""Resume safety: a re-run of a workdir must continue the same experiment, or say why not.

Two things are compared when a workdir already holds a checkpoint:

* the config (workdir/config.json, written at the first start, against the new one, key by
  key). Keys in RESUME_MUTABLE may change: they set how long and how visibly a run goes
  (steps, log/eval/save intervals, extra eval files, logging, runtime and mesh settings),
  not what is being trained. Any other difference stops the run with one line naming each
  key with its old and new value, unless `--allow_config_change` (or
  `runtime.allow_config_change=True`) says to go on.
* the training data's identity, stored in every checkpoint's extra dict under 'data': each
  file's absolute path, size and SHA-256 and the total row count. A change is an error like
  a config change (e.g. a training file rewritten in place between two attempts).

Every accepted change, allowed or forced, is appended to workdir/config_history.jsonl as
`{"step": N, "time": ..., "changes": {key: {"old": ..., "new": ...}}, "forced": [...]}`.
"""

from __future__ import annotations

import datetime
import fnmatch
import hashlib
import json
import os
from collections.abc import Iterable
from typing import Any

__all__ = [
    "RESUME_MUTABLE",
    "ConfigChanged",
    "config_dict",
    "flatten",
    "config_changes",
    "check_resume_config",
    "data_identity",
    "check_data_identity",
    "record_history",
    "HISTORY_FILE",
]

HISTORY_FILE = "config_history.jsonl"

# Config keys (glob patterns) that may differ between the first start and a resume.
RESUME_MUTABLE = (
    "train.steps",  # run longer (or stop earlier); the step count is in the checkpoint
    "train.log_every",
    "train.eval_every",
    "train.save_every",
    "train.keep_checkpoints",
    "train.samples_every",
    "train.num_samples",  # PPO: how many samples are written, how often
    "data.eval_files",  # extra / other held-out files: evaluation only
    "eval.batch_size",
    "eval.at_start",
    "logging.*",
    "runtime.*",  # TensorBoard / W&B, compilation cache, async saves, this very switch
    "mesh.*",
    "distributed.*",  # how the same computation is laid out on devices and processes
    "model.remat",
    "model.remat_policy",
    "policy.remat",
    "policy.remat_policy",  # memory vs compute only
    "export.*",  # what is written after training
)


class ConfigChanged(ValueError):
    """The new config or data differs from the run being resumed in keys that may not change."""


def config_dict(config) -> dict:
    """A ConfigDict (or dict) as plain JSON values (tuples become lists)."""
    if hasattr(config, "to_json_best_effort"):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(config, default=str))


def flatten(tree: Any, prefix: str = "") -> dict:
    """{'train': {'steps': 5}} -> {'train.steps': 5}."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


def is_mutable(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in RESUME_MUTABLE)


def config_changes(old: dict, new: dict) -> dict:
    """{key: {'old': a, 'new': b}} for every flat key whose value differs (absent = None)."""
    old_flat, new_flat = flatten(old), flatten(new)
    return {
        k: {"old": old_flat.get(k), "new": new_flat.get(k)}
        for k in sorted(set(old_flat) | set(new_flat))
        if old_flat.get(k) != new_flat.get(k)
    }


def _shown(changes: dict) -> str:
    return "; ".join(f"{k}: {json.dumps(v['old'])} -> {json.dumps(v['new'])}" for k, v in changes.items())


def record_history(workdir: str, step: int, changes: dict, forced: Iterable[str] = ()) -> None:
    """Appends one line to workdir/config_history.jsonl (process 0 only)."""
    import jax

    if jax.process_index() != 0 or not changes:
        return
    record = {
        "step": int(step),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "changes": changes,
        "forced": sorted(forced),
    }
    with open(os.path.join(workdir, HISTORY_FILE), "a") as f:
        f.write(json.dumps(record, default=str) + "\n")


def check_resume_config(workdir: str, config, *, step: int, allow: bool) -> dict:
    """Compares `config` with workdir/config.json before resuming from checkpoint `step`.

    Returns the changes (recorded in config_history.jsonl). Raises ConfigChanged naming every
    changed key outside RESUME_MUTABLE with both values, unless `allow`.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            old = json.load(f)
    except json.JSONDecodeError:
        return {}  # a torn file from a killed first start: nothing trustworthy to compare with
    changes = config_changes(old, config_dict(config))
    refused = {k: v for k, v in changes.items() if not is_mutable(k)}
    if refused and not allow:
        raise ConfigChanged(
            f"{workdir} holds a run (checkpoint at step {step}) started with a different config: {_shown(refused)}. "
            f"Resuming would mix two experiments; use a new --workdir, or pass --allow_config_change "
            f"(--config.runtime.allow_config_change=True) to continue with the new values (recorded in "
            f"{HISTORY_FILE}). Keys that may change on resume: {', '.join(RESUME_MUTABLE)}"
        )
    record_history(workdir, step, changes, forced=refused)
    return changes


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def data_identity(files: Iterable[str], *, rows: int | None) -> dict:
    """{'files': [{'path', 'size', 'sha256'} or {'name'} for hub datasets], 'rows': N}."""
    entries = []
    for source in files:
        source = os.fspath(source)
        if os.path.isfile(source):
            entries.append(
                {"path": os.path.abspath(source), "size": os.path.getsize(source), "sha256": _sha256(source)}
            )
        else:
            entries.append({"name": source})
    return {"files": entries, "rows": None if rows is None else int(rows)}


def check_data_identity(workdir: str, stored: dict | None, current: dict, *, step: int, allow: bool) -> dict:
    """Compares the training data's identity with the one stored in checkpoint `step`.

    Returns the differences (recorded in config_history.jsonl as 'data.*' keys); raises
    ConfigChanged unless `allow`. A checkpoint without a stored identity (older runs) passes.
    """
    if not stored:
        return {}
    changes = {}
    old_files, new_files = stored.get("files", []), current.get("files", [])
    if len(old_files) != len(new_files):
        changes["data.identity.files"] = {
            "old": [f.get("path", f.get("name")) for f in old_files],
            "new": [f.get("path", f.get("name")) for f in new_files],
        }
    for i, (old, new) in enumerate(zip(old_files, new_files)):
        for field in ("path", "name", "size", "sha256"):
            if old.get(field) != new.get(field):
                changes[f"data.identity.files[{i}].{field}"] = {"old": old.get(field), "new": new.get(field)}
    if stored.get("rows") != current.get("rows"):
        changes["data.identity.rows"] = {"old": stored.get("rows"), "new": current.get("rows")}
    if changes and not allow:
        raise ConfigChanged(
            f"the training data differs from the data of the run in {workdir} (checkpoint at step {step}): "
            f"{_shown(changes)}. Use a new --workdir, or pass --allow_config_change to continue on the new data "
            f"(recorded in {HISTORY_FILE})"
        )
    record_history(workdir, step, changes, forced=changes)
    return changes
