"""PPO's models loaded for a run: the policy, its reference copy and the reward model (one or an ensemble).

Every tensor loads straight onto its sharding on the run's mesh (models/hf.py, rm.model.load_reward_model).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from common import data_io
from common.train_state import load_pretrained
from models.lora import merge_lora, strip_lora
from models.quant import quantize_params
from models.scan import match_layout
from rm.ensemble import OBJECTIVES, load_members


def load_models(config, tokenizer, mesh, rules):
    """Policy (+ reference copy), reward model, and value-model initialisation.

    Every tensor is read straight onto its sharding on `mesh` by `rules`, those the train state and
    the frozen reference / reward trees use (an ensemble's K members are then stacked [K, ...] and
    replicated, as they are scored)."""
    if bool(config.reward.workdir) == bool(config.reward.init_from):
        raise ValueError(
            "set exactly one of config.reward.workdir (an RM workdir) and config.reward.init_from "
            "(an exported Hugging Face reward folder)"
        )
    objective = config.reward.get("objective", "mean")
    if objective not in OBJECTIVES:
        raise ValueError(f"config.reward.objective={objective!r}; expected one of {OBJECTIVES}")
    if not config.reward.get("uwo_lambda", 1.0) >= 0:
        raise ValueError(f"config.reward.uwo_lambda={config.reward.uwo_lambda}; expected >= 0")
    # (the reward settings are checked first: a bad one fails before a large policy is read)
    policy_config, policy_params = load_pretrained(
        config.policy, mesh=mesh, rules=rules, pad_token_id=tokenizer.pad_token_id
    )
    # An ensemble run's workdir (rm/ensemble_train.py) stands for its K members; member 0 leads (value init).
    rm_scan = config.reward.get("scan_layers", False)  # loads stacked: folders per shard, workdirs per layer
    members = load_members(  # each member by `rules`; an ensemble's stack is replicated later (ppo/train.py)
        config.reward.workdir or config.reward.init_from,
        dtype=config.reward.dtype,
        scan_layers=rm_scan,
        mesh=mesh,
        rules=rules,
    )
    if len(members) > 1 and config.reward.quant:
        raise ValueError("config.reward.quant='int8' is not supported with an ensemble reward (K members)")
    for member in members:
        member.config = member.config.replace(scan_layers=rm_scan)
        member.params = match_layout(member.params, member.config)  # scan_layers: stacked (models/scan.py)
    reward = members[0]
    if reward.config.vocab_size < policy_config.vocab_size:
        raise ValueError(
            f"reward model vocab ({reward.config.vocab_size}) is smaller than the policy's "
            f"({policy_config.vocab_size}): policy and reward model must share a tokenizer"
        )
    if reward.tokenizer_path:
        rm_tok = data_io.load_tokenizer(reward.tokenizer_path)
        probe = "The quick brown fox, 123!"
        if (
            rm_tok(probe, add_special_tokens=False)["input_ids"]
            != tokenizer(probe, add_special_tokens=False)["input_ids"]
        ):
            raise ValueError(
                "the reward model's tokenizer differs from the policy's; PPO here scores token ids "
                "directly, so both must share a tokenizer"
            )
    return policy_config, policy_params, members


def frozen_reward(config, reward):
    """(reward config, reward params, float config, float params) of the loaded reward model.

    A LoRA reward model is merged first (an int8 base dequantised), giving the plain float
    model the value model starts from; with reward.quant='int8' the scoring copy is then
    quantised (weight-only, models/quant.py), which the QuantDense path reads directly.
    """
    quant = config.reward.quant
    if quant not in ("", "int8"):
        raise ValueError(f"config.reward.quant={quant!r}; expected '' or 'int8'")
    rm_params, rm_config = merge_lora(reward.params, reward.config)
    if not quant:
        return rm_config, rm_params, rm_config, rm_params
    params, qconfig = quantize_params(rm_params, rm_config)
    return qconfig, params, rm_config, rm_params


def reference_model(pc, policy_config, policy_params):
    """(adapters_off, reference config or None, reference params or None) from config.policy.

    'adapters_off': the rollout runs the policy's own params with lora_rank=0 (the frozen base),
    so nothing is held here. 'copy': a separate frozen copy of the initial policy without
    adapters, quantised to int8 with policy.ref_quant.
    """
    mode = pc.reference
    if mode == "auto":
        mode = "adapters_off" if pc.lora_rank > 0 else "copy"
    if mode not in ("copy", "adapters_off"):
        raise ValueError(f"config.policy.reference={mode!r}; expected 'auto', 'copy' or 'adapters_off'")
    if pc.ref_quant not in ("", "int8"):
        raise ValueError(f"config.policy.ref_quant={pc.ref_quant!r}; expected '' or 'int8'")
    if mode == "adapters_off":
        if policy_config.lora_rank <= 0:
            raise ValueError(
                "config.policy.reference='adapters_off' needs config.policy.lora_rank > 0: without "
                "adapters the policy has no frozen base to serve as the reference"
            )
        if pc.ref_quant:
            raise ValueError(
                "config.policy.ref_quant quantises a separate reference copy (reference='copy'); with "
                "reference='adapters_off' the reference is the policy's base: set config.policy.quant"
            )
        return True, None, None
    ref_config = policy_config.replace(lora_rank=0)
    ref_params = jax.tree.map(jnp.array, strip_lora(policy_params))  # a copy: the policy's leaves get donated
    if pc.ref_quant and not ref_config.quant:  # (an int8 policy base is copied as int8 already)
        ref_params, ref_config = quantize_params(ref_params, ref_config)
    return False, ref_config, ref_params
