"""What int8 weight-only quantisation (models/quant.py) costs in quality, on trained models.

  python -m benchmarks.quant_quality --workdir runs/quickstart [--out benchmarks/results/quant_quality.json]

Reads a quickstart workdir (the README's first command writes one): its proxy reward model
(`rm/`), its SFT policy (`sft/hf`), the held-out preference pairs (`labels/eval.jsonl`) and the
held-out SFT texts (`data/sft_eval.jsonl`). Compares each model with its int8 copy
(`quantize_params`: q/k/v/o/gate/up/down kernels int8 with per-output-channel scales):

  reward model  held-out pairwise accuracy fp32 vs int8, pairs whose preference flips, raw
                score error (mean / max |r_int8 - r_fp32|, also relative to the scores' std);
  policy        mean per-token KL(p_fp32 || p_int8) of the next-token distributions over the
                held-out texts' real tokens, the largest per-token KL, and the logits error;
                the same for the policy as a PPO reference would use it.
Options --rm and --policy take other workdirs / HF folders; --eval_pairs and --texts other data.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np


def rm_quality(rm_dir: str, pairs_file: str, *, max_length: int, batch_size: int = 64) -> dict:
    from common import data_io
    from models.lora import merge_lora
    from models.quant import param_bytes, quantize_params
    from rm import data as rm_data
    from rm.final_eval import evaluate
    from rm.model import load_reward_model
    from rm.train import pair_rewards

    model = load_reward_model(rm_dir)
    params, config = merge_lora(model.params, model.config)  # a LoRA RM is scored merged (as in PPO)
    qparams, qconfig = quantize_params(params, config)
    tok = data_io.load_tokenizer(model.tokenizer_path or rm_dir)
    data = rm_data.load_preference_data([pairs_file], tok, max_length=max_length, on_bad_row="error")
    out = {}
    for name, cfg, p in (("fp32", config, params), ("int8", qconfig, qparams)):
        fn = jax.jit(functools.partial(pair_rewards, cfg))
        chosen, rejected = evaluate(fn, p, data, batch_size=batch_size, bucket=0)
        out[name] = (chosen, rejected, param_bytes(p))
    (c32, r32, b32), (c8, r8, b8) = out["fp32"], out["int8"]
    err = np.abs(np.concatenate([c8 - c32, r8 - r32]))
    scale = float(np.std(np.concatenate([c32, r32])))
    return {
        "pairs": int(len(c32)),
        "accuracy_fp32": float(np.mean(c32 > r32)),
        "accuracy_int8": float(np.mean(c8 > r8)),
        "flipped_pairs": int(np.sum((c32 > r32) != (c8 > r8))),
        "score_abs_err_mean": float(err.mean()),
        "score_abs_err_max": float(err.max()),
        "score_std_fp32": scale,
        "score_err_mean_over_std": float(err.mean() / scale),
        "param_bytes_fp32": int(b32),
        "param_bytes_int8": int(b8),
    }


def policy_quality(
    hf_dir: str, texts_file: str, *, max_length: int, batch_size: int = 32, max_texts: int = 256
) -> dict:
    from common import data_io
    from models.hf import load_hf_checkpoint
    from models.quant import param_bytes, quantize_params
    from models.transformer import Transformer

    config, params = load_hf_checkpoint(hf_dir)
    qparams, qconfig = quantize_params(params, config)
    tok = data_io.load_tokenizer(hf_dir)
    rows = [json.loads(line) for line in open(texts_file) if line.strip()][:max_texts]
    ids = data_io.tokenize(tok, [r["text"] for r in rows])
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    width = min(max_length, max(len(x) for x in ids))

    @jax.jit
    def per_token(params, qparams, input_ids, mask):  # weights as arguments, not baked-in constants
        lp32 = jax.nn.log_softmax(Transformer(config).apply({"params": params}, input_ids, mask).logits, -1)
        lp8 = jax.nn.log_softmax(Transformer(qconfig).apply({"params": qparams}, input_ids, mask).logits, -1)
        kl = jnp.sum(jnp.exp(lp32) * (lp32 - lp8), -1)  # KL(p_fp32 || p_int8) per position
        logit_err = jnp.max(jnp.abs(lp32 - lp8 - (lp32 - lp8).mean(-1, keepdims=True)), -1)  # shift-invariant
        return kl, logit_err

    kls, errs = [], []
    for start in range(0, len(ids), batch_size):
        chunk = [x[:width] for x in ids[start : start + batch_size]]
        arr = np.full((batch_size, width), pad, np.int32)
        mask = np.zeros((batch_size, width), np.int32)
        for i, x in enumerate(chunk):
            arr[i, : len(x)], mask[i, : len(x)] = x, 1
        kl, err = jax.device_get(per_token(params, qparams, arr, mask))
        # positions 0 .. len-2 predict a real next token
        valid = np.zeros_like(mask, bool)
        for i, x in enumerate(chunk):
            valid[i, : len(x) - 1] = True
        kls.append(kl[valid])
        errs.append(err[valid])
    kl, err = np.concatenate(kls), np.concatenate(errs)
    return {
        "texts": len(ids),
        "tokens": int(kl.size),
        "kl_mean": float(kl.mean()),
        "kl_p99": float(np.percentile(kl, 99)),
        "kl_max": float(kl.max()),
        "logprob_err_mean": float(err.mean()),
        "logprob_err_max": float(err.max()),
        "param_bytes_fp32": int(param_bytes(params)),
        "param_bytes_int8": int(param_bytes(qparams)),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="runs/quickstart", help="a quickstart workdir")
    ap.add_argument("--rm", default="", help="RM workdir (default WORKDIR/rm)")
    ap.add_argument("--policy", default="", help="HF causal-LM folder (default WORKDIR/sft/hf)")
    ap.add_argument("--eval_pairs", default="", help="preference pairs (default WORKDIR/labels/eval.jsonl)")
    ap.add_argument("--texts", default="", help="JSONL with 'text' (default WORKDIR/data/sft_eval.jsonl)")
    ap.add_argument("--max_length", type=int, default=64)
    ap.add_argument("--out", default="benchmarks/results/quant_quality.json")
    args = ap.parse_args(argv)
    w = args.workdir
    t0 = time.time()
    result = {
        "workdir": w,
        "jax": jax.__version__,
        "device": str(jax.devices()[0].device_kind),
        "reward_model": rm_quality(
            args.rm or os.path.join(w, "rm"),
            args.eval_pairs or os.path.join(w, "labels", "eval.jsonl"),
            max_length=args.max_length,
        ),
        "policy": policy_quality(
            args.policy or os.path.join(w, "sft", "hf"),
            args.texts or os.path.join(w, "data", "sft_eval.jsonl"),
            max_length=args.max_length,
        ),
    }
    result["seconds"] = time.time() - t0
    print(json.dumps(result, indent=2))
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
