"""LoRA / int8 attachment as a model transform, and the one rule for what trains.

Every trainer (SFT, RM, PPO policy and value) turns its float params into LoRA / QLoRA params
with `add_lora_and_quant` and splits them into the trained and the frozen half with
`split_trainable`; the optimizer state and the gradients cover the trained half only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional, Union

import jax

from models.lora import add_lora_params, lora_trainable, partition_params
from models.quant import quantize_params
from models.transformer import TransformerConfig

__all__ = ["add_lora_and_quant", "split_trainable"]


def add_lora_and_quant(
    config: TransformerConfig,
    params: dict,
    *,
    lora_rank: int = 0,
    lora_alpha: float = 16.0,
    lora_targets=("q_proj", "v_proj"),
    lora_dropout: float = 0.0,
    quant: str = "",
    rng: Optional[jax.Array] = None,
    where: str = "model",
) -> tuple[TransformerConfig, dict]:
    """Float params (a bare Transformer tree or one nested, e.g. {'backbone', 'head'}) -> LoRA / QLoRA.

    quant='int8' turns the base projections into int8 (models/quant.py) and is allowed only
    with lora_rank > 0: without adapters nothing would train on an int8 base (jax.grad refuses
    integer leaves). lora_rank > 0 adds fresh adapters (B = 0, so the model computes exactly
    what the base computes). `where` names the config section in error messages.
    Returns (config with the LoRA/quant fields set, params).
    """
    if quant not in ("", "int8"):
        raise ValueError(f"config.{where}.quant={quant!r}; expected '' or 'int8'")
    if quant and lora_rank <= 0:
        raise ValueError(
            f"config.{where}.quant={quant!r} needs config.{where}.lora_rank > 0: int8 is the frozen "
            "base under LoRA (QLoRA); a fully fine-tuned model cannot have int8 weights"
        )
    if lora_rank < 0:
        raise ValueError(f"config.{where}.lora_rank={lora_rank}; expected >= 0 (0 = no adapters)")
    if lora_rank == 0:
        return config, params
    if isinstance(lora_targets, str):  # 'q_proj,v_proj' from a command-line override
        lora_targets = [t.strip() for t in lora_targets.split(",") if t.strip()]
    try:
        config = config.replace(
            lora_rank=int(lora_rank),
            lora_alpha=float(lora_alpha),
            lora_targets=tuple(lora_targets),
            lora_dropout=float(lora_dropout),
        )
    except ValueError as e:
        raise ValueError(f"config.{where}.lora_rank / lora_alpha / lora_targets / lora_dropout: {e}") from e
    if quant:
        params, config = quantize_params(params, config)
    params = add_lora_params(params, config, jax.random.key(0) if rng is None else rng)
    return config, params


def split_trainable(params: dict, lora: Union[bool, Mapping[str, bool]]) -> tuple[dict, dict]:
    """(trainable, frozen) halves of a param tree: the one rule for what trains.

    A model with LoRA trains its adapters and its scalar heads only (`models.lora.lora_trainable`);
    a model without LoRA trains everything. `lora` is one flag for the whole tree (a reward model,
    an SFT model), or a flag per top-level key for a tree that holds several models (PPO's
    {'policy': ..., 'value': ...}; a key not named trains whole). Without LoRA, frozen is {}.
    """
    if isinstance(lora, Mapping):

        def trainable(path: str) -> bool:
            return lora_trainable(path) if lora.get(path.split("/", 1)[0], False) else True

        return partition_params(params, trainable)
    if not lora:
        return params, {}
    return partition_params(params, lora_trainable)
