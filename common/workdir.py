"""Workdir I/O every trainer and exporter shares: model_config.json, tokenizer/, params + frozen, JSON files.

A trainer's workdir holds what a loader needs to rebuild its model without the run's config:
  model_config.json   the TransformerConfig fields (LoRA / int8 settings included)
  tokenizer/          the tokenizer files
  checkpoints/        Orbax steps; 'params' holds the trained tree, 'frozen' (LoRA runs) the frozen base
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from typing import Any, Optional

from common.checkpoint import CheckpointManager
from common.distributed import is_main_process
from models.lora import combine_params
from models.transformer import TransformerConfig

__all__ = [
    "write_json",
    "write_jsonl",
    "append_jsonl",
    "save_model_config",
    "load_model_config",
    "save_model_files",
    "restore_params",
]

MODEL_CONFIG_FILE = "model_config.json"


def write_json(path: str, obj: Any) -> None:
    """Writes obj as indented, key-sorted JSON, on the main process only (multi-process runs have one writer)."""
    if not is_main_process():
        return
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)


def write_jsonl(path: str, records: Iterable[dict]) -> None:
    """Writes one JSON object a line to `path` (made with its folder), replacing what was there."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(rec) + "\n" for rec in records)


def append_jsonl(path: str, records: Iterable[dict]) -> None:
    """Appends one JSON object a line to `path`."""
    with open(path, "a") as f:
        f.writelines(json.dumps(rec) + "\n" for rec in records)


def save_model_config(workdir: str, config: TransformerConfig) -> None:
    """workdir/model_config.json: every TransformerConfig field, so loaders rebuild the same tree."""
    with open(os.path.join(workdir, MODEL_CONFIG_FILE), "w") as f:
        json.dump(dataclasses.asdict(config), f, indent=2)


def load_model_config(workdir: str, **overrides) -> TransformerConfig:
    """The TransformerConfig of workdir/model_config.json, with `overrides` (e.g. dtype) applied."""
    path = os.path.join(workdir, MODEL_CONFIG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: {workdir} is not a workdir written by a trainer")
    with open(path) as f:
        fields = json.load(f)
    if fields.get("rope_scaling") is not None:
        fields["rope_scaling"] = tuple(tuple(x) for x in fields["rope_scaling"])
    fields.update(overrides)
    return TransformerConfig(**fields)


def save_model_files(workdir: str, config: TransformerConfig, tokenizer) -> None:
    """model_config.json and tokenizer/ of a trainer's workdir (main process only)."""
    if is_main_process():
        save_model_config(workdir, config)
        tokenizer.save_pretrained(os.path.join(workdir, "tokenizer"))


def restore_params(
    workdir: str,
    *,
    step: Optional[int] = None,
    template: Any = None,
    frozen_template: Any = None,
    nothing: str = "",
) -> tuple[dict, dict]:
    """(params, extra) of a checkpoint of workdir/checkpoints (default: the latest step).

    A LoRA run checkpoints the trained half under 'params' and the frozen base under 'frozen';
    the result is their union. `template` / `frozen_template` give the trees' structure (None:
    read it from the checkpoint; a frozen_template of {} means there is no frozen tree).
    `nothing` is added to the error when the workdir holds no checkpoint.
    """
    ckpt = CheckpointManager(os.path.join(workdir, "checkpoints"), save_every=1)
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints{nothing}")
        params, extra = ckpt.restore_subtree("params", step=step, template=template)
        frozen = {}
        if frozen_template is None:
            try:
                frozen, _ = ckpt.restore_subtree("frozen", step=step)
            except KeyError:  # full fine-tuning: everything trained, nothing frozen
                frozen = {}
        elif frozen_template:
            frozen, _ = ckpt.restore_subtree("frozen", step=step, template=frozen_template)
    finally:
        ckpt.close()
    return (combine_params(params, frozen) if frozen else params), extra
