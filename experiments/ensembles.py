"""Coste et al. (ICLR 2024) on the built-in review world: a single RM vs ensembles (mean / wco / uwo), best-of-n
and PPO, with and without label noise (configs/ensembles.py).

  python -m experiments.run --config configs/ensembles.py --workdir runs/ensembles

Stages (each resumes), per seed (workdir/seed_<s> with several seeds) and noise level (noise_<p>/):
  labels     coste.n_labels pairs from the SFT policy, labelled by annotators who flip a label with
             probability p (the held-out pairs, labels/eval.jsonl of the seed, are noise-free)
  rm/        K reward models in one run (model.ensemble_size = K): member 0 is the single RM
  best-of-n  the seed's SFT samples scored by every member; each variant picks by its own score
  ppo_<v>/   PPO with a fixed small KL coefficient against variant v (reward.objective)
The world, SFT policy and best-of-n samples are shared by the noise levels. Gold gains are relative to
the SFT policy (best-of-1). Peak: best-of-n's best n, PPO's best `coste.window`-iteration mean; end:
best-of-n_max, PPO's last window. Intervals: 95% t across seeds, or (one seed) percentile bootstrap over
prompts (best-of-n) or over the rollouts in the window (PPO).
"""

from __future__ import annotations

import copy
import json
import os
import time

import numpy as np

from common import data_io
from common.stats import bootstrap_ci
from experiments import fits, parallel
from experiments import pipeline as P
from experiments.overoptimization import _label_file
from experiments.quickstart import _sub_configs
from experiments.seeds import format_interval, interval, seed_configs
from rm.ensemble import OBJECTIVES, combine_scores
from tasks.gold import SentimentFluencyGold, SimulatedAnnotator


def variant_scores(member_scores, variant: str, *, uwo_lambda: float):
    """[N] scores of a variant from [K, N] member scores: 'single' = member 0, else an ensemble objective."""
    if variant == "single":
        return np.asarray(member_scores[0], np.float64)
    if variant not in OBJECTIVES:
        raise ValueError(f"config.coste.variants has {variant!r}; expected 'single' or one of {OBJECTIVES}")
    return combine_scores(member_scores, objective=variant, uwo_lambda=uwo_lambda)


def best_of_n_per_prompt(proxy, gold, n: int) -> np.ndarray:
    """[P] gold of best-of-n per prompt (the unbiased estimator over each prompt's N samples)."""
    return np.array([fits.best_of_n_estimate(proxy[i : i + 1], gold[i : i + 1], n)[1] for i in range(len(proxy))])


def bon_result(proxy, gold, ns, *, resamples: int, seed: int) -> dict:
    """Best-of-n curve (d, gold gain) and gold gain at the peak n and at n_max, with bootstrap intervals."""
    base = gold.mean(1)  # [P] best-of-1 = the SFT policy's mean gold per prompt
    per_n = np.stack([best_of_n_per_prompt(proxy, gold, n) - base for n in ns])  # [len(ns), P] gains
    curve = per_n.mean(1)
    peak = int(np.argmax(curve))

    def at(i):
        ci = bootstrap_ci(per_n[i], n_resamples=resamples, seed=seed) if resamples else {}
        return {"mean": float(curve[i]), "low": ci.get("low", float("nan")), "high": ci.get("high", float("nan"))}

    return {
        "n": [int(n) for n in ns],
        "d": [float(np.sqrt(fits.bon_kl(n))) for n in ns],
        "gold": [float(g) for g in curve],
        "peak": dict(at(peak), n=int(ns[peak])),
        "end": dict(at(len(ns) - 1), n=int(ns[-1])),
    }


def ppo_result(ppo_dir, gold_of, *, baseline: float, window: int, resamples: int, seed: int) -> dict:
    """PPO gold gain per iteration, and at the best / last `window`-iteration mean, with bootstrap intervals."""
    metrics = {m["step"]: m for m in P.read_jsonl(os.path.join(ppo_dir, "metrics.jsonl"))}
    by_step = {}
    for s in P.read_jsonl(os.path.join(ppo_dir, "samples.jsonl")):
        by_step.setdefault(s["step"], []).append(s)
    steps = sorted(by_step)
    golds = [np.asarray(gold_of([s["prompt"] for s in by_step[t]], [s["response"] for s in by_step[t]])) - baseline
             for t in steps]  # fmt: skip
    kl = [max(float(metrics.get(t, {}).get("objective/kl", np.nan)), 0.0) for t in steps]
    w = max(1, min(window, len(steps)))
    smoothed = [float(np.mean(np.concatenate(golds[i : i + w]))) for i in range(len(steps) - w + 1)]
    peak = int(np.argmax(smoothed))

    def at(i):
        pooled = np.concatenate(golds[i : i + w])
        ci = bootstrap_ci(pooled, n_resamples=resamples, seed=seed) if resamples else {}
        return {"mean": smoothed[i], "low": ci.get("low", float("nan")), "high": ci.get("high", float("nan"))}

    return {
        "step": steps,
        "d": [float(np.sqrt(k)) for k in kl],
        "gold": [float(g.mean()) for g in golds],
        "peak": dict(at(peak), step=int(steps[peak + w - 1])),
        "end": dict(at(len(smoothed) - 1), step=int(steps[-1])),
    }


def _noise_run(config, workdir, *, noise, world, scorer, tokenizer, sft_hf, eval_pairs, r_base, p_base, bon, gold_of):
    """One noise level of one seed: labels, the K-member RM run, best-of-n and PPO per variant -> results."""
    from ppo.train import train as ppo_train
    from rm.train import train as rm_train

    cc = config.coste
    out = os.path.join(workdir, f"noise_{noise:g}")
    os.makedirs(out, exist_ok=True)
    train_pairs = os.path.join(out, "train.jsonl")
    if not os.path.exists(train_pairs):  # same responses at every noise level (sampling seed), noisier labels
        annotator = SimulatedAnnotator(scorer, temperature=config.labels.temperature, noise=noise, seed=config.seed)
        _label_file(world, annotator, tokenizer, sft_hf, config, train_pairs, cc.n_labels, 102 + 1000 * config.seed)
    rm_dir = os.path.join(out, "rm")
    if not P.stage_done(rm_dir):
        r = copy.deepcopy(r_base)
        r.data.train_files, r.data.eval_files = train_pairs, eval_pairs
        r.model.ensemble_size, r.model.ensemble_bootstrap = int(cc.ensemble_size), bool(cc.bootstrap)
        P.log(f"{cc.ensemble_size} reward models in one run (noise {noise:g}, seed {config.seed})")
        P.check_preempted(rm_train(r, rm_dir))
        P.mark_done(rm_dir)
    rm_eval = json.load(open(os.path.join(rm_dir, "eval_final.json")))
    results = {
        "rm": {
            "member_accuracy": [m.get("eval/accuracy") for m in rm_eval["members"]],
            **{f"{o}_accuracy": rm_eval.get(f"eval/ensemble/{o}/accuracy") for o in OBJECTIVES},
        }
    }
    resamples, lam = int(cc.bootstrap_resamples), float(cc.uwo_lambda)
    if "bon" in cc.methods:
        members = P.ProxyScorer(rm_dir, max_length=r_base.data.max_length).members(bon["flat_p"], bon["flat_r"])
        ns = [n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024) if n <= config.bon.n_max]
        shape = bon["gold"].shape
        results["bon"] = {
            v: bon_result(
                variant_scores(members, v, uwo_lambda=lam).reshape(shape), bon["gold"], ns, resamples=resamples,
                seed=config.seed,
            )
            for v in cc.variants
        }  # fmt: skip
    if "ppo" in cc.methods:
        results["ppo"] = {}
        for v in cc.variants:
            ppo_dir = os.path.join(out, f"ppo_{v}")
            if not P.stage_done(ppo_dir):
                p = copy.deepcopy(p_base)
                p.reward.workdir = os.path.join(rm_dir, "members", "0") if v == "single" else rm_dir
                p.reward.objective, p.reward.uwo_lambda = ("mean" if v == "single" else v), lam
                p.kl.kind, p.kl.init_beta, p.train.steps = "fixed", config.rl.beta, config.rl.steps
                P.log(f"PPO against {v} (noise {noise:g}, seed {config.seed})")
                P.check_preempted(ppo_train(p, ppo_dir))
                P.mark_done(ppo_dir)
            results["ppo"][v] = ppo_result(
                ppo_dir, gold_of, baseline=bon["baseline"], window=int(cc.window), resamples=resamples,
                seed=config.seed,
            )  # fmt: skip
    return results


def _gold_of(scorer):
    """gold_of(prompts, responses) -> [N] gold scores of the joined texts."""
    return lambda prompts, responses: np.asarray(scorer([p + r for p, r in zip(prompts, responses)]))


def _seed_inputs(sc, seed_dir, *, world, scorer, tokenizer, sft_hf, paths):
    """This seed's noise-free held-out pairs and best-of-n samples, made when missing -> their two paths."""
    seed = int(sc.seed)
    eval_pairs = os.path.join(seed_dir, "labels", "eval.jsonl")
    os.makedirs(os.path.dirname(eval_pairs), exist_ok=True)
    if not os.path.exists(eval_pairs):  # noise-free held-out pairs: the accuracy against the truth
        clean = SimulatedAnnotator(scorer, temperature=sc.labels.temperature, seed=seed + 500)
        _label_file(world, clean, tokenizer, sft_hf, sc, eval_pairs, sc.labels.n_eval_pairs, 101 + 1000 * seed)
    bon_path = os.path.join(seed_dir, "bon_samples.json")
    if not os.path.exists(bon_path):
        prompts, grouped = P.sample_responses(
            sft_hf, tokenizer, paths["prompts_eval"], n_per_prompt=sc.bon.n_max,
            max_new_tokens=sc.sampling.max_new_tokens, temperature=sc.sampling.temperature, seed=seed + 7,
            max_prompt_length=sc.sampling.max_prompt_length,
        )  # fmt: skip
        json.dump({"prompts": prompts, "responses": grouped}, open(bon_path, "w"))
    return eval_pairs, bon_path


def _bon_inputs(bon_path, scorer) -> dict:
    """The best-of-n samples, flattened, with their gold scores [P, n] and mean (the SFT policy's gold)."""
    samples = json.load(open(bon_path))
    flat_p = [p for p, g in zip(samples["prompts"], samples["responses"]) for _ in g]
    flat_r = [r for g in samples["responses"] for r in g]
    gold = _gold_of(scorer)(flat_p, flat_r).reshape(len(samples["prompts"]), -1)
    return {"flat_p": flat_p, "flat_r": flat_r, "gold": gold, "baseline": float(gold.mean())}


def _noise_worker(config, workdir, seed, noise):
    """One (seed, noise level) run in a worker process (config.workers): the world, tokenizer, held-out pairs
    and best-of-n samples are rebuilt from the workdir, where the main process made them."""
    world, paths = P.build_world(config, workdir)
    scorer = SentimentFluencyGold(world)
    tokenizer, sft_dir = data_io.load_tokenizer(paths["tokenizer"]), os.path.join(workdir, "sft")
    sft_hf = os.path.join(sft_dir, "hf")
    [(_, sc, seed_dir)] = [r for r in seed_configs(config, workdir) if r[0] == seed]
    _, r_base, p_base = _sub_configs(sc, paths, seed_dir, sft_dir=sft_dir)
    shared = dict(world=world, scorer=scorer, tokenizer=tokenizer, sft_hf=sft_hf)
    eval_pairs, bon_path = _seed_inputs(sc, seed_dir, paths=paths, **shared)
    return _noise_run(
        sc, seed_dir, noise=noise, eval_pairs=eval_pairs, r_base=r_base, p_base=p_base,
        bon=_bon_inputs(bon_path, scorer), gold_of=_gold_of(scorer), **shared,
    )  # fmt: skip


def run(config, workdir):
    from sft.train import train as sft_train

    t0 = time.time()
    world, paths = P.build_world(config, workdir)
    scorer = SentimentFluencyGold(world)
    s_cfg, _, _ = _sub_configs(config, paths, workdir)
    sft_dir = os.path.join(workdir, "sft")
    if not P.stage_done(sft_dir):
        P.log("SFT policy")
        P.check_preempted(sft_train(s_cfg, sft_dir))
        P.mark_done(sft_dir)
    sft_hf = os.path.join(sft_dir, "hf")
    tokenizer = data_io.load_tokenizer(paths["tokenizer"])

    runs = seed_configs(config, workdir)
    shared = dict(world=world, scorer=scorer, tokenizer=tokenizer, sft_hf=sft_hf, paths=paths)
    noises = [float(noise) for noise in config.coste.noise_levels]
    per_seed = {}
    workers = int(config.get("workers", 0))
    if workers > 0:  # every (seed, noise level) run in its own worker process, after the shared samples exist
        for seed, sc, seed_dir in runs:
            _seed_inputs(sc, seed_dir, **shared)  # files only: each worker reads and scores its seed's samples
        jobs = [dict(config=config, workdir=workdir, seed=seed, noise=noise) for seed, _, _ in runs for noise in noises]
        logs = [os.path.join(d, f"noise_{noise:g}", "stages.log") for _, _, d in runs for noise in noises]
        P.log(f"{len(jobs)} (seed, noise level) runs in {min(workers, len(jobs))} worker processes")
        results = iter(parallel.run_in_processes(_noise_worker, jobs, workers=workers, log_paths=logs))
        per_seed = {seed: {f"{noise:g}": next(results) for noise in noises} for seed, _, _ in runs}
    else:
        for seed, sc, seed_dir in runs:
            _, r_base, p_base = _sub_configs(sc, paths, seed_dir, sft_dir=sft_dir)
            eval_pairs, bon_path = _seed_inputs(sc, seed_dir, **shared)
            bon = _bon_inputs(bon_path, scorer)
            per_seed[seed] = {
                f"{noise:g}": _noise_run(
                    sc, seed_dir, noise=noise, world=world, scorer=scorer, tokenizer=tokenizer, sft_hf=sft_hf,
                    eval_pairs=eval_pairs, r_base=r_base, p_base=p_base, bon=bon, gold_of=_gold_of(scorer),
                )
                for noise in noises
            }  # fmt: skip
    table = summary_table(per_seed, config)
    results = {"seeds": list(per_seed), "table": table, "per_seed": per_seed, "wall_time_s": time.time() - t0}
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=float)
    with open(os.path.join(workdir, "table.md"), "w") as f:
        f.write(table_markdown(table, seeds=list(per_seed)))
    plot(per_seed, config, workdir)
    return results


def summary_table(per_seed: dict, config) -> list[dict]:
    """Rows (noise, method, variant): gold gain at the peak and at the end, mean and 95% interval."""
    rows, seeds = [], list(per_seed)
    for noise in (f"{n:g}" for n in config.coste.noise_levels):
        for method in (m for m in ("bon", "ppo") if m in config.coste.methods):
            for variant in config.coste.variants:
                row = {"noise": noise, "method": method, "variant": variant}
                for at in ("peak", "end"):
                    results = [per_seed[s][noise][method][variant][at] for s in seeds]
                    if len(seeds) > 1:
                        row[at] = interval([r["mean"] for r in results])
                    else:  # one seed: the bootstrap interval over prompts / rollouts
                        row[at] = dict(results[0], n=1, values=[results[0]["mean"]])
                rows.append(row)
    return rows


def table_markdown(rows: list[dict], *, seeds) -> str:
    how = "95% t-interval across seeds" if len(seeds) > 1 else "95% bootstrap over prompts / rollouts, one seed"
    lines = [
        f"Gold reward gain over the SFT policy, seeds {seeds} ({how})\n",
        "| label noise | method | reward | gold at peak | gold at end |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['noise']} | {r['method']} | {r['variant']} | {format_interval(r['peak'])} | "
            f"{format_interval(r['end'])} |"
        )
    return "\n".join(lines) + "\n"


def plot(per_seed: dict, config, workdir: str) -> None:
    """bon.png / ppo.png: gold gain against d (best-of-n) or iteration (PPO), one panel per noise level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = per_seed[next(iter(per_seed))]
    for method, x_key, x_label in (("bon", "d", "d = sqrt(KL)"), ("ppo", "step", "PPO iteration")):
        if method not in config.coste.methods:
            continue
        fig, axes = plt.subplots(1, len(first), figsize=(5.5 * len(first), 4), squeeze=False)
        for ax, noise in zip(axes[0], first):
            for variant in config.coste.variants:
                curves = [per_seed[s][noise][method][variant] for s in per_seed]
                length = min(len(c["gold"]) for c in curves)
                x = curves[0][x_key][:length]
                ax.plot(x, np.mean([c["gold"][:length] for c in curves], 0), "o-" if method == "bon" else "-",
                        ms=3, label=variant)  # fmt: skip
            ax.axhline(0.0, color="grey", lw=0.5)
            ax.set(title=f"{method}: label noise {noise}", xlabel=x_label, ylabel="gold gain over SFT")
            ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(workdir, f"{method}.png"), dpi=90)
        plt.close(fig)


def train(config, workdir):
    """Entry point for experiments.run (trainer 'experiments.ensembles')."""
    os.makedirs(workdir, exist_ok=True)
    from common.metrics import write_config_json

    write_config_json(workdir, config)
    try:
        results = run(config, workdir)
    except P.StagePreempted as stopped:  # SIGTERM inside a stage: saved, unfinished
        return stopped.result
    P.log("\n" + table_markdown(results["table"], seeds=results["seeds"]))
    return results
