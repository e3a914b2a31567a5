"""The two steps benchmarks/memory.py measures, built as the trainers build them: shapes, workloads,
memory configurations (Variant) and the RM / PPO step builders (see benchmarks/memory.py's docstring)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from common.mesh import make_mesh
from common.optim import make_optimizer
from common.train_state import build_train_state
from models.adapters import add_lora_and_quant, split_trainable
from models.quant import quantize_params
from models.sharding import REPLICATED_RULES
from models.transformer import TransformerConfig, init_params
from ppo.rollout import ModelSpecs
from ppo.update import UPDATE_KEYS, ppo_loss, ppo_update, separate_optimizers
from rm.model import rm_params_from_backbone
from rm.train import train_step

GIB, MIB = 2.0**30, 2.0**20
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
SHAPES = {
    "1b": dict(
        vocab_size=128256,
        d_model=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        head_dim=64,
        d_ff=8192,
        rope_theta=500000.0,
        tie_embeddings=True,
    ),
    "small": dict(
        vocab_size=32000, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=64, d_ff=1024, tie_embeddings=True
    ),
}
# Per shape. RM: pairs x tokens per sequence; PPO: rollouts, prompt tokens, response tokens.
WORKLOADS = {
    "1b": dict(rm_pairs=8, rm_len=512, ppo_rollouts=8, prompt_len=128, response_len=128),
    "small": dict(rm_pairs=4, rm_len=128, ppo_rollouts=4, prompt_len=64, response_len=64),
}
PPO_SETTINGS = dict(temperature=0.7, clip_eps=0.2, vf_clip_eps=0.2, vf_coef=0.1)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One memory configuration (see the module docstring)."""

    base: str  # fp32 | bf16 | bf16_compute (fp32 params, bf16 compute) | lora | lora_int8
    remat: bool = False
    lora_rank: int = 16
    lora_alpha: float = 32.0
    scan_layers: bool = False  # TransformerConfig.scan_layers (benchmarks/compile_time.py --scan)

    name = property(lambda self: self.base + ("+remat" if self.remat else "") + ("+scan" if self.scan_layers else ""))
    dtype = property(lambda self: "bfloat16" if self.base in ("bf16", "bf16_compute") else "float32")  # compute
    param_dtype = property(lambda self: "bfloat16" if self.base == "bf16" else "float32")
    rank = property(lambda self: self.lora_rank if self.base.startswith("lora") else 0)
    quant = property(lambda self: "int8" if self.base == "lora_int8" else "")


VARIANTS = [Variant(b, r) for b in ("fp32", "bf16", "lora", "lora_int8") for r in (False, True)]


def variant_by_name(name: str) -> Variant:
    found = [v for v in VARIANTS if v.name == name]
    if not found:
        raise ValueError(f"unknown configuration {name!r}; one of {[v.name for v in VARIANTS]}")
    return found[0]


def parse_variant(name: str) -> Variant:
    """'bf16_compute+remat+scan' -> Variant('bf16_compute', remat=True, scan_layers=True); any base."""
    base, *flags = name.split("+")
    if base not in ("fp32", "bf16", "bf16_compute", "lora", "lora_int8") or set(flags) - {"remat", "scan"}:
        raise ValueError(f"configuration {name!r}: a base (fp32, bf16, bf16_compute, lora, lora_int8) + remat / + scan")
    return Variant(base, remat="remat" in flags, scan_layers="scan" in flags)


def model_config(dims: dict, variant: Variant) -> TransformerConfig:
    """Float backbone config of every model in the run (before LoRA / int8)."""
    settings = dict(
        family="llama",
        dtype=variant.dtype,
        param_dtype=variant.param_dtype,
        remat=variant.remat,
        remat_policy="nothing_saveable",
        scan_layers=variant.scan_layers,
        pad_token_id=0,
        eos_token_id=1,
    )
    return TransformerConfig(**{**settings, **dims})  # dims may also set model options (attention, scan_layers)


def make_tx():
    """AdamW with clipping as the trainers build it (only trainable leaves ever reach it)."""
    return make_optimizer(learning_rate=1e-5, total_steps=1000, warmup_steps=0, max_grad_norm=1.0)


def _adapted(cfg, params, variant: Variant, rng, where: str):
    """add_lora_and_quant with this variant's LoRA rank/alpha and int8 choice (LORA_TARGETS)."""
    return add_lora_and_quant(
        cfg,
        params,
        lora_rank=variant.rank,
        lora_alpha=variant.lora_alpha,
        lora_targets=LORA_TARGETS,
        quant=variant.quant,
        rng=rng,
        where=where,
    )


def _copy(tree):
    """Fresh buffers (as the trainers copy before donating), so no tree aliases another."""
    return jax.tree.map(jnp.array, tree)


def _train_state(params, frozen, tx, seed):
    """(state, frozen) from the trainers' own `common.train_state.build_train_state`, on a one-device mesh."""
    mesh = make_mesh((1, 1), devices=jax.devices()[:1])
    built = build_train_state(params, frozen, tx, mesh=mesh, rules=REPLICATED_RULES, rng=jax.random.key(seed))
    return built.state, built.frozen


def _init_key(seed):
    """Key for weights and data. RngBitGenerator, not threefry: the values do not matter here, and
    threefry's unrolled rounds (one set per parameter) make the jitted init slow to compile."""
    return jax.random.key(seed, impl="unsafe_rbg")


# ----------------------------------------------------------------------------- the two steps


def rm_setup(dims: dict, variant: Variant, workload: dict, seed: int = 0):
    """(jitted step, build) of one RM train step; build() -> (state, batch, frozen), trees as
    rm/train.py makes them. Call build() for arrays or jax.eval_shape(build) for shapes only."""
    tx, schedule = make_tx()
    box = {}

    def build():
        keys = jax.random.split(_init_key(seed), 5)
        cfg = model_config(dims, variant)
        params = rm_params_from_backbone(cfg, init_params(cfg, keys[0]), keys[1])
        cfg, params = _adapted(cfg, params, variant, keys[2], "model")
        box["config"] = cfg
        params, frozen = split_trainable(params, lora=cfg.lora_rank > 0)
        state, frozen = _train_state(params, frozen, tx, seed)
        b, t = workload["rm_pairs"], workload["rm_len"]
        ids = jax.random.randint(keys[4], (2, b, t), 1, dims["vocab_size"], jnp.int32)
        ones = jnp.ones((b, t), jnp.int32)
        batch = {"chosen_ids": ids[0], "chosen_mask": ones, "rejected_ids": ids[1], "rejected_mask": ones}
        return state, batch, frozen

    jax.eval_shape(build)  # fills box['config'] (static) without allocating anything

    step = jax.jit(
        functools.partial(
            train_step,
            model_config=box["config"],
            tx=tx,
            schedule=schedule,
            accum_steps=1,
            center_coef=0.01,
            use_margin=False,
            nan_step=-1,
        ),
        donate_argnums=(0,),
        keep_unused=True,
    )
    return step, build


def ppo_setup(dims: dict, variant: Variant, workload: dict, seed: int = 0, sequential_value_update: bool = False):
    """(jitted step, build) of one PPO update with all four models, trees as ppo/train.py makes them.

    build() -> (state, rollout, frozen, ref_params, reward_params). The step is `ppo_update(state,
    rollout, frozen)`; ref and reward are unread arguments (keep_unused=True): resident memory.
    sequential_value_update: train.sequential_value_update (policy step, then value step, one
    optimizer each).
    """
    tx, _ = make_tx()
    if sequential_value_update:
        tx = separate_optimizers(tx)
    box = {}

    def build():
        keys = jax.random.split(_init_key(seed), 8)
        cfg = model_config(dims, variant)
        lora = variant.rank > 0
        policy_params = init_params(cfg, keys[0])  # the SFT policy
        rm_params = rm_params_from_backbone(cfg, init_params(cfg, keys[1]), keys[2])  # the trained RM (float)
        policy_config, policy_params = _adapted(cfg, policy_params, variant, keys[3], "policy")
        reward_config, reward_params = cfg, rm_params
        if variant.quant:  # reward.quant='int8'
            reward_params, reward_config = quantize_params(rm_params, cfg)
        reward_params = _copy(reward_params)  # own buffers: counted once here, once in the value model
        # value.init='reward': the value model starts as the float reward model (+ adapters).
        value_config, value_params = _adapted(cfg, rm_params, variant, keys[4], "value")
        if lora:  # policy.reference='auto' -> 'adapters_off': no second copy of the base
            ref_config, ref_params = None, None
        else:  # 'copy': a separate frozen copy of the initial policy
            ref_config, ref_params = policy_config, _copy(policy_params)
        box["specs"] = ModelSpecs(
            policy=policy_config,
            reward=reward_config,
            value=value_config,
            value_head_on_policy=False,
            reference=ref_config,
            reference_adapters_off=lora,
        )
        params, frozen = split_trainable(
            {"policy": policy_params, "value": value_params}, {"policy": lora, "value": lora}
        )
        state, frozen = _train_state(_copy(params), frozen, tx, seed)
        b, p, n = workload["ppo_rollouts"], workload["prompt_len"], workload["response_len"]
        normal = jax.random.normal(keys[6], (4, b, n), jnp.float32)
        ids = jax.random.randint(keys[7], (b, p + n), 1, dims["vocab_size"], jnp.int32)
        rollout = {
            "query_ids": ids[:, :p],
            "query_mask": jnp.ones((b, p), jnp.int32),
            "response_ids": ids[:, p:],
            "response_mask": jnp.ones((b, n), jnp.int32),
            "logprobs": normal[0] - 3.0,
            "values": normal[1],
            "advantages": normal[2],
            "returns": normal[3],
        }
        assert set(rollout) == set(UPDATE_KEYS)
        return state, rollout, frozen, ref_params, reward_params

    jax.eval_shape(build)
    loss_fn = functools.partial(ppo_loss, specs=box["specs"], **PPO_SETTINGS)
    update = functools.partial(
        ppo_update,
        tx=tx,
        loss_fn=loss_fn,
        ppo_epochs=1,
        num_minibatches=1,
        accum_steps=1,
        sequential_value_update=sequential_value_update,
    )

    def step(state, rollout, frozen, ref_params, reward_params):
        del ref_params, reward_params  # resident (read by the rollout), not read by the update
        return update(state, rollout, frozen)

    return jax.jit(step, donate_argnums=(0,), keep_unused=True), build


SETUPS = {"rm": rm_setup, "ppo": ppo_setup}
# Names of the builders' outputs, for the per-tree byte breakdown.
ARG_NAMES = {"rm": ("state", "batch", "frozen"), "ppo": ("state", "rollout", "frozen", "reference", "reward")}
