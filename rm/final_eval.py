"""The reward-model trainer's held-out evaluation: rewards of every pair, the normalisation set,
temperature calibration and the end-of-run diagnostics (bootstrap interval, length bias)."""

from __future__ import annotations

import numpy as np

from common.data_io import split_files
from common.stats import bootstrap_ci
from rm import data as rm_data
from rm.calibration import calibration_metrics, fit_temperature
from rm.length_bias import length_bias_metrics, response_lengths


def evaluate(eval_fn, params, data, *, batch_size, bucket):
    """Rewards of every pair in `data` -> (chosen [N], rejected [N])."""
    chosen, rejected = np.zeros(len(data), np.float32), np.zeros(len(data), np.float32)
    for batch in rm_data.eval_batches(data, batch_size=batch_size):
        batch = rm_data.trim_to_bucket(batch, bucket)
        c, r = eval_fn(params, {k: batch[k] for k in ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask")})
        valid = batch["valid"] > 0
        chosen[batch["index"][valid]] = np.asarray(c)[valid]
        rejected[batch["index"][valid]] = np.asarray(r)[valid]
    return chosen, rejected


def normalization_rewards(config, eval_fn, params, train_data, eval_data, tokenizer, *, batch_size, bucket):
    """(rewards, source) of the responses named by eval.normalize_on ('eval', 'train' or preference
    files); `source` is the set actually used: 'eval' without eval files falls back to 'train'."""
    source = config.eval.normalize_on
    if source == "eval" and eval_data is not None:
        data, used = eval_data, "eval"
    elif source in ("train", "eval"):
        data, used = train_data, "train"
    else:
        data, used = (
            rm_data.load_preference_data(
                split_files(source), tokenizer, max_length=config.data.max_length, on_bad_row=config.data.on_bad_row
            ),
            str(source),
        )
    chosen, rejected = evaluate(eval_fn, params, data, batch_size=batch_size, bucket=bucket)
    return np.concatenate([chosen, rejected]), used


def fit_calibration(config, eval_fn, params, eval_data, tokenizer, eval_chosen, eval_rejected, *, batch_size, bucket):
    """Temperature fitted on the pairs named by eval.calibrate_on ('eval', 'none' or preference files).

    Returns the JSON-able record stored in the checkpoint and calibration.json: temperature, source, n,
    and ECE / Brier / NLL of the eval pairs at T = 1 ('before') and at the fitted T ('after')."""
    source = str(config.eval.calibrate_on)
    if source == "none":
        temperature, n, used = 1.0, 0, "none"
    elif source == "eval":
        temperature = fit_temperature(eval_chosen, eval_rejected, labels=eval_data.label)
        n, used = len(eval_data), "eval"
    else:
        data = rm_data.load_preference_data(
            split_files(source), tokenizer, max_length=config.data.max_length, on_bad_row=config.data.on_bad_row
        )
        chosen, rejected = evaluate(eval_fn, params, data, batch_size=batch_size, bucket=bucket)
        temperature, n, used = fit_temperature(chosen, rejected, labels=data.label), len(data), source
    n_bins = config.eval.n_bins
    # at_bound: T hit fit_temperature's [0.01, 100] limits, e.g. separable pairs (every gap > 0), where the
    # NLL keeps falling as T -> 0: the calibrated probabilities are then ~0/1 and say so.
    return {
        "temperature": temperature,
        "source": used,
        "n": n,
        "at_bound": temperature in (1e-2, 1e2),
        "before": calibration_metrics(eval_chosen, eval_rejected, temperature=1.0, n_bins=n_bins),
        "after": calibration_metrics(eval_chosen, eval_rejected, temperature=temperature, n_bins=n_bins),
    }


def final_diagnostics(config, eval_data, chosen, rejected, calibration) -> dict:
    """eval/ metrics added at the end of training: temperature and calibrated ECE/Brier/NLL, the accuracy's
    bootstrap 95% interval over pairs, and length bias (reward-length correlations, accuracy by length diff)."""
    after = calibration["after"]
    out = {
        "eval/temperature": calibration["temperature"],
        "eval/calibrated/ece": after["ece"],
        "eval/calibrated/brier": after["brier"],
        "eval/calibrated/nll": after["nll"],
    }
    if config.eval.bootstrap_resamples > 0:
        ci = bootstrap_ci(
            (chosen > rejected).astype(np.float64),
            n_resamples=int(config.eval.bootstrap_resamples),
            seed=int(config.seed),
        )
        out.update({"eval/accuracy_ci_low": ci["low"], "eval/accuracy_ci_high": ci["high"]})
    chosen_lengths, rejected_lengths = response_lengths(eval_data)
    metrics = length_bias_metrics(chosen, rejected, chosen_lengths, rejected_lengths)
    out.update({f"eval/{k}": v for k, v in metrics.items()})
    return out
