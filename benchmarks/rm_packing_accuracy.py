"""Packed and padded reward-model training reach the same held-out accuracy (data.packing).

  python -m benchmarks.rm_packing_accuracy [--steps 300] [--seeds 0,1] [--pack_row_buckets 1] \
      [--out benchmarks/results/rm_packing_accuracy.json]

About 10-15 minutes on an idle 2-core machine. On the built-in review world (tasks/reviews.py):
a byte-level BPE tokenizer, a small GPT-2 policy fine-tuned from scratch for a few SFT steps (the
reward model's initialisation), preference pairs labelled by simulated annotators from the gold
score (tasks/gold.py make_gold_preference_data: world continuations of review openings, some
perturbed, so lengths are uneven). Then for each seed the reward model is trained twice with
the same config, data order and steps, `data.packing` False (padded to a bucket of 16 tokens)
and True (with `data.pack_row_buckets` = --pack_row_buckets), and evaluated on the same
held-out pairs. Reported per run: held-out accuracy with its bootstrap 95% interval over pairs
(rm/train.py's eval/accuracy_ci_*), the training pad fraction, real tokens/s and wall time; and
per seed the paired accuracy difference.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_data(work, *, n_train, n_eval):
    """Tokenizer, SFT init folder and train/eval preference files in `work` (reused when present)."""
    from tasks.gold import SentimentFluencyGold, make_gold_preference_data
    from tasks.reviews import ReviewWorld, train_tokenizer, write_corpus_jsonl

    world = ReviewWorld(0)
    paths = {
        k: os.path.join(work, v) for k, v in (("tok", "tokenizer"), ("train", "train.jsonl"), ("eval", "eval.jsonl"))
    }
    if not os.path.exists(paths["tok"]):
        train_tokenizer(world.corpus(2000, seed=5), paths["tok"], vocab_size=512)
    if not os.path.exists(paths["eval"]):
        gold = SentimentFluencyGold(world)
        make_gold_preference_data(world, gold, n_train, 1, temperature=0.3, out_path=paths["train"])
        make_gold_preference_data(world, gold, n_eval, 2, temperature=0.3, out_path=paths["eval"])
    sft_dir = os.path.join(work, "sft")
    if not os.path.exists(os.path.join(sft_dir, "hf", "config.json")):
        corpus = os.path.join(work, "corpus.jsonl")
        write_corpus_jsonl(corpus, 3000, seed=6, world=world)
        run_config(
            "configs/sft.py:size=tiny",
            sft_dir,
            {
                "model.tokenizer": paths["tok"],
                "model.family": "gpt2",
                "model.d_model": 64,
                "model.n_layers": 2,
                "model.n_heads": 4,
                "model.d_ff": 256,
                "model.max_position_embeddings": 128,
                "data.train_files": corpus,
                "data.max_length": 64,
                "data.packing": True,
                "train.steps": 150,
                "train.batch_size": 32,
                "train.learning_rate": 2e-3,
                "train.log_every": 50,
                "train.save_every": 1000,
                "train.eval_every": 0,
            },
        )
    paths["sft"] = os.path.join(sft_dir, "hf")
    return paths


def run_config(config, workdir, overrides):
    """python -m experiments.run in its own process (fresh XLA state, as a user would run it)."""
    cmd = [sys.executable, "-m", "experiments.run", "--config", config, "--workdir", workdir]
    cmd += [f"--config.{k}={v}" for k, v in overrides.items()]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)


def train_rm(paths, workdir, *, packed, seed, steps, row_buckets=1):
    start = time.time()
    run_config(
        "configs/rm.py",
        workdir,
        {
            "seed": seed,
            "model.init_from": paths["sft"],
            "model.tokenizer": paths["tok"],
            "data.train_files": paths["train"],
            "data.eval_files": paths["eval"],
            "data.max_length": 128,
            "data.bucket": 16,
            "data.packing": packed,
            "data.pack_row_buckets": row_buckets,
            "train.steps": steps,
            "train.batch_size": 32,
            "train.learning_rate": 3e-4,
            "train.warmup_steps": 20,
            "train.log_every": 10,
            "train.eval_every": 0,
            "train.save_every": 10_000,
            "logging.tensorboard": False,
        },
    )
    wall = time.time() - start
    final = json.load(open(os.path.join(workdir, "eval_final.json")))
    lines = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    train = [x for x in lines if "train/loss" in x]
    rates = [x["perf/tokens_per_s"] for x in train if "perf/tokens_per_s" in x]
    return {
        "accuracy": final["eval/accuracy"],
        "ci": [final["eval/accuracy_ci_low"], final["eval/accuracy_ci_high"]],
        "pad_fraction": float(np.mean([x["train/pad_fraction"] for x in train])),
        "tokens_per_s_median": float(np.median(rates)),
        "final_train_loss": train[-1]["train/loss"],
        "wall_s": wall,
        "workdir": workdir,
    }


def paired_difference(paths, workdirs, *, seed, resamples=2000):
    """Accuracy(packed) - accuracy(padded) on the same eval pairs, with a paired bootstrap 95% interval."""
    from common import data_io
    from rm import data as rm_data
    from rm.model import load_reward_model, score_arrays

    tokenizer = data_io.load_tokenizer(paths["tok"])
    data = rm_data.load_preference_data(paths["eval"], tokenizer, max_length=128)
    correct = []
    for workdir in workdirs:
        model = load_reward_model(workdir)
        chosen = score_arrays(model, data.chosen_ids, data.chosen_mask)
        rejected = score_arrays(model, data.rejected_ids, data.rejected_mask)
        correct.append(chosen > rejected)
    diff = correct[1].astype(np.float64) - correct[0]
    rng = np.random.default_rng(seed)
    boots = [diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(resamples)]
    return {
        "difference": float(diff.mean()),
        "ci": [float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))],
        "agreement": float(np.mean(correct[0] == correct[1])),  # pairs both models rank the same way
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--pack_row_buckets", type=int, default=1, help="data.pack_row_buckets of the packed runs")
    parser.add_argument("--train_pairs", type=int, default=4000)
    parser.add_argument("--eval_pairs", type=int, default=1000)
    parser.add_argument("--work", default="/tmp/rm_packing_accuracy")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "rm_packing_accuracy.json"))
    args = parser.parse_args()
    sys.path.insert(0, ROOT)
    os.makedirs(args.work, exist_ok=True)
    paths = build_data(args.work, n_train=args.train_pairs, n_eval=args.eval_pairs)
    results = {
        "steps": args.steps,
        "train_pairs": args.train_pairs,
        "eval_pairs": args.eval_pairs,
        "pack_row_buckets": args.pack_row_buckets,
        "runs": [],
    }
    for seed in [int(s) for s in args.seeds.split(",")]:
        runs = {}
        for packed in (False, True):  # interleaved per seed, so machine drift hits both alike
            workdir = os.path.join(args.work, f"rm_seed{seed}_{'packed' if packed else 'padded'}")
            runs["packed" if packed else "padded"] = train_rm(
                paths, workdir, packed=packed, seed=seed, steps=args.steps, row_buckets=args.pack_row_buckets
            )
            print(seed, "packed" if packed else "padded", runs["packed" if packed else "padded"], flush=True)
        runs["paired"] = paired_difference(paths, [runs["padded"]["workdir"], runs["packed"]["workdir"]], seed=seed)
        results["runs"].append({"seed": seed, **runs})
    results["load"] = os.getloadavg()
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    for run in results["runs"]:
        for kind in ("padded", "packed"):
            r = run[kind]
            print(
                f"seed {run['seed']} {kind:6s}: accuracy {r['accuracy']:.3f} [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]  "
                f"pad {r['pad_fraction']:.2f}  {r['tokens_per_s_median']:.0f} tok/s  {r['wall_s']:.0f} s"
            )
        p = run["paired"]
        print(
            f"seed {run['seed']} packed - padded: {p['difference']:+.3f} [{p['ci'][0]:+.3f}, {p['ci'][1]:+.3f}], "
            f"same ranking on {p['agreement']:.3f} of the pairs"
        )


if __name__ == "__main__":
    main()
