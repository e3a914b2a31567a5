"""Supervised fine-tuning with the next-token loss: `train(config, workdir)`.

Launch (see configs/sft.py):
  python -m experiments.run --config configs/sft.py --workdir W --config.data.train_files=A.jsonl \
      --config.model.init_from=HF_DIR          # fine-tune a Hugging Face causal LM
  python -m experiments.run --config configs/sft.py --workdir W --config.data.train_files=A.jsonl \
      --config.model.init_from= --config.model.tokenizer=TOK_DIR   # random init from model.* fields

The loss is the mean, over the batch's target tokens (sft/data.py's loss_mask), of
-log p(token | previous tokens), in float32; with gradient accumulation every micro-batch
divides by the whole batch's target count, so the result is the same per-token mean.
The workdir gets config.json, model_config.json, tokenizer/, data_stats.json, metrics.jsonl
(train/loss, train/accuracy, eval/loss, eval/perplexity, ...), checkpoints/, eval_final.json
and, at the end, hf/: the model as a Hugging Face causal-LM folder, the `init_from` of the
reward-model and PPO trainers. Re-running the same command resumes from the latest
checkpoint; the data order depends only on (seed, step) and step rngs on fold_in(rng, step),
so a killed-and-resumed run ends with the same parameters as an uninterrupted one.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from common import data_io, packing, throughput
from common.data_io import split_files
from common.loop import flat_data_stats, open_checkpoints, run_train_loop, start_run
from common.mesh import batch_sharding, data_axis_size, local_rows, replicated, shard_batch
from common.optim import accumulate_gradients, optimizer_from_config
from common.tracking import open_metrics, plot_training_curves, report_start
from common.train_state import build_train_state, load_pretrained, lora_settings, mesh_and_rules
from common.workdir import save_model_files, write_json
from models.adapters import add_lora_and_quant, split_trainable
from models.lm_head import next_token_nll_from_hidden
from models.lora import combine_params, merge_lora
from models.sharding import abstract_sharded, shard_params, with_layer_sharding
from models.transformer import Transformer, TransformerConfig, init_params
from sft import data as sft_data
from sft.export import save_causal_lm

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- loss


def next_token_nll(*, logits, input_ids, loss_mask):
    """Per-position negative log-likelihood of the next token and its weight, in float32.

    Args:
      logits: [B, T, V] model outputs; logits[:, t] predict input_ids[:, t + 1].
      input_ids: [B, T] int tokens.
      loss_mask: [B, T] 1 where the token is a target (column 0 is never predicted).

    Returns:
      (nll, weights, correct), each [B, T-1]: the NLL of every next token times its weight,
      the weights (loss_mask[:, 1:] as float32), and 1 where the argmax is the target (times
      the weight).
    """
    logits = logits[:, :-1].astype(jnp.float32)  # [B, T-1, V]
    targets = input_ids[:, 1:].astype(jnp.int32)  # [B, T-1]
    weights = loss_mask[:, 1:].astype(jnp.float32)  # [B, T-1]
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [B, T-1]
    nll = (jax.nn.logsumexp(logits, axis=-1) - picked) * weights  # [B, T-1]
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32) * weights  # [B, T-1]
    return nll, weights, correct


def next_token_loss(*, logits, input_ids, loss_mask, num_targets=None):
    """Mean next-token cross-entropy over target tokens (float32 scalar).

    `num_targets` overrides the denominator (the target count of the whole batch when
    `logits` cover a micro-batch); by default it is this batch's count. A batch without
    targets gives 0, not NaN.
    """
    nll, weights, _ = next_token_nll(logits=logits, input_ids=input_ids, loss_mask=loss_mask)
    denominator = jnp.sum(weights) if num_targets is None else jnp.asarray(num_targets, jnp.float32)
    return jnp.sum(nll) / jnp.maximum(denominator, 1.0)


def lm_logits(model_config, params, input_ids, attention_mask, segment_ids=None):
    """[B, T, V] float32 logits of the causal LM (packed rows with `segment_ids`)."""
    return (
        Transformer(model_config).apply({"params": params}, input_ids, attention_mask, segment_ids=segment_ids).logits
    )


def lm_nll(model_config, params, input_ids, attention_mask, loss_mask, dropout_rng=None, segment_ids=None):
    """`next_token_nll` of the causal LM: over chunks of the hidden states when
    model_config.logits_chunk > 0 (models/lm_head.py: no [B, T, V] float32 logits), else from
    the full logits. `dropout_rng` turns on LoRA dropout (training only). Packed rows
    (common/packing.py) pass `segment_ids`; the first token of every sequence is never a target,
    so no loss term crosses a segment boundary."""
    rngs = {"dropout": dropout_rng} if dropout_rng is not None else None
    model = Transformer(model_config)
    if model_config.logits_chunk:
        hidden = model.apply(
            {"params": params}, input_ids, attention_mask, return_logits=False, rngs=rngs, segment_ids=segment_ids
        ).hidden_states  # [B, T, d]
        return next_token_nll_from_hidden(model_config, params, hidden, input_ids, loss_mask)
    logits = model.apply({"params": params}, input_ids, attention_mask, rngs=rngs, segment_ids=segment_ids).logits
    return next_token_nll(logits=logits, input_ids=input_ids, loss_mask=loss_mask)


def train_step(state, batch, frozen=None, *, model_config, tx, schedule, accum_steps, nan_step):
    """One optimizer step (with gradient accumulation). Pure: (state, batch, frozen) -> (state, metrics).

    state['params'] is the trainable tree (all params, or the LoRA adapters); `frozen` is the rest
    (the frozen, possibly int8, base; None or {} without LoRA), joined with it inside the loss.
    """
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    frozen = frozen or {}
    num_targets = jnp.maximum(jnp.sum(batch["loss_mask"][:, 1:]).astype(jnp.float32), 1.0)
    rows = batch["input_ids"].shape[0]
    # accumulate_gradients averages micro-batch losses; dividing each micro-batch's NLL sum
    # by num_targets / accum_steps makes that average the exact per-token mean of the batch.
    batch = dict(batch, denominator=jnp.full((rows,), num_targets / accum_steps, jnp.float32))

    def loss_fn(params, micro, micro_rng):
        full = combine_params(params, frozen) if frozen else params
        dropout_rng = micro_rng if model_config.lora_dropout > 0 else None
        segment_ids = micro.get("segment_ids")  # packed rows (common/packing.py) or None
        mask = micro["attention_mask"] if segment_ids is None else (segment_ids > 0).astype(jnp.int32)
        nll, _, correct = lm_nll(
            model_config, full, micro["input_ids"], mask, micro["loss_mask"], dropout_rng, segment_ids
        )
        denominator = micro["denominator"][0]
        return jnp.sum(nll) / denominator, {"accuracy": jnp.sum(correct) / denominator}

    loss, aux, grads = accumulate_gradients(loss_fn, state["params"], batch, rng, accum_steps=accum_steps)
    # Fault injection for testing the NaN guard (nan_step < 0: never).
    loss = jnp.where(state["step"] == nan_step, jnp.nan, loss)
    grads = jax.tree.map(lambda g: jnp.where(state["step"] == nan_step, jnp.nan, g), grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = dict(
        aux,
        loss=loss,
        grad_norm=optax.tree.norm(grads),
        learning_rate=schedule(state["step"]),
        target_tokens=num_targets,
    )
    metrics.update(batch_token_stats(batch, window=model_config.sliding_window))
    return dict(state, params=params, opt_state=opt_state, step=state["step"] + 1), metrics


def batch_token_stats(batch, *, window=None):
    """Real tokens, attended pairs and pad fractions of a padded or packed SFT batch (device metrics)."""
    if "segment_ids" in batch:
        out = throughput.token_stats(batch["segment_ids"], batch["positions"], window=window)
        out["pad_fraction_unpacked"] = 1.0 - out["tokens"] / jnp.sum(batch["padded_tokens"])
    else:
        mask = batch["attention_mask"]
        out = throughput.token_stats(mask, throughput.positions_of_mask(mask), window=window)
    out["pad_fraction"] = 1.0 - out["tokens"] / out["slots"]
    return out


def eval_sums(model_config, params, batch):
    """(NLL sum, target count, correct count) of one eval batch, float32 scalars."""
    nll, weights, correct = lm_nll(
        model_config, params, batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
    )
    return jnp.sum(nll), jnp.sum(weights), jnp.sum(correct)


def evaluate(eval_fn, params, data, *, batch_size, bucket) -> dict:
    """Held-out loss (mean NLL per target token), perplexity exp(loss) and token accuracy."""
    totals = np.zeros(3, np.float64)
    for batch in sft_data.eval_batches(data, batch_size=batch_size):
        batch = trim_to_bucket(batch, bucket)
        sums = eval_fn(params, {k: batch[k] for k in sft_data.ARRAY_KEYS})
        totals += np.asarray(jax.device_get(sums), np.float64)
    nll, count, correct = totals
    loss = nll / max(count, 1.0)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),
        "accuracy": correct / max(count, 1.0),
        "target_tokens": int(count),
    }


# ----------------------------------------------------------------------------- setup


def trim_to_bucket(batch: dict, bucket: int) -> dict:
    """Drop all-padding columns beyond the longest sequence, rounded up to `bucket` (few jit shapes)."""
    if bucket <= 0:
        return batch
    width = batch["input_ids"].shape[1]
    keep = min(width, -(-int(batch["attention_mask"].sum(1).max()) // bucket) * bucket)
    return {k: (v[:, :keep] if v.ndim == 2 else v) for k, v in batch.items()}


def scratch_model_config(mc, tokenizer) -> TransformerConfig:
    """TransformerConfig of a from-scratch model: config.model's architecture, the tokenizer's vocab/ids."""
    if mc.family not in ("gpt2", "llama"):
        raise ValueError(f"model.family={mc.family!r}: from-scratch models are 'gpt2' or 'llama'")
    if mc.d_model % mc.n_heads:
        raise ValueError(f"model.d_model={mc.d_model} must be a multiple of model.n_heads={mc.n_heads}")
    n_kv = mc.n_kv_heads or mc.n_heads
    gpt2 = mc.family == "gpt2"
    if gpt2 and n_kv != mc.n_heads:
        raise ValueError(
            f"model.family=gpt2 has no grouped-query attention: n_kv_heads ({n_kv}) must equal "
            f"n_heads ({mc.n_heads}) or be 0"
        )
    eos, pad = data_io.special_ids(tokenizer)
    return TransformerConfig(
        family=mc.family,
        vocab_size=len(tokenizer),
        d_model=mc.d_model,
        n_layers=mc.n_layers,
        n_heads=mc.n_heads,
        n_kv_heads=n_kv,
        head_dim=mc.d_model // mc.n_heads,
        d_ff=mc.d_ff or 4 * mc.d_model,
        max_position_embeddings=mc.max_position_embeddings,
        norm_eps=mc.norm_eps,
        rope_theta=float(mc.rope_theta),
        tie_embeddings=True if gpt2 else bool(mc.tie_embeddings),
        qkv_bias=gpt2,
        o_bias=gpt2,
        mlp_bias=gpt2,
        activation="gelu_new" if gpt2 else "silu",
        dtype=mc.dtype,
        param_dtype=mc.param_dtype,
        remat=mc.remat,
        remat_policy=mc.remat_policy,
        attention=mc.get("attention", "auto"),
        scan_layers=mc.get("scan_layers", False),
        logits_chunk=mc.get("logits_chunk", 128),
        mlp_chunk=mc.get("mlp_chunk", 0),
        pad_token_id=pad,
        eos_token_id=eos,
        bos_token_id=tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos,
    )


def build_model(config, tokenizer, mesh, rules, rng):
    """(TransformerConfig, params placed on the mesh): from init_from, or random from the config."""
    mc = config.model
    if mc.init_from:
        model_config, params = load_pretrained(  # each tensor straight onto its shard; scan_layers: stacked
            mc, mesh=mesh, rules=rules, pad_token_id=data_io.special_ids(tokenizer)[1]
        )
        if not model_config.tie_embeddings and "lm_head" not in params:
            raise ValueError(
                f"{mc.init_from} has no lm_head weights: not a causal LM (a sequence-classification "
                f"export?); give a causal-LM folder"
            )
        params = shard_params(params, mesh, rules)  # already placed so: moves nothing
    else:
        model_config = scratch_model_config(mc, tokenizer)
        init_fn = functools.partial(init_params, model_config, rng)
        _, shardings = abstract_sharded(init_fn, mesh, rules)
        params = jax.jit(init_fn, out_shardings=shardings)()  # created already sharded
    if model_config.is_gpt2 and config.data.max_length > model_config.max_position_embeddings:
        raise ValueError(
            f"config.data.max_length={config.data.max_length} exceeds the model's "
            f"{model_config.max_position_embeddings} learned positions (gpt2): lower data.max_length"
        )
    if len(tokenizer) > model_config.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the model only {model_config.vocab_size} "
            f"embeddings: use the tokenizer the model was trained with"
        )
    return model_config, params


# ----------------------------------------------------------------------------- training


def train(config, workdir: str) -> dict:
    """Fine-tune (or train from scratch) a causal LM as configured; returns the final eval metrics."""
    t0 = time.time()
    mc, tc = config.model, config.train
    if not (mc.init_from or mc.tokenizer):
        raise ValueError(
            "set config.model.init_from (a Hugging Face causal-LM folder) or, to train from scratch, "
            "config.model.tokenizer (a tokenizer folder) with the config.model architecture fields"
        )
    if not split_files(config.data.train_files):
        raise ValueError("config.data.train_files is empty: give one or more SFT files (comma-separated)")
    run = start_run(config, workdir)  # config, mesh and path checks, resume comparison: before any data
    tokenizer = data_io.load_tokenizer(mc.tokenizer or mc.init_from)

    # ---- data
    load = functools.partial(
        sft_data.load_sft_data,
        tokenizer=tokenizer,
        max_length=config.data.max_length,
        on_bad_row=config.data.on_bad_row,
    )
    train_files = split_files(config.data.train_files)
    train_data = load(train_files)
    data_identity = run.check_data(train_files, rows=train_data.stats["rows"])
    eval_files = split_files(config.data.eval_files)
    eval_data = load(eval_files) if eval_files else None
    if eval_data is None and config.data.eval_fraction > 0:
        train_data, eval_data = sft_data.split_heldout(train_data, fraction=config.data.eval_fraction, seed=config.seed)
    stats = {"train": train_data.stats, "eval": eval_data.stats if eval_data else None}
    write_json(os.path.join(workdir, "data_stats.json"), stats)

    # ---- model, optimizer, state
    mesh, rules = mesh_and_rules(config.mesh)
    rng = jax.random.key(config.seed)
    model_config, params = build_model(config, tokenizer, mesh, rules, jax.random.fold_in(rng, 1))
    model_config, params = add_lora_and_quant(
        model_config,
        params,
        **lora_settings(mc),
        rng=jax.random.fold_in(rng, 3),
        where="model",
    )
    save_model_files(workdir, model_config, tokenizer)  # records lora_* and quant: sft.export merges the adapters
    # With LoRA only the adapters train (optimizer moments for them alone); the frozen base is a
    # separate argument of the step and lives in checkpoints under 'frozen'.
    params, frozen = split_trainable(params, lora=model_config.lora_rank > 0)

    tx, schedule = optimizer_from_config(tc, total_steps=tc.steps)
    built = build_train_state(params, frozen, tx, mesh=mesh, rules=rules, rng=jax.random.fold_in(rng, 2))
    state, state_sharding, frozen, frozen_sharding = (
        built.state,
        built.state_sharding,
        built.frozen,
        built.frozen_sharding,
    )

    def to_save(state):  # the checkpoint also holds the frozen base, so the workdir is self-contained
        return dict(state, frozen=frozen) if frozen else state

    def full_params(state):
        return combine_params(state["params"], frozen) if frozen else state["params"]

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
            nan_step=config.debug.inject_nan_at_step,
        ),
        in_shardings=(state_sharding, batch_sharding(mesh), frozen_sharding),
        out_shardings=(state_sharding, replicated(mesh)),
        donate_argnums=(0,),
    )
    # Replicated outputs: every process can read the sums in a multi-process run.
    eval_fn = jax.jit(functools.partial(eval_sums, model_config), out_shardings=replicated(mesh))

    def run_eval(step, params, *, write=True):
        if eval_data is None:
            return {}
        m = evaluate(eval_fn, params, eval_data, batch_size=config.eval.batch_size, bucket=config.data.bucket)
        out = {f"eval/{k}": v for k, v in m.items()}
        if write:
            metrics_writer.write(step, out)
        return out

    if start_step == 0 and config.eval.at_start:
        initial = run_eval(0, full_params(state))
        if initial:
            print(f"initial eval loss {initial['eval/loss']:.4f}", flush=True)
    batches = sft_data.train_batches(train_data, batch_size=tc.batch_size, seed=config.seed, start_step=start_step)
    if config.data.get("packing", False):
        layout = packing.plan_sequence_layout(
            train_data.attention_mask.sum(1),
            lambda s: data_io.batch_indices(len(train_data), batch_size=tc.batch_size, seed=config.seed, step=s),
            steps=range(tc.steps),
            length=config.data.max_length,
            row_multiple=tc.grad_accum_steps * data_axis_size(mesh),
            rows=config.data.get("pack_rows", 0),
            row_buckets=config.data.get("pack_row_buckets", 1),
        )
        print(f"packing: {list(layout.row_buckets)} rows of {layout.length} tokens per step", flush=True)
        pad = model_config.pad_token_id
        batches = ((s, packing.pack_sequences(b, layout, pad_id=pad, bucket=config.data.bucket)) for s, b in batches)
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
        desc="sft",
        progress_keys=("loss", "accuracy"),
        extra={"data": data_identity},
        throughput=throughput.training_meter(config, model_config, lm_head=True),
    )
    state, step = loop.state, loop.step
    if loop.preempted:
        ckpt.close()
        metrics_writer.close()
        return {"preempted_at": step}

    # ---- final evaluation, checkpoint and Hugging Face export
    # A re-run of a finished command logs nothing new (unless the first run died before the end).
    already_done = start_step >= tc.steps and os.path.exists(os.path.join(workdir, "eval_final.json"))
    final = run_eval(step, full_params(state), write=not already_done)
    ckpt.save(step, to_save(state), {"step": step, "data": data_identity}, force=True)
    ckpt.close()
    metrics_writer.close()
    plot_training_curves(
        workdir,
        ("train/loss", "train/accuracy", "train/grad_norm", "eval/loss", "eval/perplexity"),
        title=f"SFT, step {step}",
    )
    hf_dir = None
    if config.export.hf:
        hf_dir = os.path.join(workdir, "hf")
        merged, plain_config = merge_lora(full_params(state), model_config)  # the HF folder is a plain float model
        save_causal_lm(plain_config, merged, hf_dir, tokenizer_dir=os.path.join(workdir, "tokenizer"))
    summary = dict(final, step=step, wall_time_s=time.time() - t0, hf_dir=hf_dir, data=flat_data_stats(stats))
    write_json(os.path.join(workdir, "eval_final.json"), summary)
    _report(summary, stats)
    return summary


def _report(summary, stats):
    lines = [f"done: step {summary['step']} in {summary['wall_time_s']:.1f}s"]
    if "eval/loss" in summary:
        lines.append(
            f"eval loss {summary['eval/loss']:.4f}  perplexity {summary['eval/perplexity']:.3f}  "
            f"token accuracy {summary['eval/accuracy']:.4f}"
        )
    for split, s in stats.items():
        if s:
            skipped = {k: v for k, v in s.items() if k.startswith("skipped") and v}
            lines.append(
                f"{split} data: {s['examples']} examples kept of {s['rows']} rows ({s['target_tokens']} "
                f"target tokens); skipped {skipped or 0}; truncated {s['truncated']}"
            )
    if summary.get("hf_dir"):
        lines.append(f"Hugging Face causal LM: {summary['hf_dir']}")
    print("\n".join(lines), flush=True)
