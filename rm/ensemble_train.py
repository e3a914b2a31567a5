"""K reward models trained in one run (`model.ensemble_size = K`): rm/train.py's step vmapped over members.

  python -m experiments.run --config configs/rm.py --workdir W --config.model.ensemble_size=4 \
      --config.model.init_from=HF_DIR --config.data.train_files=A.jsonl --config.data.eval_files=B.jsonl

Member k is exactly the single run with `seed = config.seed + k`: its head (and LoRA adapters) are
initialised from that seed, its batches follow that seed's data order (optionally a bootstrap
resample of the training pairs, `model.ensemble_bootstrap`), and its step rngs are that seed's.
All members start from the same `model.init_from` backbone. The step is `rm.train.train_step`
under `jax.vmap` over the members' params, optimizer state, step counter and rng, with the frozen
base (LoRA / int8) shared, unbatched: one jitted step, and member k computes what the single run
computes (tests/rm_ensemble_train_test.py: equal to 1e-5). Members are independent: nothing couples
them during training. (Stacked heads on one shared frozen base are the LoRA case of the same code:
adapters + head per member, `frozen` broadcast.)

Workdir layout:
  W/config.json, metrics.jsonl (train/<key> = mean over members, train/m<k>/<key> per member;
     eval/m<k>/<key>; eval/ensemble/<objective>/accuracy), checkpoints/ (the stacked state, resume),
     ensemble.json ({'members': ['members/0', ...], 'seeds': [...]}), eval_final.json
  W/members/<k>/  a complete RM workdir per member (model_config.json, tokenizer/, config.json with
     that member's seed, checkpoints/, normalization.json, calibration.json, eval_final.json,
     reliability.png), which rm.score, rm.export, PPO and rm.ensemble read like any RM workdir.
`rm.ensemble.member_workdirs(W)` expands W to its member folders; `rm.score --workdir W` and PPO's
`reward.workdir=W` then score with the ensemble objective.

The members' parameters are replicated on every device (a leading [K] axis has no sharding rule);
batches [K, B, ...] are split over the data axis along B. One process only.
"""

from __future__ import annotations

import copy
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from common.distributed import is_main_process
from common.loop import flat_data_stats, open_checkpoints, run_train_loop
from common.mesh import make_mesh, replicated
from common.metrics import write_config_json
from common.optim import optimizer_from_config
from common.tracking import open_metrics, plot_training_curves
from common.workdir import save_model_files, write_json
from models.adapters import add_lora_and_quant, split_trainable
from models.lora import combine_params
from models.sharding import REPLICATED_RULES
from rm import data as rm_data
from rm.calibration import write_calibration
from rm.ensemble import OBJECTIVES, combine_scores, write_reward_workdir
from rm.evaluate import compute_normalization, plot_reliability_diagram, preference_metrics
from rm.model import rm_params_from_backbone

MEMBERS_DIR = "members"


def member_seeds(config) -> list[int]:
    """Seeds of the K members: config.seed + k."""
    return [int(config.seed) + k for k in range(int(config.model.ensemble_size))]


def member_train_data(train_data, *, seed: int, bootstrap: bool):
    """The pairs member `seed` trains on: all of them, or a bootstrap resample (N draws with replacement)."""
    if not bootstrap:
        return train_data
    rows = np.random.default_rng((seed, 7919)).integers(0, len(train_data), len(train_data))
    return train_data.select(rows)


def init_member(model_config_base, backbone, mc, seed):
    """(model_config, trainable, frozen, state) of the single run with this seed (rm/train.py's recipe)."""
    rng = jax.random.key(seed)
    params = rm_params_from_backbone(model_config_base, backbone, jax.random.fold_in(rng, 1))
    model_config, params = add_lora_and_quant(
        model_config_base,
        params,
        lora_rank=mc.lora_rank,
        lora_alpha=mc.lora_alpha,
        lora_targets=mc.lora_targets,
        lora_dropout=mc.lora_dropout,
        quant=mc.quant,
        rng=jax.random.fold_in(rng, 3),
        where="model",
    )
    trainable, frozen = split_trainable(params, lora=model_config.lora_rank > 0)
    return model_config, trainable, frozen, jax.random.key_data(jax.random.fold_in(rng, 2))


def stack_trees(trees):
    """[K] trees of one structure -> one tree with a leading [K] axis on every leaf."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def member_tree(tree, k: int):
    """Member k's slice of a stacked tree."""
    return jax.tree.map(lambda leaf: leaf[k], tree)


def stacked_batches(members_data, *, batch_size, seeds, start_step, bucket, trim_to_bucket):
    """Endless stacked batches {key: [K, B, ...]}: member k's batch `s` is the single run's batch `s`.

    Each member's batch is trimmed to `bucket` as in rm/train.py, then all are padded to the widest
    (padding columns are masked out, so a member's rewards do not depend on the others' widths)."""
    streams = [
        rm_data.train_batches(data, batch_size=batch_size, seed=seed, start_step=start_step)
        for data, seed in zip(members_data, seeds)
    ]
    while True:
        batches = [trim_to_bucket(next(stream)[1], bucket) for stream in streams]
        width = max(b["chosen_ids"].shape[1] for b in batches)

        def pad(value):  # extra columns are masked (mask 0) and after every real token: causal, never read
            if value.ndim != 2 or value.shape[1] == width:
                return value
            return np.pad(value, ((0, 0), (0, width - value.shape[1])))

        yield {key: np.stack([pad(b[key]) for b in batches]) for key in batches[0]}


def ensemble_step(state, batch, frozen, *, member_step):
    """vmap of rm.train.train_step over members; metrics: mean over members as <key>, member k as m<k>/<key>."""
    new_state, metrics = jax.vmap(member_step, in_axes=(0, 0, None))(state, batch, frozen)
    out = {key: jnp.mean(value) for key, value in metrics.items()}
    for key, value in metrics.items():
        for k in range(value.shape[0]):
            out[f"m{k}/{key}"] = value[k]
    return new_state, out


def train_ensemble(config, workdir: str, *, single) -> dict:
    """Train config.model.ensemble_size reward models in one run; returns the final eval summary.

    `single` is rm.train (it calls this): its train_step, evaluation, calibration and normalisation are
    the members' own, passed in rather than imported so the two modules form no import circle."""
    evaluate, pair_rewards, train_step = single.evaluate, single.pair_rewards, single.train_step
    t0 = time.time()
    K = int(config.model.ensemble_size)
    if K < 2:
        raise ValueError(f"config.model.ensemble_size={K}; the ensemble trainer needs K >= 2 (1 = rm/train.py)")
    if jax.process_count() > 1:
        raise ValueError("config.model.ensemble_size > 1 runs in one process only (members are replicated)")
    run, tokenizer, train_data, eval_data, data_identity, stats = single.start_and_load_data(config, workdir)
    seeds = member_seeds(config)
    bootstrap = bool(config.model.get("ensemble_bootstrap", False))
    members_data = [member_train_data(train_data, seed=s, bootstrap=bootstrap) for s in seeds]

    # ---- K members, each initialised as the single run with its seed
    # Members are replicated on the mesh: the backbone loads straight onto every device (no one device first).
    mesh = make_mesh(tuple(config.mesh.shape), tuple(config.mesh.axis_names))
    model_config, backbone = single.load_backbone(config, tokenizer, mesh, REPLICATED_RULES)
    inits = [init_member(model_config, backbone, config.model, s) for s in seeds]
    del backbone
    model_config, frozen = inits[0][0], inits[0][2]  # frozen base: the same for every member (seed-free)
    tc = config.train
    tx, schedule = optimizer_from_config(tc, total_steps=tc.steps)
    trainable = stack_trees([i[1] for i in inits])
    state = {
        "params": trainable,
        "opt_state": jax.vmap(tx.init)(trainable),
        "step": jnp.zeros((K,), jnp.int32),
        "rng": jnp.stack([i[3] for i in inits]),
    }
    del inits, trainable
    save_model_files(workdir, model_config, tokenizer)
    state = jax.device_put(state, replicated(mesh))
    frozen = jax.device_put(frozen, replicated(mesh))

    def to_save(state):
        return dict(state, frozen=frozen) if frozen else state

    ckpt, restored, _, start_step = open_checkpoints(
        workdir, to_save(state), save_every=tc.save_every, keep=tc.keep_checkpoints, config=config
    )
    state = {k: v for k, v in restored.items() if k != "frozen"}
    frozen = restored.get("frozen", frozen)
    metrics_writer = open_metrics(workdir, config, resume_step=start_step if start_step else -1)
    if start_step == 0:
        metrics_writer.write(0, flat_data_stats(stats))

    member_step = functools.partial(
        train_step,
        model_config=model_config,
        tx=tx,
        schedule=schedule,
        accum_steps=tc.grad_accum_steps,
        center_coef=tc.center_coef,
        use_margin=bool(tc.use_margin and train_data.has_margin),
        nan_step=config.debug.inject_nan_at_step,
        label_smoothing=float(tc.label_smoothing),
        tie_model=str(tc.tie_model),
        tie_theta=float(tc.tie_theta),
    )
    batch_split = NamedSharding(mesh, P(None, tuple(config.mesh.axis_names[:1])))  # [K, B, ...]: B over data
    step_fn = jax.jit(
        functools.partial(ensemble_step, member_step=member_step),
        in_shardings=(replicated(mesh), batch_split, replicated(mesh)),
        out_shardings=(replicated(mesh), replicated(mesh)),
        donate_argnums=(0,),
    )
    eval_fn = jax.jit(functools.partial(pair_rewards, model_config), out_shardings=replicated(mesh))
    eval_bs, bucket = config.eval.batch_size, config.data.bucket

    def member_params(state, k):
        return combine_params(member_tree(state["params"], k), frozen)

    def eval_members(state):
        return [
            evaluate(eval_fn, member_params(state, k), eval_data, batch_size=eval_bs, bucket=bucket) for k in range(K)
        ]

    def ensemble_eval_metrics(rewards, uwo_lambda=1.0):
        out = {}
        for k, (chosen, rejected) in enumerate(rewards):
            m = preference_metrics(chosen, rejected, subsets=eval_data.subset, n_bins=config.eval.n_bins)
            out.update({f"eval/m{k}/{key}": v for key, v in m.items()})
        for name in ("accuracy", "ece", "brier"):
            values = [out[f"eval/m{k}/{name}"] for k in range(K) if f"eval/m{k}/{name}" in out]
            if values:
                out[f"eval/{name}"] = float(np.mean(values))  # member mean (training curves, progress)
        # Ensemble accuracy on raw rewards, each member standardised on the eval responses (the
        # normalisation it gets at the end with eval.normalize_on='eval').
        both = [np.concatenate(r) for r in rewards]
        z = np.stack([(b - b.mean()) / max(b.std(), 1e-12) for b in both])  # [K, 2N]
        n = len(eval_data)
        for objective in OBJECTIVES:
            combined = combine_scores(z, objective=objective, uwo_lambda=uwo_lambda)
            out[f"eval/ensemble/{objective}/accuracy"] = float(np.mean(combined[:n] > combined[n:]))
        return out

    def run_eval(step, state):
        if eval_data is None:
            return {}
        out = ensemble_eval_metrics(eval_members(state))
        metrics_writer.write(step, out)
        return out

    batches = stacked_batches(
        members_data, batch_size=tc.batch_size, seeds=seeds, start_step=start_step, bucket=bucket,
        trim_to_bucket=single.trim_to_bucket,
    )  # fmt: skip
    loop = run_train_loop(
        step_fn=lambda s, b: step_fn(s, b, frozen),
        state=state,
        batches=(jax.device_put(b, batch_split) for b in batches),
        start_step=start_step,
        total_steps=tc.steps,
        ckpt=ckpt,
        metrics_writer=metrics_writer,
        workdir=workdir,
        log_every=tc.log_every,
        eval_every=tc.eval_every,
        run_eval=run_eval,
        to_save=to_save,
        desc=f"rm x{K}",
        progress_keys=("loss", "accuracy"),
        extra={"data": data_identity},
    )
    state, step = loop.state, loop.step
    if loop.preempted:
        ckpt.close()
        metrics_writer.close()
        return {"preempted_at": step}

    final = run_eval(step, state)
    members = []
    for k, seed in enumerate(seeds):
        members.append(
            _finish_member(
                config, workdir, k, seed, model_config, member_tree(state["params"], k), frozen,
                eval_fn=eval_fn, train_data=members_data[k], eval_data=eval_data, tokenizer=tokenizer, step=step,
                data_identity=data_identity, single=single,
            )
        )  # fmt: skip
    ckpt.save(step, to_save(state), {"step": step, "data": data_identity, "members": len(seeds)}, force=True)
    ckpt.close()
    metrics_writer.close()
    if is_main_process():
        write_json(
            os.path.join(workdir, "ensemble.json"),
            {"members": [os.path.join(MEMBERS_DIR, str(k)) for k in range(K)], "seeds": seeds, "bootstrap": bootstrap},
        )
    plot_training_curves(
        workdir, ("train/loss", "train/accuracy", "eval/accuracy", "eval/ensemble/mean/accuracy"), title=f"{K} RMs"
    )
    summary = dict(final, step=step, wall_time_s=time.time() - t0, members=members, data=flat_data_stats(stats))
    write_json(os.path.join(workdir, "eval_final.json"), summary)
    accs = [m.get("eval/accuracy") for m in members]
    print(f"done: {K} reward models, step {step} in {summary['wall_time_s']:.1f}s; member eval accuracy {accs}")
    return summary


def _finish_member(
    config, workdir, k, seed, model_config, trainable, frozen, *, eval_fn, train_data, eval_data, tokenizer, step,
    data_identity, single,
):  # fmt: skip
    """Member k's final evaluation, calibration and normalisation (rm/train.py's: `single`), as an RM workdir."""
    evaluate, fit_calibration, final_diagnostics = single.evaluate, single.fit_calibration, single.final_diagnostics
    out_dir = os.path.join(workdir, MEMBERS_DIR, str(k))
    member_config = copy.deepcopy(config)
    member_config.seed = seed
    member_config.model.ensemble_size = 1
    params = combine_params(trainable, frozen)
    eval_bs, bucket = config.eval.batch_size, config.data.bucket
    final = {"seed": seed}
    calibration = {"temperature": 1.0, "source": "none", "n": 0, "reason": "no eval files"}
    os.makedirs(out_dir, exist_ok=True)
    if eval_data is not None:
        chosen, rejected = evaluate(eval_fn, params, eval_data, batch_size=eval_bs, bucket=bucket)
        m = preference_metrics(chosen, rejected, subsets=eval_data.subset, n_bins=config.eval.n_bins)
        final.update({f"eval/{key}": v for key, v in m.items()})
        calibration = fit_calibration(
            member_config, eval_fn, params, eval_data, tokenizer, chosen, rejected, batch_size=eval_bs, bucket=bucket
        )
        final.update(final_diagnostics(member_config, eval_data, chosen, rejected, calibration))
        if is_main_process():
            plot_reliability_diagram(
                chosen,
                rejected,
                os.path.join(out_dir, "reliability.png"),
                n_bins=config.eval.n_bins,
                title=f"reward model {k} (seed {seed}), step {step}",
                temperature=calibration["temperature"],
            )
    norm_rewards, norm_source = single.normalization_rewards(
        member_config, eval_fn, params, train_data, eval_data, tokenizer, batch_size=eval_bs, bucket=bucket
    )
    gain, bias = compute_normalization(norm_rewards)
    normalization = {
        "gain": gain,
        "bias": bias,
        "source": norm_source,
        "requested": str(config.eval.normalize_on),
        "n": int(norm_rewards.size),
    }
    if is_main_process():
        write_config_json(out_dir, member_config)
        write_reward_workdir(
            out_dir,
            model_config,
            jax.device_get(trainable),
            tokenizer_dir=os.path.join(workdir, "tokenizer"),
            normalization=normalization,
            frozen=jax.device_get(frozen) if frozen else None,
            step=step,
            extra={"data": data_identity, "calibration": calibration, "ensemble_member": k},
        )
        write_calibration(out_dir, calibration)
        write_json(os.path.join(out_dir, "eval_final.json"), dict(final, step=step, normalization=normalization))
    return dict(final, normalization=normalization, calibration=calibration)
