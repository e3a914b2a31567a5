"""Workdir I/O every trainer and exporter shares: model_config.json, tokenizer/, params + frozen, JSON files.

A trainer's workdir holds what a loader needs to rebuild its model without the run's config:
  model_config.json   the TransformerConfig fields (LoRA / int8 settings included)
  tokenizer/          the tokenizer files
  checkpoints/        Orbax steps; 'params' holds the trained tree, 'frozen' (LoRA runs) the frozen base

`restore_params_stacked` reads a checkpoint saved per layer straight into the stacked layout of a
scan_layers run (models/scan.py), one layer at a time. Both restore onto a mesh when given one: every
array goes straight onto its NamedSharding (models/sharding.py rules), each device reading its shard.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Iterable
from typing import Any, Optional

import jax
import jax.numpy as jnp

from common.checkpoint import CheckpointManager, default_sharding
from common.distributed import is_main_process
from models.lora import combine_params
from models.scan import STACKED, layer_groups, stack_layers, transformer_tree_paths
from models.sharding import DEFAULT_RULES, with_shardings
from models.transformer import TransformerConfig

__all__ = [
    "write_json",
    "write_jsonl",
    "append_jsonl",
    "save_model_config",
    "load_model_config",
    "save_model_files",
    "restore_params",
    "restore_params_stacked",
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
    mesh=None,
    rules=None,
) -> tuple[dict, dict]:
    """(params, extra) of a checkpoint of workdir/checkpoints (default: the latest step).

    A LoRA run checkpoints the trained half under 'params' and the frozen base under 'frozen';
    the result is their union. `template` / `frozen_template` give the trees' structure (None:
    read it from the checkpoint; a frozen_template of {} means there is no frozen tree); leaves
    that carry a sharding restore onto it. mesh (+ rules, default DEFAULT_RULES): every array
    restores straight onto its NamedSharding by the rules (each device reads only its shard).
    Without either, arrays land on the default device. `nothing` is added to the error when
    the workdir holds no checkpoint.
    """
    ckpt = CheckpointManager(os.path.join(workdir, "checkpoints"), save_every=1)
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints{nothing}")

        def placed(key, tree):  # the restore template of state[key]: on the mesh when given one
            if mesh is None:
                return tree
            return with_shardings(ckpt.abstract_subtree(key, step) if tree is None else tree, mesh, _rules(rules))

        params, extra = ckpt.restore_subtree("params", step=step, template=placed("params", template))
        frozen = {}
        if frozen_template is None:
            try:
                frozen, _ = ckpt.restore_subtree("frozen", step=step, template=placed("frozen", None))
            except KeyError:  # full fine-tuning: everything trained, nothing frozen
                frozen = {}
        elif frozen_template:
            frozen, _ = ckpt.restore_subtree("frozen", step=step, template=placed("frozen", frozen_template))
    finally:
        ckpt.close()
    return (combine_params(params, frozen) if frozen else params), extra


def _rules(rules):
    return DEFAULT_RULES if rules is None else rules


# ----------------------------------------------------------------------------- per-layer checkpoint -> stacked


def _abstract_stack(leaves):
    """stack_layers' stack function on abstract leaves: the [G, ...] ShapeDtypeStruct of G layers' leaves."""
    return jax.ShapeDtypeStruct((len(leaves), *leaves[0].shape), leaves[0].dtype)


def _write_layer(stacks, layer, g):
    """`stacks` (trees of [G, ...] arrays) with entry g set to `layer` (the same trees of [...] arrays)."""
    return jax.tree.map(lambda s, x: jax.lax.dynamic_update_index_in_dim(s, x.astype(s.dtype), g, 0), stacks, layer)


def _layer_writer(out_shardings):
    """`_write_layer` jitted with the stacks donated and `out_shardings` (their shardings: a tuple of
    trees) as the output's: the update happens in place, each device writing its own shard."""
    leaves, treedef = jax.tree.flatten(out_shardings)
    return _cached_layer_writer(treedef, tuple(leaves))


@functools.lru_cache(maxsize=64)
def _cached_layer_writer(treedef, leaves):
    return jax.jit(_write_layer, donate_argnums=0, out_shardings=jax.tree.unflatten(treedef, list(leaves)))


def _get(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _nest(path, value):
    for key in reversed(path):
        value = {key: value}
    return value


def _without(tree, path, key):
    """Copy of `tree` without tree[path][key]; dicts left empty are dropped (Orbax restores leaves)."""
    if not path:
        out = {k: v for k, v in tree.items() if k != key}
    else:
        out = dict(tree)
        out[path[0]] = _without(tree[path[0]], path[1:], key)
    return {k: v for k, v in out.items() if not (isinstance(v, dict) and not v)}


def restore_params_stacked(
    workdir: str,
    config: TransformerConfig,
    *,
    step: Optional[int] = None,
    template: Any,
    frozen_template: Any = None,
    nothing: str = "",
    mesh=None,
    rules=None,
) -> tuple[dict, dict]:
    """`restore_params` of a checkpoint saved per layer (`layers_{i}`), read straight into the stacked
    layout `config` runs with (models/scan.py): equal leaf for leaf to
    stack_layers(restore_params(...)[0], config), without holding the model in both layouts.

    The leaves outside the scanned layers (embeddings, heads, the n_layers mod P remainder layers)
    restore as restore_params does. Every stacked leaf [G, ...] is allocated once, and layer g*P + j,
    restored on its own (Orbax partial restore, with the template's dtype), is written into entry g of
    layers_stacked/p{j} by a donated in-place update: at most the stacked tree plus one layer is live.
    template / frozen_template: the per-layer abstract trees of 'params' and 'frozen'
    (ShapeDtypeStructs without shardings; a frozen_template of {} or None: no frozen tree).

    Placement: on the default device without a mesh. With a mesh (+ rules, default DEFAULT_RULES)
    every array goes straight onto its NamedSharding by the rules: a stacked leaf [G, ...] onto
    P(None, *its layer's spec), each layer restored onto its own layer sharding (each device reads
    only its shard) and written into the stack's matching shards, the same shardings
    `models.sharding.tree_shardings` gives the stacked tree (so a train state's device_put moves nothing).
    """
    if template is None:
        raise ValueError("restore_params_stacked: pass the per-layer template of the checkpoint's 'params'")
    period, groups = layer_groups(config)
    halves = {"params": template, **({"frozen": frozen_template} if frozen_template else {})}
    if mesh is not None:  # per-layer leaves onto their layer shardings
        halves = with_shardings(halves, mesh, _rules(rules))
    stacked = {key: stack_layers(tree, config, stack=_abstract_stack) for key, tree in halves.items()}
    if mesh is not None:  # stacked leaves: P(None, *layer spec), the rules' own answer for [G, ...]
        stacked = with_shardings(stacked, mesh, _rules(rules))
    # (half, path of a Transformer tree) of every stacked group in the checkpoint's trees
    slots = [(key, path) for key, tree in stacked.items() for path in transformer_tree_paths(tree)]
    slots = [(key, path) for key, path in slots if STACKED in _get(stacked[key], path)]
    rest = dict(stacked)
    for key, path in slots:
        rest[key] = _without(rest[key], path, STACKED)
    rest = {key: tree for key, tree in rest.items() if tree}
    ckpt = CheckpointManager(os.path.join(workdir, "checkpoints"), save_every=1)
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints{nothing}")
        step = ckpt.latest_step() if step is None else int(step)
        out, extra = ckpt.restore_subset(rest, step)  # verifies the step's checksums, once

        def sharding_of(a):
            return default_sharding() if a.sharding is None else a.sharding

        abstract_stacks = [_get(stacked[key], path)[STACKED] for key, path in slots]
        stacks = [  # on a NamedSharding jnp.zeros fills one shard and places it: no whole stack anywhere
            jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype, device=sharding_of(a)), tree) for tree in abstract_stacks
        ]
        writers = [
            _layer_writer(tuple(jax.tree.map(sharding_of, tree[f"p{j}"]) for tree in abstract_stacks))
            for j in range(period)
        ]
        for g in range(groups):
            for j in range(period):
                name = f"layers_{g * period + j}"
                item = {}
                for key, path in slots:
                    item = combine_params(item, {key: _nest((*path, name), _get(halves[key], path)[name])})
                layer, _ = ckpt.restore_subset(item, step, verify=False)
                written = writers[j](
                    tuple(s[f"p{j}"] for s in stacks), tuple(_get(layer[key], path)[name] for key, path in slots), g
                )
                for s, new in zip(stacks, written):
                    s[f"p{j}"] = new
                del layer, written  # only this layer's restored arrays were live beside the stacks
    finally:
        ckpt.close()
    for (key, path), s in zip(slots, stacks):
        out[key] = combine_params(out.get(key, {}), _nest(path, {STACKED: s}))
    params, frozen = out.get("params", {}), out.get("frozen", {})
    return (combine_params(params, frozen) if frozen else params), extra
