"""Building blocks of the whole-loop experiments (quickstart, over-optimisation).

Each stage writes into its own folder of the experiment's workdir and is skipped when its
output already exists, so re-running the same command resumes where it stopped (the trainers
inside resume from their own checkpoints).
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from common import data_io
from models.hf import load_hf_checkpoint
from models.sampling import make_generate_fn
from ppo.data import load_prompts
from rm.ensemble import combine_scores, load_members
from rm.model import score_arrays
from rm.score import pad_right, tokenize_single
from tasks.reviews import ReviewWorld, train_tokenizer, write_jsonl


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def stage_done(path) -> bool:
    return os.path.exists(os.path.join(path, "STAGE_DONE"))


def mark_done(path, info=None):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "STAGE_DONE"), "w") as f:
        json.dump(info or {}, f)


def build_world(config, workdir):
    """World, tokenizer folder, SFT corpus files and prompt files. Returns paths."""
    out = os.path.join(workdir, "data")
    paths = {k: os.path.join(out, f"{k}.jsonl") for k in ("sft_train", "sft_eval", "prompts", "prompts_eval")}
    paths["tokenizer"] = os.path.join(out, "tokenizer")
    world = ReviewWorld(seed=config.world.seed)
    if stage_done(out):
        return world, paths
    os.makedirs(out, exist_ok=True)
    train_tokenizer(
        world.corpus(config.world.n_tokenizer_texts, seed=1), paths["tokenizer"], vocab_size=config.world.vocab_size
    )
    write_jsonl([{"text": t} for t in world.corpus(config.world.n_sft_texts, seed=2)], paths["sft_train"])
    write_jsonl([{"text": t} for t in world.corpus(config.world.n_sft_eval_texts, seed=3)], paths["sft_eval"])
    write_jsonl([{"prompt": p} for p in world.prompts(config.world.n_prompts, seed=4)], paths["prompts"])
    write_jsonl([{"prompt": p} for p in world.prompts(config.world.n_eval_prompts, seed=5)], paths["prompts_eval"])
    mark_done(out)
    return world, paths


def sample_responses(
    hf_dir,
    tokenizer,
    prompt_file,
    *,
    n_per_prompt,
    max_new_tokens,
    temperature,
    seed,
    max_prompt_length,
    batch_size=64,
    params=None,
    config=None,
):
    """n_per_prompt sampled responses (strings) for each prompt of prompt_file: (prompts, [[str]])."""
    if params is None:
        config, params = load_hf_checkpoint(hf_dir)
    data = load_prompts(prompt_file, tokenizer, max_prompt_length=max_prompt_length)
    gen = make_generate_fn(
        config, max_new_tokens=max_new_tokens, temperature=temperature, eos_token_id=tokenizer.eos_token_id
    )
    ids = np.repeat(data.input_ids, n_per_prompt, axis=0)
    mask = np.repeat(data.attention_mask, n_per_prompt, axis=0)
    texts = []
    for start in range(0, len(ids), batch_size):
        b_ids, b_mask = ids[start : start + batch_size], mask[start : start + batch_size]
        n = len(b_ids)
        if n < batch_size:  # keep one compiled shape
            b_ids = np.concatenate([b_ids, np.repeat(b_ids[:1], batch_size - n, 0)])
            b_mask = np.concatenate([b_mask, np.repeat(b_mask[:1], batch_size - n, 0)])
        out = gen(params, b_ids, b_mask, jax.random.fold_in(jax.random.key(seed), start))
        resp, rmask = np.asarray(out.response_ids), np.asarray(out.response_mask)
        for i in range(n):
            texts.append(tokenizer.decode(resp[i][rmask[i] > 0], skip_special_tokens=True))
    prompts = [t for t in data.texts]
    grouped = [texts[i * n_per_prompt : (i + 1) * n_per_prompt] for i in range(len(prompts))]
    return prompts, grouped


class ProxyScorer:
    """Scores (prompt, response) pairs with a trained reward model (normalised scores).

    An ensemble run's workdir (model.ensemble_size = K) scores with every member, each normalised by its
    own gain / bias, combined by `objective` (mean | wco | uwo, rm/ensemble.py); `members(...)` gives the
    [K, N] member scores themselves."""

    def __init__(self, rm_workdir, max_length=128, *, objective="mean", uwo_lambda=1.0):
        self.models = load_members(rm_workdir)
        self.model = self.models[0]
        self.tokenizer = data_io.load_tokenizer(self.model.tokenizer_path or rm_workdir)
        self.max_length = max_length
        self.objective, self.uwo_lambda = objective, uwo_lambda

    def members(self, prompts, responses):
        rows = [{"prompt": p, "response": r} for p, r in zip(prompts, responses)]  # '' = EOS alone
        seqs, _ = tokenize_single(self.tokenizer, rows, file="<samples>", max_length=self.max_length)
        _, pad = data_io.special_ids(self.tokenizer)
        ids, mask = pad_right(seqs, pad, width=self.max_length)
        return np.stack([m.normalize(score_arrays(m, ids, mask, batch_size=64)) for m in self.models])  # [K, N]

    def __call__(self, prompts, responses):
        scores = self.members(prompts, responses)
        if len(scores) == 1:
            return scores[0]
        return combine_scores(scores, objective=self.objective, uwo_lambda=self.uwo_lambda)


def label_pairs(annotator, prompts, grouped, out_path):
    """Pairs (first two samples of each prompt) labelled by the simulated annotator -> TRL JSONL."""
    a = [g[0] for g in grouped]
    b = [g[1] for g in grouped]
    return annotator.make_pairs_file(prompts, a, b, out_path)


def best_of_n_curve(proxy, gold, ns):
    """[{n, kl, d, proxy, gold}] with the unbiased best-of-n estimator over [P, N] score arrays."""
    from experiments.fits import best_of_n_estimate, bon_kl

    rows = []
    for n in ns:
        p, g = best_of_n_estimate(proxy, gold, n)
        kl = float(bon_kl(n))
        rows.append({"n": int(n), "kl": kl, "d": float(np.sqrt(kl)), "proxy": float(p), "gold": float(g)})
    return rows


def ppo_gold_curve(ppo_workdir, gold_of, *, gold_units=False):
    """Per PPO step: proxy score, gold score (of that step's rollouts) and KL, from samples + metrics.

    gold_of(prompts, responses) -> gold scores. gold_units=True adds each rollout's gold score ("gold_units").
    """
    metrics = {m["step"]: m for m in read_jsonl(os.path.join(ppo_workdir, "metrics.jsonl"))}
    by_step = {}
    for s in read_jsonl(os.path.join(ppo_workdir, "samples.jsonl")):
        by_step.setdefault(s["step"], []).append(s)
    rows = []
    for step in sorted(by_step):
        samples = by_step[step]
        gold = gold_of([s["prompt"] for s in samples], [s["response"] for s in samples])
        m = metrics.get(step, {})
        kl = max(float(m.get("objective/kl", np.nan)), 0.0)
        row = {
            "step": step,
            "kl": kl,
            "d": float(np.sqrt(kl)),
            "proxy": float(np.mean([s["score"] for s in samples])),
            "gold": float(np.mean(gold)),
        }
        if gold_units:  # the Gao driver's bootstrap resamples the rollouts
            row["gold_units"] = [float(g) for g in gold]
        rows.append(row)
    return rows


class StagePreempted(Exception):
    """A stage's trainer stopped on SIGTERM after saving (returned {'preempted_at': step})."""

    def __init__(self, result):
        super().__init__(f"preempted at step {result.get('preempted_at')}")
        self.result = result


def check_preempted(result):
    """Raises StagePreempted when a trainer's result says it was preempted, so the stage is not
    marked done and the driver returns the result (experiments.run then exits 75)."""
    if isinstance(result, dict) and "preempted_at" in result:
        raise StagePreempted(result)
    return result
