"""Reward-model training with the Bradley-Terry loss: `train(config, workdir)`.

Launch (see configs/rm.py):
  python -m experiments.run --config configs/rm.py --workdir W --config.model.init_from=HF_DIR \
      --config.data.train_files=A.jsonl --config.data.eval_files=B.jsonl --config.train.steps=300

The workdir gets config.json, model_config.json, tokenizer/, metrics.jsonl, checkpoints/,
data_stats.json, normalization.json, reliability.png, training_curves.png, eval_final.json,
provenance.json, tensorboard/ (and config_history.jsonl when a resume changed the config). Re-running the same
command resumes from the latest checkpoint; the data order depends only on (seed, step), so a
killed-and-resumed run ends with the same parameters as an uninterrupted one.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time

import jax
import jax.numpy as jnp
import optax

from common import data_io, packing, throughput
from common.data_io import split_files
from common.distributed import is_main_process
from common.loop import flat_data_stats, open_checkpoints, run_train_loop, start_run
from common.mesh import batch_sharding, data_axis_size, local_rows, replicated, shard_batch
from common.optim import accumulate_gradients, optimizer_from_config
from common.tracking import open_metrics, plot_training_curves, report_start
from common.train_state import build_train_state, load_pretrained, lora_settings, mesh_and_rules
from common.workdir import save_model_files, write_json
from models.adapters import add_lora_and_quant, split_trainable
from models.lora import combine_params
from models.sharding import with_layer_sharding
from rm import data as rm_data
from rm.calibration import write_calibration
from rm.data import trim_to_bucket
from rm.evaluate import compute_normalization, plot_reliability_diagram, preference_metrics
from rm.final_eval import evaluate, final_diagnostics, fit_calibration, normalization_rewards
from rm.losses import TIE_MODELS, bradley_terry_loss
from rm.model import compute_packed_rewards, compute_rewards, rm_params_from_backbone

log = logging.getLogger(__name__)


def pair_rewards(model_config, params, batch, dropout_rng=None):
    """Rewards of chosen and rejected in one forward pass over [2B, T] (LoRA dropout on with `dropout_rng`)."""
    ids = jnp.concatenate([batch["chosen_ids"], batch["rejected_ids"]], axis=0)
    mask = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], axis=0)
    rewards = compute_rewards(model_config, params, ids, mask, dropout_rng)
    b = batch["chosen_ids"].shape[0]
    return rewards[:b], rewards[b:]


def packed_pair_rewards(model_config, params, batch, dropout_rng=None):
    """Rewards of chosen and rejected [G * P] from a packed batch (common/packing.py pack_pairs),
    in the unpacked batch's pair order: one forward over the G * R packed rows."""
    g, r, t = batch["input_ids"].shape
    rewards = compute_packed_rewards(
        model_config,
        params,
        batch["input_ids"].reshape(g * r, t),
        batch["segment_ids"].reshape(g * r, t),
        batch["read_at"].reshape(g * r, -1),
        dropout_rng,
    ).reshape(g, -1)  # [G, R * K], slot row * K + k
    chosen = jnp.take_along_axis(rewards, batch["chosen_slot"], axis=1).reshape(-1)  # [G * P]
    rejected = jnp.take_along_axis(rewards, batch["rejected_slot"], axis=1).reshape(-1)
    return chosen, rejected


def batch_token_stats(batch, *, window=None):
    """Real tokens, attended pairs and pad fractions of a padded or packed preference batch (device metrics)."""
    if "segment_ids" in batch:
        out = throughput.token_stats(batch["segment_ids"], batch["positions"], window=window)
        out["pad_fraction_unpacked"] = 1.0 - out["tokens"] / jnp.sum(batch["padded_tokens"])
    else:
        masks = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]], axis=0)
        out = throughput.token_stats(masks, throughput.positions_of_mask(masks), window=window)
    out["pad_fraction"] = 1.0 - out["tokens"] / out["slots"]
    return out


def train_step(
    state,
    batch,
    frozen=None,
    *,
    model_config,
    tx,
    schedule,
    accum_steps,
    center_coef,
    use_margin,
    nan_step,
    label_smoothing=0.0,
    tie_model="none",
    tie_theta=1.5,
):
    """One optimizer step (with gradient accumulation). Pure: (state, batch, frozen) -> (state, metrics).

    state['params'] is the trainable tree only (all params, or LoRA adapters + head); `frozen`
    is the rest (the frozen, possibly int8, base; None or {} without LoRA). Gradients and
    optimizer moments exist only for the trainable tree; the two are joined inside the loss.
    """
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    frozen = frozen or {}
    packed = "segment_ids" in batch  # common/packing.py rows: pair leaves are [G, P], flattened in pair order
    rewards_fn = packed_pair_rewards if packed else pair_rewards

    def loss_fn(params, micro, micro_rng):
        dropout_rng = micro_rng if model_config.lora_dropout > 0 else None
        chosen, rejected = rewards_fn(model_config, combine_params(params, frozen), micro, dropout_rng)
        margin = micro["margin"].reshape(-1) if use_margin else None
        labels = micro["label"].reshape(-1) if "label" in micro else None
        return bradley_terry_loss(
            chosen,
            rejected,
            margin=margin,
            center_coef=center_coef,
            labels=labels,
            label_smoothing=label_smoothing,
            tie_model=tie_model,
            tie_theta=tie_theta,
        )

    loss, aux, grads = accumulate_gradients(loss_fn, state["params"], batch, rng, accum_steps=accum_steps)
    # Fault injection for testing the NaN guard (nan_step < 0: never).
    loss = jnp.where(state["step"] == nan_step, jnp.nan, loss)
    grads = jax.tree.map(lambda g: jnp.where(state["step"] == nan_step, jnp.nan, g), grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = dict(aux, loss=loss, grad_norm=optax.tree.norm(grads), learning_rate=schedule(state["step"]))
    metrics.update(batch_token_stats(batch, window=model_config.sliding_window))
    new_state = dict(state, params=params, opt_state=opt_state, step=state["step"] + 1)
    return new_state, metrics


def pack_layout(config, data, mesh) -> packing.PackLayout:
    """The static packed-batch layout of this run (data.packing): one group of consecutive pairs per
    micro-batch and data shard, segments per row the maximum any training step needs, rows one of
    data.pack_row_buckets row counts (1: the maximum any training step needs)."""
    tc = config.train
    groups = tc.grad_accum_steps * data_axis_size(mesh)
    if tc.batch_size % groups:
        raise ValueError(
            f"config.data.packing needs train.batch_size={tc.batch_size} divisible by grad_accum_steps x data "
            f"shards = {groups} (one packing group each)"
        )
    n = len(data)
    return packing.plan_pair_layout(
        data.chosen_mask.sum(1),
        data.rejected_mask.sum(1),
        lambda step: data_io.batch_indices(n, batch_size=tc.batch_size, seed=config.seed, step=step),
        steps=range(tc.steps),
        groups=groups,
        length=config.data.max_length,
        rows=config.data.get("pack_rows", 0),
        max_segments=config.data.get("pack_segments", 0),
        row_buckets=config.data.get("pack_row_buckets", 1),
    )


def check_loss_options(config):
    """ValueError naming the field unless the soft-label / tie / calibration options are valid."""
    tc = config.train
    if tc.tie_model not in TIE_MODELS:
        raise ValueError(f"config.train.tie_model={tc.tie_model!r}; expected one of {TIE_MODELS}")
    if not 0.0 <= tc.label_smoothing < 0.5:
        raise ValueError(f"config.train.label_smoothing={tc.label_smoothing}; expected a number in [0, 0.5)")
    if tc.tie_model == "rao_kupper" and not tc.tie_theta > 1.0:
        raise ValueError(f"config.train.tie_theta={tc.tie_theta}; Rao-Kupper needs theta > 1 (theta = 1: no ties)")
    source = str(config.eval.calibrate_on)
    if not source:
        raise ValueError("config.eval.calibrate_on is empty; expected 'eval', 'none' or preference files")
    for path in split_files(source) if source not in ("eval", "none") else []:
        # Checked now, not after the whole run: a local-looking path that is missing.
        if os.path.splitext(path)[1].lower() in data_io.LOCAL_BUILDERS and not os.path.exists(path):
            raise FileNotFoundError(f"config.eval.calibrate_on: {path}: no such file")


def start_and_load_data(config, workdir: str):
    """Checks the config, starts the run (resume comparison before any data) and loads the preference
    files; shared by the single and the ensemble trainer. Returns (run, tokenizer, train_data,
    eval_data or None, data_identity, stats), stats as written to data_stats.json."""
    if not config.model.init_from:
        raise ValueError("config.model.init_from is required: a Hugging Face folder (SFT or base checkpoint)")
    if not split_files(config.data.train_files):
        raise ValueError("config.data.train_files is empty: give one or more preference files (comma-separated)")
    check_loss_options(config)
    run = start_run(config, workdir)  # config, mesh and path checks, resume comparison: before any data
    tokenizer = data_io.load_tokenizer(config.model.tokenizer or config.model.init_from)
    load = functools.partial(
        rm_data.load_preference_data,
        tokenizer=tokenizer,
        max_length=config.data.max_length,
        on_bad_row=config.data.on_bad_row,
    )
    train_files = split_files(config.data.train_files)
    train_data = load(train_files)
    data_identity = run.check_data(train_files, rows=train_data.stats["rows"])
    eval_files = split_files(config.data.eval_files)
    eval_data = load(eval_files) if eval_files else None
    stats = {"train": train_data.stats, "eval": eval_data.stats if eval_data else None}
    write_json(os.path.join(workdir, "data_stats.json"), stats)
    return run, tokenizer, train_data, eval_data, data_identity, stats


def load_backbone(config, tokenizer, mesh, rules):
    """(TransformerConfig, backbone params) of config.model.init_from, each tensor placed straight onto
    its sharding on `mesh` by `rules` (the train state's own, so building it moves no loaded array);
    scan_layers: stacked per shard on load (models/hf.py)."""
    return load_pretrained(config.model, mesh=mesh, rules=rules, pad_token_id=tokenizer.pad_token_id)


def train(config, workdir: str) -> dict:
    """Train a reward model as configured (K of them with model.ensemble_size = K); returns the final eval metrics."""
    if int(config.model.get("ensemble_size", 1)) != 1:
        if config.data.get("packing", False):
            raise ValueError(
                "config.data.packing=True is not supported with model.ensemble_size > 1 (members' batches are "
                "stacked padded); set data.packing=False"
            )
        from rm.ensemble_train import train_ensemble  # vmaps this module's train_step over members

        return train_ensemble(config, workdir, single=sys.modules[__name__])  # passed in: no import circle
    t0 = time.time()
    run, tokenizer, train_data, eval_data, data_identity, stats = start_and_load_data(config, workdir)

    # ---- model
    mesh, rules = mesh_and_rules(config.mesh)
    model_config, backbone = load_backbone(config, tokenizer, mesh, rules)
    rng = jax.random.key(config.seed)
    params = rm_params_from_backbone(model_config, backbone, jax.random.fold_in(rng, 1))
    del backbone
    mc = config.model
    model_config, params = add_lora_and_quant(
        model_config,
        params,
        **lora_settings(mc),
        rng=jax.random.fold_in(rng, 3),
        where="model",
    )
    save_model_files(workdir, model_config, tokenizer)  # records lora_* and quant: the loader rebuilds the same tree
    # Only the trainable half goes into the train state (optimizer moments for it alone); the
    # frozen base is a separate argument of the step and lives in checkpoints under 'frozen'.
    params, frozen = split_trainable(params, lora=model_config.lora_rank > 0)

    tc = config.train
    tx, schedule = optimizer_from_config(tc, total_steps=tc.steps)
    built = build_train_state(params, frozen, tx, mesh=mesh, rules=rules, rng=jax.random.fold_in(rng, 2))
    state, state_sharding, frozen, frozen_sharding = (
        built.state,
        built.state_sharding,
        built.frozen,
        built.frozen_sharding,
    )
    layout = pack_layout(config, train_data, mesh) if config.data.get("packing", False) else None
    if layout is not None:
        stats["train"].update(
            pack_groups=layout.groups,
            pack_rows=layout.rows,
            pack_segments=layout.max_segments,
            pack_row_buckets=list(layout.row_buckets),
        )
        write_json(os.path.join(workdir, "data_stats.json"), stats)

    def to_save(state):  # the checkpoint also holds the frozen base, so the workdir is self-contained
        return dict(state, frozen=frozen) if frozen else state

    def full_params(state):
        return combine_params(state["params"], frozen)

    report_start(config, trainable=state["params"], frozen=frozen, opt_state=state["opt_state"], data_stats=stats)
    ckpt, restored, _, start_step = open_checkpoints(
        workdir, to_save(state), save_every=tc.save_every, keep=tc.keep_checkpoints, config=config
    )
    state = {k: v for k, v in restored.items() if k != "frozen"}
    frozen = restored.get("frozen", frozen)
    metrics_writer = open_metrics(workdir, config, resume_step=start_step if start_step else -1)
    if start_step == 0:
        metrics_writer.write(0, flat_data_stats(stats))

    step_fn = jax.jit(
        functools.partial(
            with_layer_sharding(train_step, mesh, rules),  # scanned layers: per-layer params/grads sharded
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
        ),
        in_shardings=(state_sharding, batch_sharding(mesh), frozen_sharding),
        out_shardings=(state_sharding, replicated(mesh)),
        donate_argnums=(0,),
    )
    # Replicated outputs: every process can read all rewards (np.asarray) in a multi-process run.
    eval_fn = jax.jit(functools.partial(pair_rewards, model_config), out_shardings=replicated(mesh))
    eval_bs = config.eval.batch_size

    def run_eval(step, params):
        if eval_data is None:
            return {}
        chosen, rejected = evaluate(eval_fn, params, eval_data, batch_size=eval_bs, bucket=config.data.bucket)
        m = preference_metrics(chosen, rejected, subsets=eval_data.subset, n_bins=config.eval.n_bins)
        out = {f"eval/{k}": v for k, v in m.items()}
        metrics_writer.write(step, out)
        return out

    batches = rm_data.train_batches(train_data, batch_size=tc.batch_size, seed=config.seed, start_step=start_step)
    if layout is not None:
        pad = model_config.pad_token_id
        batches = ((s, packing.pack_pairs(b, layout, pad_id=pad, bucket=config.data.bucket)) for s, b in batches)
    else:
        batches = ((s, trim_to_bucket(b, config.data.bucket)) for s, b in batches)
    loop = run_train_loop(
        step_fn=lambda s, b: step_fn(s, b, frozen),
        state=state,
        batches=(shard_batch(local_rows(b, mesh), mesh) for _, b in batches),
        start_step=start_step,
        total_steps=tc.steps,
        ckpt=ckpt,
        metrics_writer=metrics_writer,
        workdir=workdir,
        log_every=tc.log_every,
        eval_every=tc.eval_every,
        run_eval=lambda s, st: run_eval(s, full_params(st)),
        to_save=to_save,
        desc="rm",
        progress_keys=("loss", "accuracy"),
        extra={"data": data_identity},
        throughput=throughput.training_meter(config, model_config, lm_head=False),
    )
    state, step = loop.state, loop.step
    if loop.preempted:
        ckpt.close()
        metrics_writer.close()
        return {"preempted_at": step}

    # ---- final evaluation, calibration plot and reward normalisation
    final = run_eval(step, full_params(state))
    # Calibration needs eval pairs to report on; without eval files T stays 1 and says why.
    calibration = {"temperature": 1.0, "source": "none", "n": 0, "reason": "no eval files"}
    if eval_data is not None:
        chosen, rejected = evaluate(
            eval_fn, full_params(state), eval_data, batch_size=eval_bs, bucket=config.data.bucket
        )
        calibration = fit_calibration(
            config,
            eval_fn,
            full_params(state),
            eval_data,
            tokenizer,
            chosen,
            rejected,
            batch_size=eval_bs,
            bucket=config.data.bucket,
        )
        extra_metrics = final_diagnostics(config, eval_data, chosen, rejected, calibration)
        metrics_writer.write(step, extra_metrics)
        final.update(extra_metrics)
        if is_main_process():
            plot_reliability_diagram(
                chosen,
                rejected,
                os.path.join(workdir, "reliability.png"),
                n_bins=config.eval.n_bins,
                title=f"reward model, step {step}",
                temperature=calibration["temperature"],
            )
    if is_main_process():
        write_calibration(workdir, calibration)
    norm_rewards, norm_source = normalization_rewards(
        config,
        eval_fn,
        full_params(state),
        train_data,
        eval_data,
        tokenizer,
        batch_size=eval_bs,
        bucket=config.data.bucket,
    )
    gain, bias = compute_normalization(norm_rewards)
    normalization = {
        "gain": gain,
        "bias": bias,
        "source": norm_source,
        "requested": str(config.eval.normalize_on),
        "n": int(norm_rewards.size),
    }
    write_json(os.path.join(workdir, "normalization.json"), normalization)
    ckpt.save(
        step,
        to_save(state),
        {"step": step, "normalization": normalization, "data": data_identity, "calibration": calibration},
        force=True,
    )
    ckpt.close()
    metrics_writer.close()
    plot_training_curves(
        workdir,
        ("train/loss", "train/accuracy", "train/grad_norm", "eval/accuracy", "eval/ece"),
        title=f"reward model, step {step}",
    )
    summary = dict(
        final,
        step=step,
        wall_time_s=time.time() - t0,
        normalization=normalization,
        calibration=calibration,
        data=flat_data_stats(stats),
    )
    write_json(os.path.join(workdir, "eval_final.json"), summary)
    _report(summary, stats)
    return summary


def _report(summary, stats):
    lines = [f"done: step {summary['step']} in {summary['wall_time_s']:.1f}s"]
    if "eval/accuracy" in summary:
        lines.append(
            f"eval accuracy {summary['eval/accuracy']:.4f}  margin {summary['eval/margin']:.3f}  "
            f"ECE {summary['eval/ece']:.4f}  Brier {summary['eval/brier']:.4f}"
        )
        if "eval/temperature" in summary:
            lines.append(
                f"temperature {summary['eval/temperature']:.4g} (fitted on "
                f"{summary['calibration']['source']}): ECE {summary['eval/calibrated/ece']:.4f}  "
                f"Brier {summary['eval/calibrated/brier']:.4f}"
            )
    for split, s in stats.items():
        if s:
            skipped = {k: v for k, v in s.items() if k.startswith("skipped") and v}
            lines.append(
                f"{split} data: {s.get('pairs')} pairs kept of {s.get('rows')} rows; skipped {skipped or 0}; "
                f"truncated prompts {s.get('truncated_prompt', 0)}, responses {s.get('truncated_response', 0)}"
            )
    print("\n".join(lines), flush=True)
