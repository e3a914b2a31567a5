"""PPO against a trained reward model: `train(config, workdir)`.

Launch (see configs/ppo.py):
  python -m experiments.run --config configs/ppo.py --workdir W --config.policy.init_from=HF_DIR \
      --config.reward.workdir=RM_WORKDIR --config.data.prompt_files=PROMPTS.jsonl --config.train.steps=50

Each step: one rollout batch (ppo/rollout.py), then `ppo_epochs` passes over shuffled
minibatches of it with gradient accumulation, all in one jitted update. Trainable state:
{'policy', 'value'} (or {'policy', 'value_head'}); the reference policy and the reward model
are frozen trees passed as arguments. Writes metrics.jsonl, samples.jsonl, checkpoints/.

Memory options (configs/ppo.py): LoRA on the policy (policy.lora_rank) and on the value model
(value.lora_rank) puts only adapters and heads in the train state (optimizer moments for them
alone); the frozen bases (int8 with policy.quant / value.quant) form a separate `frozen` tree, an argument of
the update (not donated) that checkpoints also hold under 'frozen'. policy.reference=
'adapters_off' makes the reference the policy's own base (no second copy); reward.quant and
policy.ref_quant store the frozen reward model / reference copy as int8.
"""

from __future__ import annotations

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from common.distributed import gather_to_host, is_main_process
from common.loop import open_checkpoints, start_run, write_json
from common.mesh import batch_sharding, local_rows, make_mesh, replicated, shard_batch
from common.metrics import Progress
from common.optim import accumulate_gradients, optimizer_from_config
from common.run_utils import PreemptionHandler, check_finite
from common.tracking import open_metrics, plot_training_curves, report_start
from models.heads import ScalarHead
from models.hf import load_hf_checkpoint
from models.lora import combine_params, lora_trainable, merge_lora, partition_params, strip_lora
from models.quant import quantize_params
from models.scan import match_layout
from models.sharding import DEFAULT_RULES, REPLICATED_RULES, shard_params, tree_shardings
from ppo import algorithms as algos
from ppo import losses as L
from ppo.data import load_prompts, prompt_batches
from ppo.kl import make_kl_controller
from ppo.rollout import ModelSpecs, Rollout, make_rollout_fn, response_logprobs_and_values, rollout_metrics
from rm import data as rm_data
from rm.model import add_lora_and_quant, load_reward_model, save_model_config

UPDATE_KEYS = (
    "query_ids",
    "query_mask",
    "response_ids",
    "response_mask",
    "logprobs",
    "values",
    "advantages",
    "returns",
)


def ppo_loss(params, batch, rng, *, specs, temperature, clip_eps, vf_clip_eps, vf_coef, variant=None, kl_in_loss=False):
    """Clipped policy loss + vf_coef * clipped value loss on one micro-batch (LoRA dropout uses `rng`).

    variant: None = the PPO policy loss; else the keyword arguments of ppo/objectives.py's
    policy_objective (clip variants, aggregation; the KL term with kl_in_loss), see ppo/algorithms.py.
    Without a critic (specs.critic False) there is no value loss.
    """
    logprobs, token_entropy, values = response_logprobs_and_values(
        specs,
        params,
        batch["query_ids"],
        batch["query_mask"],
        batch["response_ids"],
        batch["response_mask"],
        dropout_rng=rng,
        temperature=temperature,
    )
    maskf = batch["response_mask"].astype(jnp.float32)
    if variant is not None:
        loss, metrics = algos.policy_gradient_loss(logprobs, batch, maskf, variant=variant, kl_in_loss=kl_in_loss)
        metrics["policy/entropy"] = L.masked_mean(token_entropy, maskf)
        if specs.critic:
            vf_loss, vf_m = L.value_loss(values, batch["values"], batch["returns"], maskf, clip_eps=vf_clip_eps)
            loss = loss + vf_coef * vf_loss
            metrics.update({"val/vf_loss": vf_loss, "val/clipfrac": vf_m["vf_clipfrac"]})
        return loss, metrics
    pg_loss, pg_m = L.policy_loss(logprobs, batch["logprobs"], batch["advantages"], maskf, clip_eps=clip_eps)
    vf_loss, vf_m = L.value_loss(values, batch["values"], batch["returns"], maskf, clip_eps=vf_clip_eps)
    entropy = L.masked_mean(token_entropy, maskf)
    loss = pg_loss + vf_coef * vf_loss
    return loss, {
        "policy/pg_loss": pg_loss,
        "val/vf_loss": vf_loss,
        "policy/approxkl": pg_m["approxkl"],
        "policy/clipfrac": pg_m["clipfrac"],
        "val/clipfrac": vf_m["vf_clipfrac"],
        "policy/entropy": entropy,
        "policy/ratio": pg_m["ratio_mean"],
    }


def ppo_update(
    state, rollout: dict, frozen=None, *, tx, loss_fn, ppo_epochs, num_minibatches, accum_steps, group_size=1
):
    """All PPO epochs over shuffled minibatches of one rollout batch, as one pure function.

    group_size K > 1: rows [g*K, (g+1)*K) are one prompt's group and are shuffled as a unit
    (ppo/algorithms.py minibatch_order); K = 1 shuffles rows as always.

    rollout: dict of UPDATE_KEYS arrays with leading dim B. frozen: the non-trainable part of
    the params (LoRA bases; None or {} without LoRA), joined with state['params'] inside the
    loss so gradients are taken w.r.t. the trainable part only. Returns (state, mean metrics).
    """
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    frozen = frozen or {}

    def trainable_loss(params, batch, micro_rng):
        return loss_fn(combine_params(params, frozen), batch, micro_rng)

    b = rollout["query_ids"].shape[0]
    mb = b // num_minibatches
    if group_size > 1:
        order = algos.minibatch_order(
            jax.random.fold_in(rng, 1),
            batch=b,
            group_size=group_size,
            ppo_epochs=ppo_epochs,
            num_minibatches=num_minibatches,
        )
    else:
        perms = jax.vmap(lambda k: jax.random.permutation(k, b))(
            jax.random.split(jax.random.fold_in(rng, 1), ppo_epochs)
        )
        order = perms.reshape(ppo_epochs * num_minibatches, mb)  # [E*M, mb] row indices

    def one_minibatch(carry, idx):
        params, opt_state, i = carry
        batch = jax.tree.map(lambda x: jnp.take(x, idx, axis=0), rollout)
        _, aux, grads = accumulate_gradients(
            trainable_loss, params, batch, jax.random.fold_in(rng, i), accum_steps=accum_steps
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        aux = dict(aux, **{"policy/grad_norm": optax.tree.norm(grads)})
        return (params, opt_state, i + 1), aux

    (params, opt_state, _), aux = jax.lax.scan(one_minibatch, (state["params"], state["opt_state"], 0), order)
    metrics = jax.tree.map(jnp.mean, aux)
    return dict(state, params=params, opt_state=opt_state, step=state["step"] + 1), metrics


def _load_models(config, tokenizer):
    """Policy (+ reference copy), reward model, and value-model initialisation."""
    mc = config.policy
    policy_config, policy_params = load_hf_checkpoint(mc.init_from, dtype=mc.dtype, param_dtype=mc.param_dtype)
    policy_config = policy_config.replace(
        remat=mc.remat,
        remat_policy=mc.remat_policy,
        attention=mc.get("attention", "auto"),
        logits_chunk=mc.get("logits_chunk", 128),
        scan_layers=mc.get("scan_layers", False),
    )
    policy_params = match_layout(policy_params, policy_config)  # scan_layers: stacked layers (models/scan.py)
    if policy_config.pad_token_id is None:
        policy_config = policy_config.replace(pad_token_id=tokenizer.pad_token_id)
    if bool(config.reward.workdir) == bool(config.reward.init_from):
        raise ValueError(
            "set exactly one of config.reward.workdir (an RM workdir) and config.reward.init_from "
            "(an exported Hugging Face reward folder)"
        )
    reward = load_reward_model(config.reward.workdir or config.reward.init_from, dtype=config.reward.dtype)
    reward.config = reward.config.replace(scan_layers=config.reward.get("scan_layers", False))
    reward.params = match_layout(reward.params, reward.config)
    if reward.config.vocab_size < policy_config.vocab_size:
        raise ValueError(
            f"reward model vocab ({reward.config.vocab_size}) is smaller than the policy's "
            f"({policy_config.vocab_size}): policy and reward model must share a tokenizer"
        )
    if reward.tokenizer_path:
        rm_tok = rm_data.load_tokenizer(reward.tokenizer_path)
        probe = "The quick brown fox, 123!"
        if (
            rm_tok(probe, add_special_tokens=False)["input_ids"]
            != tokenizer(probe, add_special_tokens=False)["input_ids"]
        ):
            raise ValueError(
                "the reward model's tokenizer differs from the policy's; PPO here scores token ids "
                "directly, so both must share a tokenizer"
            )
    return policy_config, policy_params, reward


def _frozen_reward(config, reward):
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


def _reference(pc, policy_config, policy_params):
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


def _trainable_predicate(*, policy_lora: bool, value_lora: bool):
    """Path predicate for partition_params: a LoRA'd model trains only adapters and heads."""

    def trainable(path: str) -> bool:
        top = path.split("/", 1)[0]
        if (top == "policy" and policy_lora) or (top == "value" and value_lora):
            return lora_trainable(path)
        return True

    return trainable


def train(config, workdir: str) -> dict:
    """Run PPO as configured; returns the last metrics."""
    t0 = time.time()
    for key, value in (("policy.init_from", config.policy.init_from), ("data.prompt_files", config.data.prompt_files)):
        if not value:
            raise ValueError(f"config.{key} is required")
    run = start_run(config, workdir)  # config, mesh and path checks, resume comparison: before any data
    tokenizer = rm_data.load_tokenizer(config.policy.tokenizer or config.policy.init_from, setting="policy.tokenizer")
    prompt_files = [f.strip() for f in str(config.data.prompt_files).split(",") if f.strip()]
    prompts = load_prompts(
        prompt_files, tokenizer, max_prompt_length=config.data.max_prompt_length, on_bad_row=config.data.on_bad_row
    )
    data_identity = run.check_data(prompt_files, rows=prompts.stats["rows"])
    write_json(os.path.join(workdir, "data_stats.json"), prompts.stats)

    policy_config, policy_params, reward = _load_models(config, tokenizer)
    rng = jax.random.key(config.seed)
    pc, vc = config.policy, config.value
    policy_config, policy_params = add_lora_and_quant(
        policy_config,
        policy_params,
        lora_rank=pc.lora_rank,
        lora_alpha=pc.lora_alpha,
        lora_targets=pc.lora_targets,
        lora_dropout=pc.lora_dropout,
        quant=pc.quant,
        rng=jax.random.fold_in(rng, 4),
        where="policy",
    )
    if is_main_process():
        save_model_config(workdir, policy_config)  # records lora_* / quant: ppo.export merges the adapters
        tokenizer.save_pretrained(os.path.join(workdir, "tokenizer"))
    head_on_policy = vc.init == "policy_head"
    if vc.init not in ("reward", "policy_head"):
        raise ValueError(f"config.value.init={vc.init!r}; expected 'reward' or 'policy_head'")
    reward_config, reward_params, rm_config, rm_params = _frozen_reward(config, reward)
    ref_adapters_off, ref_config, ref_params = _reference(pc, policy_config, policy_params)
    algo = algos.resolve(config)
    if not algo.critic:  # critic-free: no value model at all (no params, no optimizer state, not checkpointed)
        value_config, value_tree = rm_config, {}
    elif head_on_policy:
        if vc.lora_rank:
            raise ValueError(
                "config.value.lora_rank applies to a separate value model (value.init='reward'); with "
                "value.init='policy_head' the value head sits on the policy (use policy.lora_rank)"
            )
        value_config = rm_config
        value_tree = {
            "value_head": ScalarHead(param_dtype=policy_config.param_dtype).init(
                jax.random.fold_in(rng, 3), jnp.zeros((1, policy_config.d_model))
            )["params"]
        }
    else:  # the value model starts as the (merged, float) reward model
        value_config, value_params = add_lora_and_quant(
            rm_config,
            rm_params,
            lora_rank=vc.lora_rank,
            lora_alpha=vc.lora_alpha,
            lora_targets=vc.lora_targets,
            lora_dropout=vc.lora_dropout,
            quant=vc.quant,
            rng=jax.random.fold_in(rng, 5),
            where="value",
        )
        value_config = value_config.replace(scan_layers=vc.get("scan_layers", False))
        value_params = match_layout(value_params, value_config)
        value_tree = {"value": value_params}
    specs = ModelSpecs(
        policy=policy_config,
        reward=reward_config,
        value=value_config,
        value_head_on_policy=head_on_policy,
        reference=ref_config,
        reference_adapters_off=ref_adapters_off,
        critic=algo.critic,
    )
    # Train state holds only the trainable part (everything without LoRA; adapters + heads with it).
    trainable = _trainable_predicate(
        policy_lora=policy_config.lora_rank > 0,
        value_lora=algo.critic and not head_on_policy and value_config.lora_rank > 0,
    )
    params, frozen = partition_params({"policy": policy_params, **value_tree}, trainable)
    if "value" in params:  # the update donates trainable leaves: they must not alias the reward model's arrays
        params["value"] = jax.tree.map(jnp.array, params["value"])

    tc = config.train
    if tc.batch_size % tc.num_minibatches or (tc.batch_size // tc.num_minibatches) % tc.grad_accum_steps:
        raise ValueError(
            f"train.batch_size={tc.batch_size} must split into num_minibatches={tc.num_minibatches} "
            f"minibatches, each divisible by grad_accum_steps={tc.grad_accum_steps}"
        )
    updates_total = tc.steps * tc.ppo_epochs * tc.num_minibatches
    tx, _ = optimizer_from_config(tc, total_steps=updates_total)

    mesh = make_mesh(tuple(config.mesh.shape), tuple(config.mesh.axis_names))
    rules = DEFAULT_RULES if config.mesh.fsdp_tp else REPLICATED_RULES
    params = shard_params(params, mesh, rules)
    frozen_sharding = tree_shardings(frozen, mesh, rules)
    frozen = shard_params(frozen, mesh, rules)  # placed as the params are (same rules)
    ref_params = None if ref_params is None else shard_params(ref_params, mesh, rules)
    reward_params = shard_params(reward_params, mesh, rules)
    opt_state = jax.jit(tx.init, out_shardings=tree_shardings(jax.eval_shape(tx.init, params), mesh, rules))(params)
    state = {
        "params": params,
        "opt_state": opt_state,
        "step": jnp.asarray(0, jnp.int32),
        "rng": jax.random.key_data(jax.random.fold_in(rng, 2)),
    }
    state_sharding = tree_shardings(state, mesh, rules)
    state = jax.device_put(state, state_sharding)
    memory = {
        "memory/train_state_bytes": algos.tree_bytes(state),
        "memory/frozen_bytes": algos.tree_bytes(frozen),
        "memory/value_param_bytes": algos.tree_bytes(params.get("value", params.get("value_head", {}))),
    }

    def to_save(state):  # checkpoints also hold the frozen bases, so the workdir is self-contained
        return dict(state, frozen=frozen) if frozen else state

    kl_ctl = make_kl_controller(
        kind=config.kl.kind, init_beta=config.kl.init_beta, target=config.kl.target, horizon=config.kl.horizon
    )
    report_start(
        config,
        trainable=state["params"],
        frozen=frozen,
        opt_state=state["opt_state"],
        data_stats={"prompts": prompts.stats},
        extra_frozen={"reference": ref_params, "reward": reward_params},
    )
    ckpt, restored, extra, start_step = open_checkpoints(
        workdir, to_save(state), save_every=tc.save_every, keep=tc.keep_checkpoints, config=config
    )
    state = {k: v for k, v in restored.items() if k != "frozen"}
    frozen = restored.get("frozen", frozen)
    if start_step:
        kl_ctl.load_state_dict(extra["kl"])
    metrics_writer = open_metrics(workdir, config, resume_step=start_step if start_step else -1)
    samples_path = os.path.join(workdir, "samples.jsonl")
    _truncate_samples(samples_path, start_step)

    sc = config.sampling
    eos = tokenizer.eos_token_id
    stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in sc.stop_tokens.split(",") if t] if sc.stop_tokens else []
    settings = dict(
        max_new_tokens=sc.max_new_tokens,
        temperature=sc.temperature,
        top_k=sc.top_k,
        top_p=sc.top_p,
        eos_token_id=eos,
        stop_token_ids=stop_ids,
        missing_eos_penalty=config.reward.missing_eos_penalty,
        length_penalty=config.reward.get("length_penalty", 0.0),
        kl_estimator=config.kl.estimator,
        gamma=tc.gamma,
        lam=tc.lam,
        whiten_rewards=tc.whiten_rewards,
        advantage=algo.advantage,
        group_size=algo.group_size,
        group_eps=algo.group_eps,
        kl_in_loss=algo.kl_in_loss,
    )
    rollout_fn = jax.jit(make_rollout_fn(specs, settings))
    loss_fn = functools.partial(
        ppo_loss,
        specs=specs,
        temperature=sc.temperature,
        clip_eps=tc.clip_eps,
        vf_clip_eps=tc.vf_clip_eps,
        vf_coef=tc.vf_coef,
        variant=algo.variant,
        kl_in_loss=algo.kl_in_loss,
    )
    update_fn = jax.jit(
        functools.partial(
            ppo_update,
            tx=tx,
            loss_fn=loss_fn,
            ppo_epochs=tc.ppo_epochs,
            num_minibatches=tc.num_minibatches,
            accum_steps=tc.grad_accum_steps,
            group_size=algo.group_size,
        ),
        in_shardings=(state_sharding, batch_sharding(mesh), frozen_sharding),
        out_shardings=(state_sharding, replicated(mesh)),
        donate_argnums=(0,),
    )
    norm = jnp.asarray([reward.gain, reward.bias], jnp.float32)

    # K samples per prompt: batch_size / K prompts, each repeated K times (a group = K consecutive rows).
    batches = prompt_batches(
        prompts, batch_size=tc.batch_size // algo.group_size, seed=config.seed, start_step=start_step
    )
    update_keys = algos.update_keys(UPDATE_KEYS, algo)
    progress = Progress(tc.steps, initial=start_step, desc="ppo")
    step, last_saved, last, preempted = start_step, ckpt.latest_step(), {}, False
    timing = {"rollout": 0.0, "update": 0.0}
    with PreemptionHandler() as preemption:
        while step < tc.steps:
            _, batch = next(batches)
            batch = {k: np.repeat(batch[k], algo.group_size, axis=0) for k in ("input_ids", "attention_mask")}
            batch = shard_batch(local_rows(batch, mesh), mesh)
            beta = kl_ctl.value
            t1 = time.time()
            roll_rng = jax.random.fold_in(jax.random.key(config.seed + 1), step)
            rollout = rollout_fn(
                combine_params(state["params"], frozen),
                ref_params,
                reward_params,
                norm,
                jnp.float32(beta),
                batch["input_ids"],
                batch["attention_mask"],
                roll_rng,
            )
            rmetrics = jax.device_get(rollout_metrics(rollout, beta, critic=algo.critic, group_size=algo.group_size))
            t2 = time.time()
            state, umetrics = update_fn(state, {k: getattr(rollout, k) for k in update_keys}, frozen)
            umetrics = jax.device_get(umetrics)
            t3 = time.time()
            timing["rollout"] += t2 - t1
            timing["update"] += t3 - t2
            step += 1
            metrics = {
                **{k: float(v) for k, v in rmetrics.items()},
                **{k: float(v) for k, v in umetrics.items()},
                "kl/beta": beta,
                "time/rollout_s": t2 - t1,
                "time/update_s": t3 - t2,
            }
            finite_keys = (
                ("objective/scores", "val/vf_loss", "policy/pg_loss")
                if algo.critic
                else ("objective/scores", "policy/pg_loss")
            )  # critic-free: no value loss
            for key in finite_keys:
                check_finite(metrics[key], step=step, name=key, workdir=workdir, last_checkpoint_step=last_saved)
            kl_ctl.update(metrics["objective/kl"], tc.batch_size)
            if step % tc.log_every == 0 or step == tc.steps:
                metrics_writer.write(step, metrics)
            if tc.samples_every and (step % tc.samples_every == 0 or step == tc.steps):
                _write_samples(samples_path, step, tokenizer, rollout, config.train.num_samples)
            last = metrics
            progress.update(1, score=metrics["objective/scores"], kl=metrics["objective/kl"])
            extra = {"step": step, "kl": kl_ctl.state_dict(), "data": data_identity}
            if ckpt.save(step, to_save(state), extra, force=step == tc.steps):
                last_saved = step
            if preemption.sync_requested():
                ckpt.save(step, to_save(state), extra, force=True)
                preempted = True
                break
    progress.close()
    ckpt.close()
    metrics_writer.close()
    if preempted:
        print(f"SIGTERM: saved a checkpoint at step {step}; re-run the same command to resume.", flush=True)
        return {"preempted_at": step}
    summary = dict(
        last,
        step=step,
        wall_time_s=time.time() - t0,
        **{f"time/total_{k}_s": v for k, v in timing.items()},
        **memory,
        **{"memory/peak_rss_mib": algos.peak_rss_mib()},
    )
    write_json(os.path.join(workdir, "summary.json"), summary)
    plot_training_curves(
        workdir,
        (
            "objective/scores",
            "objective/kl",
            "objective/rlhf_reward",
            "objective/entropy",
            "policy/approxkl",
            "policy/clipfrac",
            "val/vf_loss",
            "kl/beta",
            "rollout/response_length",
        ),
        title=f"PPO, step {step}",
    )
    print(
        f"done: step {step}; score {last.get('objective/scores', float('nan')):.4f}, "
        f"KL {last.get('objective/kl', float('nan')):.4f}, beta {last.get('kl/beta', float('nan')):.4g}",
        flush=True,
    )
    return summary


def _truncate_samples(path, step):
    if not is_main_process() or not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(keep)


def _write_samples(path, step, tokenizer, rollout: Rollout, n):
    # All processes call this: the rollout's rows live on every process and are gathered first.
    first = (rollout.query_ids, rollout.query_mask, rollout.response_ids, rollout.response_mask, rollout.scores)
    q, qm, r, rmask, scores = gather_to_host(jax.tree.map(lambda x: x[:n], first))
    if not is_main_process():
        return
    with open(path, "a") as f:
        for i in range(min(n, len(q))):
            prompt = tokenizer.decode(q[i][qm[i] > 0], skip_special_tokens=True)
            response = tokenizer.decode(r[i][rmask[i] > 0], skip_special_tokens=True)
            f.write(
                json.dumps({"step": step, "prompt": prompt, "response": response, "score": float(scores[i])}) + "\n"
            )
