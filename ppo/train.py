"""PPO against a trained reward model: `train(config, workdir)`.

Launch (see configs/ppo.py):
  python -m experiments.run --config configs/ppo.py --workdir W --config.policy.init_from=HF_DIR \
      --config.reward.workdir=RM_WORKDIR --config.data.prompt_files=PROMPTS.jsonl --config.train.steps=50

Each step: one rollout batch (ppo/rollout.py), then `ppo_epochs` passes over shuffled
minibatches of it with gradient accumulation, all in one jitted update. Trainable state:
{'policy', 'value'} (or {'policy', 'value_head'}); the reference policy and the reward model
are frozen trees passed as arguments. Writes metrics.jsonl, samples.jsonl, checkpoints/.
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

from common.checkpoint import CheckpointManager
from common.mesh import batch_sharding, make_mesh, replicated, shard_batch
from common.metrics import MetricsWriter, Progress, write_config_json
from common.optim import accumulate_gradients, make_optimizer
from common.run_utils import PreemptionHandler, check_finite
from models.hf import load_hf_checkpoint
from models.heads import ScalarHead
from models.sharding import DEFAULT_RULES, REPLICATED_RULES, shard_params, tree_shardings
from ppo import losses as L
from ppo.data import load_prompts, prompt_batches
from ppo.kl import make_kl_controller
from ppo.rollout import ModelSpecs, Rollout, make_rollout_fn, response_logits_and_values, rollout_metrics
from rm import data as rm_data
from rm.model import load_reward_model, save_model_config

UPDATE_KEYS = ("query_ids", "query_mask", "response_ids", "response_mask", "logprobs", "values", "advantages",
               "returns")


def ppo_loss(params, batch, _rng, *, specs, temperature, clip_eps, vf_clip_eps, vf_coef):
    """Clipped policy loss + vf_coef * clipped value loss on one micro-batch."""
    logits, values = response_logits_and_values(specs, params, batch["query_ids"], batch["query_mask"],
                                                batch["response_ids"], batch["response_mask"])
    maskf = batch["response_mask"].astype(jnp.float32)
    tempered = logits / temperature
    logprobs = L.logprobs_from_logits(tempered, batch["response_ids"])
    pg_loss, pg_m = L.policy_loss(logprobs, batch["logprobs"], batch["advantages"], maskf, clip_eps=clip_eps)
    vf_loss, vf_m = L.value_loss(values, batch["values"], batch["returns"], maskf, clip_eps=vf_clip_eps)
    entropy = L.masked_mean(L.entropy_from_logits(tempered), maskf)
    loss = pg_loss + vf_coef * vf_loss
    return loss, {"policy/pg_loss": pg_loss, "val/vf_loss": vf_loss, "policy/approxkl": pg_m["approxkl"],
                  "policy/clipfrac": pg_m["clipfrac"], "val/clipfrac": vf_m["vf_clipfrac"],
                  "policy/entropy": entropy, "policy/ratio": pg_m["ratio_mean"]}


def ppo_update(state, rollout: dict, *, tx, loss_fn, ppo_epochs, num_minibatches, accum_steps):
    """All PPO epochs over shuffled minibatches of one rollout batch, as one pure function.

    rollout: dict of UPDATE_KEYS arrays with leading dim B. Returns (state, mean metrics).
    """
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    b = rollout["query_ids"].shape[0]
    mb = b // num_minibatches
    perms = jax.vmap(lambda k: jax.random.permutation(k, b))(jax.random.split(jax.random.fold_in(rng, 1), ppo_epochs))
    order = perms.reshape(ppo_epochs * num_minibatches, mb)  # [E*M, mb] row indices

    def one_minibatch(carry, idx):
        params, opt_state, i = carry
        batch = jax.tree.map(lambda x: jnp.take(x, idx, axis=0), rollout)
        _, aux, grads = accumulate_gradients(loss_fn, params, batch, jax.random.fold_in(rng, i),
                                             accum_steps=accum_steps)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        aux = dict(aux, **{"policy/grad_norm": optax.tree.norm(grads)})
        return (params, opt_state, i + 1), aux

    (params, opt_state, _), aux = jax.lax.scan(one_minibatch, (state["params"], state["opt_state"], 0), order)
    metrics = jax.tree.map(jnp.mean, aux)
    return dict(state, params=params, opt_state=opt_state, step=state["step"] + 1), metrics


def _dump(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)


def _load_models(config, tokenizer):
    """Policy (+ reference copy), reward model, and value-model initialisation."""
    mc = config.policy
    policy_config, policy_params = load_hf_checkpoint(mc.init_from, dtype=mc.dtype, param_dtype=mc.param_dtype)
    policy_config = policy_config.replace(remat=mc.remat, remat_policy=mc.remat_policy)
    if policy_config.pad_token_id is None:
        policy_config = policy_config.replace(pad_token_id=tokenizer.pad_token_id)
    if bool(config.reward.workdir) == bool(config.reward.init_from):
        raise ValueError("set exactly one of config.reward.workdir (an RM workdir) and config.reward.init_from "
                         "(an exported Hugging Face reward folder)")
    reward = load_reward_model(config.reward.workdir or config.reward.init_from, dtype=config.reward.dtype)
    if reward.config.vocab_size < policy_config.vocab_size:
        raise ValueError(f"reward model vocab ({reward.config.vocab_size}) is smaller than the policy's "
                         f"({policy_config.vocab_size}): policy and reward model must share a tokenizer")
    if reward.tokenizer_path:
        rm_tok = rm_data.load_tokenizer(reward.tokenizer_path)
        probe = "The quick brown fox, 123!"
        if rm_tok(probe, add_special_tokens=False)["input_ids"] != tokenizer(probe, add_special_tokens=False)["input_ids"]:
            raise ValueError("the reward model's tokenizer differs from the policy's; PPO here scores token ids "
                             "directly, so both must share a tokenizer")
    return policy_config, policy_params, reward


def train(config, workdir: str) -> dict:
    """Run PPO as configured; returns the last metrics."""
    t0 = time.time()
    os.makedirs(workdir, exist_ok=True)
    write_config_json(workdir, config)
    for key, value in (("policy.init_from", config.policy.init_from), ("data.prompt_files", config.data.prompt_files)):
        if not value:
            raise ValueError(f"config.{key} is required")
    tokenizer = rm_data.load_tokenizer(config.policy.tokenizer or config.policy.init_from)
    prompts = load_prompts([f.strip() for f in str(config.data.prompt_files).split(",") if f.strip()], tokenizer,
                           max_prompt_length=config.data.max_prompt_length, on_bad_row=config.data.on_bad_row)
    _dump(os.path.join(workdir, "data_stats.json"), prompts.stats)

    policy_config, policy_params, reward = _load_models(config, tokenizer)
    save_model_config(workdir, policy_config)
    tokenizer.save_pretrained(os.path.join(workdir, "tokenizer"))
    rng = jax.random.key(config.seed)
    head_on_policy = config.value.init == "policy_head"
    if config.value.init not in ("reward", "policy_head"):
        raise ValueError(f"config.value.init={config.value.init!r}; expected 'reward' or 'policy_head'")
    specs = ModelSpecs(policy=policy_config, reward=reward.config, value=reward.config,
                       value_head_on_policy=head_on_policy)
    if head_on_policy:
        value_tree = {"value_head": ScalarHead(param_dtype=policy_config.param_dtype).init(
            jax.random.fold_in(rng, 3), jnp.zeros((1, policy_config.d_model)))["params"]}
    else:
        value_tree = {"value": jax.tree.map(jnp.array, reward.params)}  # a trainable copy of the RM
    params = {"policy": policy_params, **value_tree}
    ref_params = jax.tree.map(jnp.array, policy_params)

    tc = config.train
    if tc.batch_size % tc.num_minibatches or (tc.batch_size // tc.num_minibatches) % tc.grad_accum_steps:
        raise ValueError(f"train.batch_size={tc.batch_size} must split into num_minibatches={tc.num_minibatches} "
                         f"minibatches, each divisible by grad_accum_steps={tc.grad_accum_steps}")
    updates_total = tc.steps * tc.ppo_epochs * tc.num_minibatches
    tx, _ = make_optimizer(learning_rate=tc.learning_rate, total_steps=updates_total,
                           warmup_steps=min(tc.warmup_steps, max(updates_total - 1, 0)), weight_decay=tc.weight_decay,
                           max_grad_norm=tc.max_grad_norm, min_lr_ratio=tc.min_lr_ratio, eps=tc.adam_eps)

    mesh = make_mesh(tuple(config.mesh.shape), tuple(config.mesh.axis_names))
    rules = DEFAULT_RULES if config.mesh.fsdp_tp else REPLICATED_RULES
    params = shard_params(params, mesh, rules)
    ref_params = shard_params(ref_params, mesh, rules)
    reward_params = shard_params(reward.params, mesh, rules)
    opt_state = jax.jit(tx.init, out_shardings=tree_shardings(jax.eval_shape(tx.init, params), mesh, rules))(params)
    state = {"params": params, "opt_state": opt_state, "step": jnp.asarray(0, jnp.int32),
             "rng": jax.random.key_data(jax.random.fold_in(rng, 2))}
    state_sharding = tree_shardings(state, mesh, rules)
    state = jax.device_put(state, state_sharding)

    kl_ctl = make_kl_controller(kind=config.kl.kind, init_beta=config.kl.init_beta, target=config.kl.target,
                                horizon=config.kl.horizon)
    ckpt = CheckpointManager(os.path.join(workdir, "checkpoints"), save_every=tc.save_every,
                             max_to_keep=tc.keep_checkpoints)
    start_step = 0
    if ckpt.latest_step() is not None:
        state, extra = ckpt.restore(state)
        start_step = int(extra["step"])
        kl_ctl.load_state_dict(extra["kl"])
        print(f"Resuming from checkpoint at step {start_step} in {workdir}/checkpoints", flush=True)
    metrics_writer = MetricsWriter(workdir, resume_step=start_step if start_step else -1)
    samples_path = os.path.join(workdir, "samples.jsonl")
    _truncate_samples(samples_path, start_step)

    sc = config.sampling
    eos = tokenizer.eos_token_id
    stop_ids = [tokenizer.convert_tokens_to_ids(t) for t in sc.stop_tokens.split(",") if t] if sc.stop_tokens else []
    settings = dict(max_new_tokens=sc.max_new_tokens, temperature=sc.temperature, top_k=sc.top_k, top_p=sc.top_p,
                    eos_token_id=eos, stop_token_ids=stop_ids, missing_eos_penalty=config.reward.missing_eos_penalty,
                    kl_estimator=config.kl.estimator, gamma=tc.gamma, lam=tc.lam, whiten_rewards=tc.whiten_rewards)
    rollout_fn = jax.jit(make_rollout_fn(specs, settings))
    loss_fn = functools.partial(ppo_loss, specs=specs, temperature=sc.temperature, clip_eps=tc.clip_eps,
                                vf_clip_eps=tc.vf_clip_eps, vf_coef=tc.vf_coef)
    update_fn = jax.jit(functools.partial(ppo_update, tx=tx, loss_fn=loss_fn, ppo_epochs=tc.ppo_epochs,
                                          num_minibatches=tc.num_minibatches, accum_steps=tc.grad_accum_steps),
                        in_shardings=(state_sharding, batch_sharding(mesh)),
                        out_shardings=(state_sharding, replicated(mesh)), donate_argnums=(0,))
    norm = jnp.asarray([reward.gain, reward.bias], jnp.float32)

    batches = prompt_batches(prompts, batch_size=tc.batch_size, seed=config.seed, start_step=start_step)
    progress = Progress(tc.steps, initial=start_step, desc="ppo")
    step, last_saved, last, preempted = start_step, ckpt.latest_step(), {}, False
    timing = {"rollout": 0.0, "update": 0.0}
    with PreemptionHandler() as preemption:
        while step < tc.steps:
            _, batch = next(batches)
            batch = shard_batch({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, mesh)
            beta = kl_ctl.value
            t1 = time.time()
            roll_rng = jax.random.fold_in(jax.random.key(config.seed + 1), step)
            rollout = rollout_fn(state["params"], ref_params, reward_params, norm, jnp.float32(beta),
                                 batch["input_ids"], batch["attention_mask"], roll_rng)
            rmetrics = jax.device_get(rollout_metrics(rollout, beta))
            t2 = time.time()
            state, umetrics = update_fn(state, {k: getattr(rollout, k) for k in UPDATE_KEYS})
            umetrics = jax.device_get(umetrics)
            t3 = time.time()
            timing["rollout"] += t2 - t1
            timing["update"] += t3 - t2
            step += 1
            metrics = {**{k: float(v) for k, v in rmetrics.items()}, **{k: float(v) for k, v in umetrics.items()},
                       "kl/beta": beta, "time/rollout_s": t2 - t1, "time/update_s": t3 - t2}
            for key in ("objective/scores", "val/vf_loss", "policy/pg_loss"):
                check_finite(metrics[key], step=step, name=key, workdir=workdir, last_checkpoint_step=last_saved)
            kl_ctl.update(metrics["objective/kl"], tc.batch_size)
            if step % tc.log_every == 0 or step == tc.steps:
                metrics_writer.write(step, metrics)
            if tc.samples_every and (step % tc.samples_every == 0 or step == tc.steps):
                _write_samples(samples_path, step, tokenizer, rollout, config.train.num_samples)
            last = metrics
            progress.update(1, score=metrics["objective/scores"], kl=metrics["objective/kl"])
            extra = {"step": step, "kl": kl_ctl.state_dict()}
            if ckpt.save(step, state, extra, force=step == tc.steps):
                last_saved = step
            if preemption.sync_requested():
                ckpt.save(step, state, extra, force=True)
                preempted = True
                break
    progress.close()
    ckpt.close()
    if preempted:
        print(f"SIGTERM: saved a checkpoint at step {step}; re-run the same command to resume.", flush=True)
        return {"preempted_at": step}
    summary = dict(last, step=step, wall_time_s=time.time() - t0, **{f"time/total_{k}_s": v for k, v in timing.items()})
    _dump(os.path.join(workdir, "summary.json"), summary)
    print(f"done: step {step}; score {last.get('objective/scores', float('nan')):.4f}, "
          f"KL {last.get('objective/kl', float('nan')):.4f}, beta {last.get('kl/beta', float('nan')):.4g}", flush=True)
    return summary


def _truncate_samples(path, step):
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(keep)


def _write_samples(path, step, tokenizer, rollout: Rollout, n):
    if jax.process_index() != 0:
        return
    q, qm = np.asarray(rollout.query_ids), np.asarray(rollout.query_mask)
    r, rmask = np.asarray(rollout.response_ids), np.asarray(rollout.response_mask)
    scores = np.asarray(rollout.scores)
    with open(path, "a") as f:
        for i in range(min(n, len(q))):
            prompt = tokenizer.decode(q[i][qm[i] > 0])
            response = tokenizer.decode(r[i][rmask[i] > 0])
            f.write(json.dumps({"step": step, "prompt": prompt, "response": response, "score": float(scores[i])}) + "\n")
