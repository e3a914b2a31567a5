"""The train state every trainer (and the benchmarks and sharding tests) builds the same way.

mesh -> rules -> params and frozen tree placed by the rules -> optimizer state created sharded
(jit(tx.init) with out_shardings) -> {'params', 'opt_state', 'step', 'rng'} -> its shardings ->
device_put. The frozen tree (a LoRA run's base) is a separate argument of the step, never in
the optimizer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from common.mesh import make_mesh
from models.hf import load_hf_checkpoint
from models.scan import match_layout
from models.sharding import DEFAULT_RULES, REPLICATED_RULES, shard_params, tree_shardings

__all__ = ["TrainState", "mesh_and_rules", "lora_settings", "load_pretrained", "build_train_state"]


@dataclasses.dataclass
class TrainState:
    """A placed train state with its shardings (the jitted step's in/out_shardings)."""

    state: dict  # {'params': trainable tree, 'opt_state', 'step': int32 [], 'rng': key data}
    state_sharding: Any
    frozen: dict  # the frozen tree ({} without LoRA), placed by the same rules
    frozen_sharding: Any
    mesh: Mesh
    rules: dict


def mesh_and_rules(mesh_config) -> tuple[Mesh, dict]:
    """(mesh, sharding rules) of a config's `mesh` section: FSDP + tensor parallel rules when
    mesh.fsdp_tp, else replicated params (data parallel only)."""
    mesh = make_mesh(tuple(mesh_config.shape), tuple(mesh_config.axis_names))
    return mesh, (DEFAULT_RULES if mesh_config.fsdp_tp else REPLICATED_RULES)


def lora_settings(section) -> dict:
    """The `models.adapters.add_lora_and_quant` keywords of a config section holding
    configs/common.py's lora_config() fields (model, policy, value)."""
    return dict(
        lora_rank=section.lora_rank,
        lora_alpha=section.lora_alpha,
        lora_targets=section.lora_targets,
        lora_dropout=section.lora_dropout,
        quant=section.quant,
    )


def load_pretrained(section, *, mesh: Mesh, rules: dict, pad_token_id: int) -> tuple[Any, dict]:
    """(TransformerConfig, params) of section.init_from (a Hugging Face folder) for a trainer's config
    section (model, policy): every tensor read straight onto its sharding on `mesh` by `rules`, those
    of the train state, so building it moves nothing (scan_layers: stacked per shard on load,
    models/hf.py); the section's run settings (remat, attention, logits_chunk, mlp_chunk,
    scan_layers) applied, and `pad_token_id` where the checkpoint's config names none."""
    scan = section.get("scan_layers", False)
    config, params = load_hf_checkpoint(
        section.init_from,
        dtype=section.dtype,
        param_dtype=section.param_dtype,
        scan_layers=scan,
        mesh=mesh,
        rules=rules,
    )
    config = config.replace(
        remat=section.remat,
        remat_policy=section.remat_policy,
        attention=section.get("attention", "auto"),
        logits_chunk=section.get("logits_chunk", 128),
        mlp_chunk=section.get("mlp_chunk", 0),
        scan_layers=scan,
    )
    if config.pad_token_id is None:
        config = config.replace(pad_token_id=pad_token_id)
    return config, match_layout(params, config)  # scan_layers: layers held stacked (models/scan.py)


def build_train_state(
    params: Any, frozen: Any, tx: optax.GradientTransformation, *, mesh: Mesh, rules: dict, rng: jax.Array
) -> TrainState:
    """Places `params` (the trainable tree) and `frozen` on `mesh` by `rules`, creates the
    optimizer state already sharded, and returns the state dict placed by its own shardings.

    `rng` is the key the steps fold their step number into (stored as key data, so the state
    is a plain array pytree that Orbax checkpoints).
    """
    params = shard_params(params, mesh, rules)
    frozen = frozen or {}
    frozen_sharding = tree_shardings(frozen, mesh, rules)
    frozen = shard_params(frozen, mesh, rules)
    opt_shardings = tree_shardings(jax.eval_shape(tx.init, params), mesh, rules)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    state = {
        "params": params,
        "opt_state": opt_state,
        "step": jnp.asarray(0, jnp.int32),
        "rng": jax.random.key_data(rng),
    }
    state_sharding = tree_shardings(state, mesh, rules)
    state = jax.device_put(state, state_sharding)
    return TrainState(state, state_sharding, frozen, frozen_sharding, mesh, rules)
