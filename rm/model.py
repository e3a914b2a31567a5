"""Reward model = transformer backbone + scalar head read at the last real token.

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
import json
import os
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.heads import ScalarHead, gather_last
from models.lora import add_lora_params, combine_params, lora_trainable, partition_params
from models.transformer import Transformer, TransformerConfig


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
        from models.quant import quantize_params

        params, config = quantize_params(params, config)
    params = add_lora_params(params, config, jax.random.key(0) if rng is None else rng)
    return config, params


def split_trainable(config: TransformerConfig, params: dict) -> tuple[dict, dict]:
    """(trainable, frozen) halves of a reward-model tree: with LoRA only adapters and the head
    train (models.lora.lora_trainable); without LoRA everything trains and frozen is {}."""
    if config.lora_rank <= 0:
        return params, {}
    return partition_params(params, lora_trainable)


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


def save_model_config(workdir: str, config: TransformerConfig) -> None:
    with open(os.path.join(workdir, "model_config.json"), "w") as f:
        json.dump(dataclasses.asdict(config), f, indent=2)


def load_model_config(workdir: str, **overrides) -> TransformerConfig:
    path = os.path.join(workdir, "model_config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} is missing: {workdir} is not a workdir written by a trainer")
    with open(path) as f:
        fields = json.load(f)
    if fields.get("rope_scaling") is not None:
        fields["rope_scaling"] = tuple(tuple(x) for x in fields["rope_scaling"])
    fields.update(overrides)
    return TransformerConfig(**fields)


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
        from rm.calibration import calibrated_probability

        return calibrated_probability(raw_a, raw_b, self.temperature)


def load_reward_model(
    path: str, *, dtype: str = "float32", param_dtype: Optional[str] = None, step: Optional[int] = None
) -> LoadedRewardModel:
    """Load a reward model from an RM workdir (Orbax) or an exported HF sequence-classification folder."""
    if os.path.exists(os.path.join(path, "model_config.json")):
        return _load_from_workdir(path, dtype=dtype, param_dtype=param_dtype, step=step)
    if os.path.exists(os.path.join(path, "config.json")):
        return _load_from_hf(path, dtype=dtype, param_dtype=param_dtype or "float32")
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


def _load_from_workdir(workdir, *, dtype, param_dtype, step):
    from common.checkpoint import CheckpointManager

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
    ckpt = CheckpointManager(os.path.join(workdir, "checkpoints"), save_every=1)
    try:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
        # A LoRA run checkpoints the trainable half under 'params' and the frozen base under
        # 'frozen' (rm/train.py); the model is their union.
        trainable, frozen = split_trainable(config, abstract)
        params, extra = ckpt.restore_subtree("params", step=step, template=trainable)
        if frozen:
            frozen, _ = ckpt.restore_subtree("frozen", step=step, template=frozen)
            params = combine_params(params, frozen)
    finally:
        ckpt.close()
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


def _load_from_hf(path, *, dtype, param_dtype):
    from models.hf import load_hf_checkpoint

    config, backbone, leftovers = load_hf_checkpoint(path, dtype=dtype, param_dtype=param_dtype, with_leftovers=True)
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
    backbone = {k: v for k, v in backbone.items() if k != "lm_head"}
    has_tokenizer = os.path.exists(os.path.join(path, "tokenizer_config.json"))
    return LoadedRewardModel(
        config=config,
        params={"backbone": backbone, "head": head},
        tokenizer_path=path if has_tokenizer else None,
        temperature=float(hf_config.get("reward_temperature", 1.0)),
    )
