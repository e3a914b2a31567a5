"""Reward-model over-optimisation (Gao, Schulman, Hilton 2022) on the built-in review world.

  python -m experiments.run --config configs/overoptimization.py --workdir runs/overopt

Proxy reward models are trained on different numbers of labels (simulated annotators over the
gold scorer). Against each proxy: best-of-n (n = 1 .. bon.n_max, KL = log n - (n-1)/n, the
unbiased estimator over bon.n_max samples per prompt) and PPO with a small fixed KL coefficient
(every rollout scored by gold; KL per step from the rollouts). Gold and proxy reward are fitted
against d = sqrt(KL) with Gao et al.'s forms (best-of-n: d (alpha - beta d); RL:
d (alpha - beta log d)); fits.json holds alpha, beta (with OLS standard errors alpha_se,
beta_se) and R^2 per proxy and method; bon.png and rl.png show points and fitted curves;
points.json holds every point.

Gold: config.gold.kind = 'scorer' (VADER + exact grammar fluency, tasks/gold.py) or 'rm' (a
gold reward model trained from the SFT checkpoint on gold.n_pairs labels, as in Gao et al.;
slower). All stages resume.
"""

from __future__ import annotations

import copy
import json
import os
import time

import numpy as np

from common import data_io
from experiments import fits
from experiments import pipeline as P
from experiments.quickstart import _sub_configs
from tasks.gold import SentimentFluencyGold, SimulatedAnnotator


def _label_file(world, annotator, tokenizer, sft_hf, config, out_path, n_pairs, seed):
    prompts_path = out_path + ".prompts.jsonl"
    P.write_jsonl([{"prompt": q} for q in world.prompts(n_pairs, seed=seed)], prompts_path)
    prompts, grouped = P.sample_responses(
        sft_hf,
        tokenizer,
        prompts_path,
        n_per_prompt=2,
        max_new_tokens=config.sampling.max_new_tokens,
        temperature=1.0,
        seed=seed,
        max_prompt_length=config.sampling.max_prompt_length,
    )
    return P.label_pairs(annotator, prompts, grouped, out_path)


def _fit(fit, d, r, what):
    """fit(d, r), or NaNs and the reason when the points cannot determine (alpha, beta) (e.g. a
    short PPO run whose KL estimates are all <= 0): one bad fit must not lose a finished run."""
    try:
        return fit(d, r)
    except ValueError as e:
        P.log(f"{what}: no fit ({e})")
        return {
            "alpha": float("nan"),
            "beta": float("nan"),
            "r2": float("nan"),
            "alpha_se": float("nan"),
            "beta_se": float("nan"),
            "error": str(e),
        }


def run(config, workdir):
    from ppo.train import train as ppo_train
    from rm.train import train as rm_train
    from sft.train import train as sft_train

    t0 = time.time()
    world, paths = P.build_world(config, workdir)
    scorer = SentimentFluencyGold(world)
    s_cfg, r_base, p_base = _sub_configs(config, paths, workdir)
    P.log("SFT policy")
    if not P.stage_done(os.path.join(workdir, "sft")):
        P.check_preempted(sft_train(s_cfg, os.path.join(workdir, "sft")))
        P.mark_done(os.path.join(workdir, "sft"))
    sft_hf = os.path.join(workdir, "sft", "hf")
    tokenizer = data_io.load_tokenizer(paths["tokenizer"])
    annotator = SimulatedAnnotator(
        scorer, temperature=config.labels.temperature, noise=config.labels.noise, seed=config.seed
    )
    labels_dir = os.path.join(workdir, "labels")
    os.makedirs(labels_dir, exist_ok=True)
    eval_pairs = os.path.join(labels_dir, "eval.jsonl")
    if not os.path.exists(eval_pairs):
        _label_file(world, annotator, tokenizer, sft_hf, config, eval_pairs, config.labels.n_eval_pairs, seed=101)
    max_n = max(config.label_counts)
    all_pairs = os.path.join(labels_dir, f"train_{max_n}.jsonl")
    if not os.path.exists(all_pairs):
        _label_file(world, annotator, tokenizer, sft_hf, config, all_pairs, max_n, seed=102)
    rows = P.read_jsonl(all_pairs)

    # Gold: the scorer itself, or a gold RM trained on many gold labels.
    if config.gold.kind == "rm":
        gold_dir = os.path.join(workdir, "gold_rm")
        gold_pairs = os.path.join(labels_dir, "gold_train.jsonl")
        if not os.path.exists(gold_pairs):
            _label_file(
                world,
                SimulatedAnnotator(scorer, temperature=config.labels.temperature, seed=config.seed + 1),
                tokenizer,
                sft_hf,
                config,
                gold_pairs,
                config.gold.n_pairs,
                seed=103,
            )
        if not P.stage_done(gold_dir):
            g = copy.deepcopy(r_base)
            g.data.train_files, g.data.eval_files = gold_pairs, eval_pairs
            g.train.steps = config.gold.steps
            P.log("gold reward model")
            P.check_preempted(rm_train(g, gold_dir))
            P.mark_done(gold_dir)
        gold_rm = P.ProxyScorer(gold_dir, max_length=r_base.data.max_length)
        gold_fn = None
    elif config.gold.kind == "scorer":
        gold_rm = None
        gold_fn = scorer
    else:
        raise ValueError(f"gold.kind={config.gold.kind!r}; expected 'scorer' or 'rm'")

    def gold_of(prompts, responses):
        if gold_rm is not None:
            return np.asarray(gold_rm(prompts, responses))
        return np.asarray(gold_fn([p + r for p, r in zip(prompts, responses)]))

    # Shared best-of-n samples from the SFT policy.
    bon_path = os.path.join(workdir, "bon_samples.json")
    if not os.path.exists(bon_path):
        prompts, grouped = P.sample_responses(
            sft_hf,
            tokenizer,
            paths["prompts_eval"],
            n_per_prompt=config.bon.n_max,
            max_new_tokens=config.sampling.max_new_tokens,
            temperature=config.sampling.temperature,
            seed=config.seed + 7,
            max_prompt_length=config.sampling.max_prompt_length,
        )
        json.dump({"prompts": prompts, "responses": grouped}, open(bon_path, "w"))
    bon = json.load(open(bon_path))
    flat_p = [p for p, g in zip(bon["prompts"], bon["responses"]) for _ in g]
    flat_r = [r for g in bon["responses"] for r in g]
    bon_gold = gold_of(flat_p, flat_r).reshape(len(bon["prompts"]), -1)
    ns = [n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256) if n <= config.bon.n_max]

    points, fit_results = {"bon": {}, "rl": {}}, {"bon": {}, "rl": {}}
    for count in config.label_counts:
        label = f"{count} labels"
        rm_dir = os.path.join(workdir, f"proxy_{count}")
        if not P.stage_done(rm_dir):
            train_file = os.path.join(labels_dir, f"train_first_{count}.jsonl")
            P.write_jsonl(rows[:count], train_file)
            r = copy.deepcopy(r_base)
            r.data.train_files, r.data.eval_files = train_file, eval_pairs
            P.log(f"proxy RM on {count} labels")
            P.check_preempted(rm_train(r, rm_dir))
            P.mark_done(rm_dir)
        proxy = P.ProxyScorer(rm_dir, max_length=r_base.data.max_length)(flat_p, flat_r).reshape(
            len(bon["prompts"]), -1
        )
        curve = P.best_of_n_curve(np.asarray(proxy), bon_gold, ns)
        points["bon"][label] = {k: [c[k] for c in curve] for k in ("d", "proxy", "gold", "kl", "n")}

        ppo_dir = os.path.join(workdir, f"ppo_{count}")
        if not P.stage_done(ppo_dir):
            p = copy.deepcopy(p_base)
            p.reward.workdir = rm_dir
            p.kl.kind, p.kl.init_beta = "fixed", config.rl.beta
            p.train.steps = config.rl.steps
            P.log(f"PPO against the {count}-label proxy")
            P.check_preempted(ppo_train(p, ppo_dir))
            P.mark_done(ppo_dir)
        curve = P.ppo_gold_curve(ppo_dir, gold_of)
        points["rl"][label] = {k: [c[k] for c in curve] for k in ("d", "proxy", "gold", "kl", "step")}

        for method, fit in (("bon", fits.fit_bon), ("rl", fits.fit_rl)):
            pts = points[method][label]
            d = np.asarray(pts["d"])
            base_gold, base_proxy = pts["gold"][0], pts["proxy"][0]  # reward relative to the start (d ~ 0)
            fit_results[method][label] = {
                "gold": _fit(fit, d, np.asarray(pts["gold"]) - base_gold, f"{method} {label} gold"),
                "proxy": _fit(fit, d, np.asarray(pts["proxy"]) - base_proxy, f"{method} {label} proxy"),
                "gold_offset": base_gold,
                "proxy_offset": base_proxy,
            }
            g = fit_results[method][label]["gold"]
            peak = (
                (fits.peak_d_bon if method == "bon" else fits.peak_d_rl)(g["alpha"], g["beta"])
                if np.isfinite(g["alpha"])
                else float("nan")
            )
            fit_results[method][label]["gold_peak_d"] = float(peak)

    with open(os.path.join(workdir, "points.json"), "w") as f:
        json.dump(points, f, indent=2)
    with open(os.path.join(workdir, "fits.json"), "w") as f:
        json.dump(fit_results, f, indent=2, default=float)
    for method in ("bon", "rl"):
        shifted = {
            label: {
                "d": np.asarray(v["d"]),
                "gold": np.asarray(v["gold"]) - fit_results[method][label]["gold_offset"],
                "proxy": np.asarray(v["proxy"]) - fit_results[method][label]["proxy_offset"],
            }
            for label, v in points[method].items()
        }
        fits.plot_overoptimization(
            shifted,
            {k: {"gold": v["gold"], "proxy": v["proxy"]} for k, v in fit_results[method].items()},
            os.path.join(workdir, f"{method}.png"),
            method=method,
            title=f"{'best-of-n' if method == 'bon' else 'PPO'}: reward gain vs d (gold: {config.gold.kind})",
        )
    summary = {
        "fits": fit_results,
        "wall_time_s": time.time() - t0,
        "label_counts": list(config.label_counts),
        "gold": config.gold.kind,
    }
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=float)
    return summary


def train(config, workdir):
    """Entry point for experiments.run (trainer 'overoptimization')."""
    os.makedirs(workdir, exist_ok=True)
    from common.metrics import write_config_json

    write_config_json(workdir, config)
    try:
        summary = run(config, workdir)
    except P.StagePreempted as stopped:  # SIGTERM inside a stage: saved, unfinished
        return stopped.result
    for method in ("bon", "rl"):
        for label, f in summary["fits"][method].items():
            g = f["gold"]
            P.log(
                f"{method} {label}: gold alpha={g['alpha']:.3f}+-{g['alpha_se']:.3f} "
                f"beta={g['beta']:.3f}+-{g['beta_se']:.3f} "
                f"R2={f['gold']['r2']:.3f} peak d={f['gold_peak_d']:.2f}; proxy alpha={f['proxy']['alpha']:.3f}"
            )
    return summary
