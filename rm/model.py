"""Reward model = transformer backbone + scalar head read at the last real token; loading and scoring.

This module is rm's public face for the other trainers: PPO loads (`load_reward_model`) and
scores (`compute_rewards`, `score_arrays`) a trained reward model, and its value model is
`RewardModel` with `per_token=True`; nothing else of rm/ is imported outside it.

Params: {'backbone': transformer params (no lm_head), 'head': {'kernel' [d, 1], 'bias' [1]}}.
The same module with `per_token=True` is the PPO value model (one scalar per position), so a
value model initialises from a reward model by copying the tree.

A trained reward model lives in a workdir (see `rm/train.py`):
  workdir/model_config.json    the TransformerConfig fields
  workdir/tokenizer/           the tokenizer files
  workdir/checkpoints/         Orbax checkpoints; the latest one's extra holds the normalisation
  workdir/normalization.json   {gain, bias} as well, for people reading the folder

LoRA / int8 (configs/rm.py model.lora_rank, model.quant): model_config.json records lora_rank,
lora_alpha, lora_targets and quant; the checkpoint holds the adapters and the head under
'params' and the frozen (possibly int8) base under 'frozen'; `load_reward_model` joins them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from common.checkpoint import CheckpointManager
from common.workdir import load_model_config, restore_params, restore_params_stacked
from models.adapters import split_trainable
from models.heads import ScalarHead, gather_last
from models.hf import load_hf_checkpoint
from models.sharding import DEFAULT_RULES, shard_params
from models.transformer import Transformer, TransformerConfig
from rm.calibration import calibrated_probability


class RewardModel(nn.Module):
    config: TransformerConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask, *, per_token: bool = False, segment_ids=None, read_at=None):
        """Rewards [B] at each row's last real token; [B, T] with per_token; packed rows
        (segment_ids [B, T], common/packing.py): [B, K] read at token indices read_at [B, K]."""
        out = Transformer(self.config, name="backbone")(
            input_ids, attention_mask, return_logits=False, segment_ids=segment_ids
        )
        if read_at is not None:
            hidden = jnp.take_along_axis(out.hidden_states, read_at[..., None], axis=1)  # [B, K, d]
        else:
            hidden = out.hidden_states if per_token else gather_last(out.hidden_states, attention_mask)
        return ScalarHead(param_dtype=self.config.param_dtype, name="head")(hidden)  # [B], [B, T] or [B, K]


def init_head(config: TransformerConfig, rng: jax.Array) -> dict:
    """Fresh scalar head: kernel N(0, 1/sqrt(d+1)), bias 0."""
    return ScalarHead(param_dtype=config.param_dtype).init(rng, jnp.zeros((1, config.d_model)))["params"]


def rm_params_from_backbone(config: TransformerConfig, backbone: dict, rng: jax.Array) -> dict:
    """Reward-model params from backbone params (an SFT / HF causal-LM checkpoint)."""
    backbone = {k: v for k, v in backbone.items() if k != "lm_head"}
    return {"backbone": backbone, "head": init_head(config, rng)}


def compute_rewards(
    config: TransformerConfig, params: dict, input_ids, attention_mask, dropout_rng: Optional[jax.Array] = None
) -> jax.Array:
    """Scalar rewards [B] (raw, before normalisation). `dropout_rng` turns on LoRA dropout (training only)."""
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
    return RewardModel(config).apply({"params": params}, input_ids, attention_mask, rngs=rngs)


def compute_packed_rewards(
    config: TransformerConfig, params: dict, input_ids, segment_ids, read_at, dropout_rng: Optional[jax.Array] = None
) -> jax.Array:
    """Raw rewards [B, K] of packed rows (common/packing.py): input_ids, segment_ids [B, T]; the
    reward of segment k is read at its last token read_at[:, k]."""
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
    return RewardModel(config).apply(
        {"params": params},
        input_ids,
        (segment_ids > 0).astype(jnp.int32),
        segment_ids=segment_ids,
        read_at=read_at,
        rngs=rngs,
    )


@dataclasses.dataclass
class LoadedRewardModel:
    """A reward model ready to score: config, params, normalisation and tokenizer path."""

    config: TransformerConfig
    params: dict
    gain: float = 1.0
    bias: float = 0.0
    tokenizer_path: Optional[str] = None
    step: Optional[int] = None
    temperature: float = 1.0  # calibration (rm/calibration.py): P(a > b) = sigmoid((r_a - r_b) / T), raw rewards

    def normalize(self, raw):
        return self.gain * raw + self.bias

    def preference_probability(self, raw_a, raw_b):
        """Calibrated P(a preferred over b) = sigmoid((raw_a - raw_b) / temperature), from raw rewards."""
        return calibrated_probability(raw_a, raw_b, self.temperature)


def load_reward_model(
    path: str,
    *,
    dtype: str = "float32",
    param_dtype: Optional[str] = None,
    step: Optional[int] = None,
    scan_layers: bool = False,
    mesh=None,
    rules=None,
) -> LoadedRewardModel:
    """Load a reward model from an RM workdir (Orbax) or an exported HF sequence-classification folder.

    scan_layers: load with the layers stacked (models/scan.py) and config.scan_layers=True. An
    exported folder stacks per shard (models/hf.py); a workdir saved per layer restores each layer
    into its slot of the stack (common.workdir.restore_params_stacked), one saved stacked as it is.
    Without it a workdir restores in its checkpoint's layout (models.scan.match_layout converts).
    mesh (+ rules, default models.sharding.DEFAULT_RULES): every tensor lands straight on its
    NamedSharding by the rules, the placement `models.sharding.shard_params` would give it;
    without a mesh, on the default device."""
    place = dict(mesh=mesh, rules=rules)
    if os.path.exists(os.path.join(path, "model_config.json")):
        return _load_from_workdir(
            path, dtype=dtype, param_dtype=param_dtype, step=step, scan_layers=scan_layers, **place
        )
    if os.path.exists(os.path.join(path, "config.json")):
        return _load_from_hf(path, dtype=dtype, param_dtype=param_dtype or "float32", scan_layers=scan_layers, **place)
    raise FileNotFoundError(f"{path} is neither an RM workdir (model_config.json) nor a HF folder (config.json)")


def describe_workdir(workdir: str, ckpt=None) -> str:
    """What a trainer workdir holds, in words: its config.trainer and the checkpoint's params keys."""
    trainer = None
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            trainer = json.load(f).get("trainer")
    except (OSError, ValueError):
        pass
    keys = ckpt.subtree_keys("params") if ckpt is not None else []
    kind = {"ppo": "a PPO workdir", "sft": "an SFT workdir", "rm": "a reward-model workdir"}.get(trainer)
    if kind is None:
        kind = (
            "a PPO workdir"
            if "policy" in keys
            else "a causal-LM (SFT) workdir"
            if "embed" in keys
            else f"a workdir of trainer {trainer!r}"
        )
    return f"{kind} (checkpoint params: {', '.join(keys) or 'none'})"


def _load_from_workdir(workdir, *, dtype, param_dtype, step, scan_layers=False, mesh=None, rules=None):
    ckpt = CheckpointManager(os.path.join(workdir, "checkpoints"), save_every=1)
    try:
        keys = ckpt.subtree_keys("params") if ckpt.latest_step() is not None else []
        if keys and not {"backbone", "head"} <= set(keys):
            raise ValueError(
                f"{workdir} is not a reward-model workdir: it is {describe_workdir(workdir, ckpt)}. rm.score and "
                f"rm.export need a workdir written by the rm trainer (configs/rm.py) or an exported reward folder "
                f"(python -m rm.export); a PPO run's reward model is the one its config.reward.workdir names"
            )
    finally:
        ckpt.close()
    overrides = {"dtype": dtype}
    if param_dtype:
        overrides["param_dtype"] = param_dtype
    config = load_model_config(workdir, **overrides)
    abstract = jax.eval_shape(
        lambda: RewardModel(config).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32), jnp.ones((1, 2), jnp.int32))[
            "params"
        ]
    )
    # A LoRA run checkpoints the trainable half under 'params' and the frozen base under
    # 'frozen' (rm/train.py); the model is their union.
    trainable, frozen = split_trainable(abstract, lora=config.lora_rank > 0)
    if scan_layers and not config.scan_layers:  # saved per layer, run stacked: no per-layer copy of the model
        config = config.replace(scan_layers=True)
        params, extra = restore_params_stacked(
            workdir, config, step=step, template=trainable, frozen_template=frozen, mesh=mesh, rules=rules
        )
    else:
        params, extra = restore_params(
            workdir, step=step, template=trainable, frozen_template=frozen, mesh=mesh, rules=rules
        )
    norm = extra.get("normalization") or {}
    tok = os.path.join(workdir, "tokenizer")
    return LoadedRewardModel(
        config=config,
        params=params,
        gain=float(norm.get("gain", 1.0)),
        bias=float(norm.get("bias", 0.0)),
        tokenizer_path=tok if os.path.isdir(tok) else None,
        step=int(extra.get("step", -1)),
        temperature=float((extra.get("calibration") or {}).get("temperature", 1.0)),
    )


def _load_from_hf(path, *, dtype, param_dtype, scan_layers=False, mesh=None, rules=None):
    config, backbone, leftovers = load_hf_checkpoint(
        path, dtype=dtype, param_dtype=param_dtype, with_leftovers=True, scan_layers=scan_layers, mesh=mesh, rules=rules
    )
    if "score.weight" not in leftovers:
        raise ValueError(f"{path} has no score.weight: not a sequence-classification (reward) model")
    with open(os.path.join(path, "config.json")) as f:
        hf_config = json.load(f)
    kernel = jnp.asarray(leftovers["score.weight"], jnp.float32).T  # [d, 1]
    if kernel.shape != (config.d_model, 1):
        raise ValueError(
            f"{path}: score.weight has shape {leftovers['score.weight'].shape}, expected (1, {config.d_model})"
        )
    # The export folds gain into score.weight and (for GPT-2) the offset into ln_f's bias; what
    # could not be folded is `reward_offset` (see rm/export.py).
    head = {
        "kernel": kernel.astype(param_dtype),
        "bias": jnp.asarray([hf_config.get("reward_offset", 0.0)], jnp.float32).astype(param_dtype),
    }
    if mesh is not None:  # the [d, 1] head: placed by the same rules (replicated)
        head = shard_params({"head": head}, mesh, DEFAULT_RULES if rules is None else rules)["head"]
    backbone = {k: v for k, v in backbone.items() if k != "lm_head"}
    has_tokenizer = os.path.exists(os.path.join(path, "tokenizer_config.json"))
    return LoadedRewardModel(
        config=config,
        params={"backbone": backbone, "head": head},
        tokenizer_path=path if has_tokenizer else None,
        temperature=float(hf_config.get("reward_temperature", 1.0)),
    )


# ----------------------------------------------------------------------------- scoring


@functools.lru_cache(maxsize=16)
def _jitted_rewards(config: TransformerConfig):
    # One jitted function per (frozen, hashable) config, so that repeated calls (a PPO run's rollouts scored one
    # iteration at a time) reuse its compiled shapes; a fresh jax.jit per call recompiled every time.
    return jax.jit(functools.partial(compute_rewards, config))


def score_arrays(model: LoadedRewardModel, ids, mask, *, batch_size=32, bucket=32):
    """Raw rewards of [N, L] right-padded arrays, in fixed-shape batches."""
    fn = _jitted_rewards(model.config)
    out = np.zeros(len(ids), np.float32)
    for start in range(0, len(ids), batch_size):
        b_ids, b_mask = ids[start : start + batch_size], mask[start : start + batch_size]
        n = len(b_ids)
        width = min(ids.shape[1], -(-int(b_mask.sum(1).max()) // bucket) * bucket)
        pad_rows = batch_size - n
        b_ids = np.concatenate([b_ids[:, :width], np.repeat(b_ids[:1, :width], pad_rows, 0)])
        b_mask = np.concatenate([b_mask[:, :width], np.repeat(b_mask[:1, :width], pad_rows, 0)])
        out[start : start + n] = np.asarray(fn(model.params, jnp.asarray(b_ids), jnp.asarray(b_mask)))[:n]
    return out


def training_max_length(path, default=512):
    """data.max_length of the run that wrote an RM workdir (its config.json), else `default` (an HF folder)."""
    cfg = os.path.join(path, "config.json")
    if os.path.exists(os.path.join(path, "model_config.json")) and os.path.exists(cfg):
        with open(cfg) as f:
            return int(json.load(f).get("data", {}).get("max_length", default))
    return default
