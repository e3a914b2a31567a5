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

Ensemble reward: reward.workdir = an ensemble run (model.ensemble_size = K, rm/ensemble_train.py) scores every
rollout with all K members, each normalised by its own gain / bias, combined by reward.objective
(mean | wco | uwo with reward.uwo_lambda; rm/ensemble.py); the value model starts from member 0.
"""

from __future__ import annotations

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from common import data_io, throughput
from common.data_io import split_files
from common.distributed import gather_to_host, is_main_process
from common.loop import LoopHooks, open_checkpoints, run_train_loop, start_run
from common.mesh import batch_sharding, local_rows, replicated, shard_batch
from common.optim import optimizer_from_config
from common.tracking import open_metrics, plot_training_curves, report_start
from common.train_state import build_train_state, lora_settings, mesh_and_rules
from common.workdir import append_jsonl, save_model_files, write_json
from models.adapters import add_lora_and_quant, split_trainable
from models.heads import ScalarHead
from models.lora import combine_params
from models.scan import match_layout
from models.sharding import shard_params, with_layer_sharding
from ppo import algorithms as algos
from ppo.data import load_prompts, prompt_batches
from ppo.kl import make_kl_controller
from ppo.loading import frozen_reward, load_models, reference_model
from ppo.rollout import ModelSpecs, Rollout, make_rollout_fn, rollout_metrics
from ppo.update import UPDATE_KEYS, ppo_loss, ppo_update, separate_optimizers

_reference = reference_model  # the name tests/lora_trainers_test.py imports


def train(config, workdir: str) -> dict:
    """Run PPO as configured; returns the last metrics."""
    t0 = time.time()
    for key, value in (("policy.init_from", config.policy.init_from), ("data.prompt_files", config.data.prompt_files)):
        if not value:
            raise ValueError(f"config.{key} is required")
    run = start_run(config, workdir)  # config, mesh and path checks, resume comparison: before any data
    tokenizer = data_io.load_tokenizer(config.policy.tokenizer or config.policy.init_from, setting="policy.tokenizer")
    prompt_files = split_files(config.data.prompt_files)
    prompts = load_prompts(
        prompt_files, tokenizer, max_prompt_length=config.data.max_prompt_length, on_bad_row=config.data.on_bad_row
    )
    data_identity = run.check_data(prompt_files, rows=prompts.stats["rows"])
    write_json(os.path.join(workdir, "data_stats.json"), prompts.stats)

    mesh, rules = mesh_and_rules(config.mesh)
    policy_config, policy_params, reward_members = load_models(config, tokenizer, mesh, rules)
    reward = reward_members[0]
    rng = jax.random.key(config.seed)
    pc, vc = config.policy, config.value
    policy_config, policy_params = add_lora_and_quant(
        policy_config,
        policy_params,
        **lora_settings(pc),
        rng=jax.random.fold_in(rng, 4),
        where="policy",
    )
    save_model_files(workdir, policy_config, tokenizer)  # records lora_* / quant: ppo.export merges the adapters
    head_on_policy = vc.init == "policy_head"
    if vc.init not in ("reward", "policy_head"):
        raise ValueError(f"config.value.init={vc.init!r}; expected 'reward' or 'policy_head'")
    reward_config, reward_params, rm_config, rm_params = frozen_reward(config, reward)
    if len(reward_members) > 1:  # K members scored together: params stacked [K, ...] (replicated), norm [K, 2]
        reward_params = jax.tree.map(
            lambda *leaves: jnp.stack(leaves), *[frozen_reward(config, m)[1] for m in reward_members]
        )
    ref_adapters_off, ref_config, ref_params = reference_model(pc, policy_config, policy_params)
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
            **lora_settings(vc),
            rng=jax.random.fold_in(rng, 5),
            where="value",
        )
        value_config = value_config.replace(scan_layers=vc.get("scan_layers", False), mlp_chunk=vc.get("mlp_chunk", 0))
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
    lora = {
        "policy": policy_config.lora_rank > 0,
        "value": algo.critic and not head_on_policy and value_config.lora_rank > 0,
    }
    params, frozen = split_trainable({"policy": policy_params, **value_tree}, lora)
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
    if sequential_value := bool(tc.get("sequential_value_update", False)):  # one AdamW per model: state keyed by it
        tx = separate_optimizers(tx)  # ppo_update refuses a run without a separate value model

    built = build_train_state(params, frozen, tx, mesh=mesh, rules=rules, rng=jax.random.fold_in(rng, 2))
    state, state_sharding, frozen, frozen_sharding = (
        built.state,
        built.state_sharding,
        built.frozen,
        built.frozen_sharding,
    )
    ref_params = None if ref_params is None else shard_params(ref_params, mesh, rules)  # frozen models: same rules
    reward_params = (
        shard_params(reward_params, mesh, rules)
        if len(reward_members) == 1
        else jax.device_put(reward_params, replicated(mesh))
    )
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
        reward_objective=config.reward.get("objective", "mean"),
        uwo_lambda=config.reward.get("uwo_lambda", 1.0),
        kl_estimator=config.kl.estimator,
        gamma=tc.gamma,
        lam=tc.lam,
        whiten_rewards=tc.whiten_rewards,
        advantage=algo.advantage,
        group_size=algo.group_size,
        group_eps=algo.group_eps,
        kl_in_loss=algo.kl_in_loss,
    )
    rollout_stages = make_rollout_fn(specs, settings)
    generate_fn, score_fn = jax.jit(rollout_stages.generate), jax.jit(rollout_stages.score)  # timed apart
    peak, peak_source = throughput.peak_flops(float(config.logging.get("peak_flops", 0.0)))
    print(f"throughput: MFU against {'no peak' if peak is None else f'{peak:.3g} FLOP/s'} ({peak_source})", flush=True)
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
            with_layer_sharding(ppo_update, mesh, rules),  # scanned layers: per-layer params/grads sharded
            tx=tx,
            loss_fn=loss_fn,
            ppo_epochs=tc.ppo_epochs,
            num_minibatches=tc.num_minibatches,
            accum_steps=tc.grad_accum_steps,
            group_size=algo.group_size,
            sequential_value_update=sequential_value,
        ),
        in_shardings=(state_sharding, batch_sharding(mesh), frozen_sharding),
        out_shardings=(state_sharding, replicated(mesh)),
        donate_argnums=(0,),
    )
    norm = jnp.asarray([[m.gain, m.bias] for m in reward_members], jnp.float32)
    norm = norm[0] if len(reward_members) == 1 else norm

    update_keys = algos.update_keys(UPDATE_KEYS, algo)
    timing = {"rollout": 0.0, "update": 0.0, "generation": 0.0, "scoring": 0.0}
    latest = {}  # the last rollout, for samples.jsonl

    def ppo_step(state, numbered_batch):
        """One PPO iteration: rollout with the current policy, then the jitted update; host metrics."""
        step, batch = numbered_batch
        batch = {k: np.repeat(batch[k], algo.group_size, axis=0) for k in ("input_ids", "attention_mask")}
        batch = shard_batch(local_rows(batch, mesh), mesh)
        beta = kl_ctl.value
        t1 = time.time()
        roll_rng = jax.random.fold_in(jax.random.key(config.seed + 1), step)
        full = combine_params(state["params"], frozen)
        sample = jax.block_until_ready(generate_fn(full, batch["input_ids"], batch["attention_mask"], roll_rng))
        t_generated = time.time()
        query = (batch["input_ids"], batch["attention_mask"])
        rollout = score_fn(full, ref_params, reward_params, norm, jnp.float32(beta), *query, sample)
        rmetrics = jax.device_get(rollout_metrics(rollout, beta, critic=algo.critic, group_size=algo.group_size))
        t2 = time.time()
        state, umetrics = update_fn(state, {k: getattr(rollout, k) for k in update_keys}, frozen)
        umetrics = jax.device_get(umetrics)
        t3 = time.time()
        timing["rollout"] += t2 - t1
        timing["update"] += t3 - t2
        timing["generation"] += t_generated - t1
        timing["scoring"] += t2 - t_generated
        latest["rollout"] = rollout
        metrics = {
            **{k: float(v) for k, v in rmetrics.items()},
            **{k: float(v) for k, v in umetrics.items()},
            "kl/beta": beta,
            "time/rollout_s": t2 - t1,  # generation + scoring
            "time/update_s": t3 - t2,
            "time/generation_s": t_generated - t1,
            "time/scoring_s": t2 - t_generated,
            **throughput.ppo_iteration_perf(
                specs,
                rollout,
                times=(t_generated - t1, t2 - t_generated, t3 - t2),
                epochs=tc.ppo_epochs,
                peak=peak,
                reward_members=len(reward_members),
            ),
        }
        return state, metrics

    def after_step(step, state, metrics):  # metrics already checked finite
        kl_ctl.update(metrics["objective/kl"], tc.batch_size)
        if tc.samples_every and (step % tc.samples_every == 0 or step == tc.steps):
            _write_samples(samples_path, step, tokenizer, latest["rollout"], config.train.num_samples)

    loop = run_train_loop(
        step_fn=ppo_step,
        state=state,
        batches=prompt_batches(
            prompts, batch_size=tc.batch_size // algo.group_size, seed=config.seed, start_step=start_step
        ),  # K samples per prompt: batch_size / K prompts, each repeated K times (a group = K consecutive rows)
        start_step=start_step,
        total_steps=tc.steps,
        ckpt=ckpt,
        metrics_writer=metrics_writer,
        workdir=workdir,
        log_every=tc.log_every,
        eval_every=0,
        run_eval=lambda step, state: None,
        to_save=to_save,
        desc="ppo",
        progress_keys={"score": "objective/scores", "kl": "objective/kl"},
        extra={"data": data_identity},
        hooks=LoopHooks(
            on_step=after_step,
            checkpoint_extra=lambda: {"kl": kl_ctl.state_dict()},
            metrics_prefix="",
            reduce="last",
            # critic-free: no value loss
            finite_keys=("objective/scores", "val/vf_loss", "policy/pg_loss")
            if algo.critic
            else ("objective/scores", "policy/pg_loss"),
            save_last=True,
        ),
    )
    state, step, last = loop.state, loop.step, loop.last_metrics
    ckpt.close()
    metrics_writer.close()
    if loop.preempted:
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
    append_jsonl(
        path,
        (
            {
                "step": step,
                "prompt": tokenizer.decode(q[i][qm[i] > 0], skip_special_tokens=True),
                "response": tokenizer.decode(r[i][rmask[i] > 0], skip_special_tokens=True),
                "score": float(scores[i]),
            }
            for i in range(min(n, len(q)))
        ),
    )
