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
slower). With 'rm', gold.labels = 'gold' has the gold RM label the proxies' pairs too (Gao et al.'s
setup; 'scorer', the default: the scorer labels them). All stages resume.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time

import numpy as np

from common import data_io
from experiments import fits, parallel, peak_bootstrap
from experiments import pipeline as P
from experiments.quickstart import _sub_configs
from experiments.seeds import format_interval, interval, mean_curve, seed_configs
from tasks.gold import SentimentFluencyGold, SimulatedAnnotator, perturb_responses


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
    perturb_prob = float(config.labels.get("perturb_prob", 0.0))
    perturbed = ""
    if perturb_prob > 0:
        # Degenerate variants among the labelled responses (tasks/gold.py PERTURBATIONS), drawn from their own rng so
        # that the annotator's draws stay those of an unperturbed run: the more labels, the more of each kind a proxy
        # sees, where SFT samples alone rarely show what an optimised policy writes.
        rng = np.random.default_rng([int(seed), 5])
        flat, kinds = perturb_responses(world, [r for g in grouped for r in g[:2]], perturb_prob, rng)
        grouped = [flat[2 * i : 2 * i + 2] for i in range(len(grouped))]
        perturbed = f", {sum(k != 'clean' for k in kinds)} of {len(kinds)} responses perturbed"
    result = P.label_pairs(annotator, prompts, grouped, out_path)
    # Pairs whose two responses are identical carry no preference and are not written: say how many.
    P.log(
        f"{out_path}: {result['written']} labelled pairs of {n_pairs}, {result['skipped_identical']} skipped (identical responses){perturbed}"
    )
    return result


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


def _gold_fn(config, workdir, *, world, scorer, tokenizer, sft_hf, r_base, eval_pairs):
    """gold_of(prompts, responses): the scorer itself, or a gold RM trained on many gold labels (shared by seeds)."""
    from rm.train import train as rm_train

    if config.gold.kind == "scorer":
        return lambda prompts, responses: np.asarray(scorer([p + r for p, r in zip(prompts, responses)]))
    if config.gold.kind != "rm":
        raise ValueError(f"gold.kind={config.gold.kind!r}; expected 'scorer' or 'rm'")
    gold_dir = os.path.join(workdir, "gold_rm")
    gold_pairs = os.path.join(workdir, "labels", "gold_train.jsonl")
    if not os.path.exists(gold_pairs):
        # With gold.labels='gold', labels.temperature is the proxies' annotator's (on the gold RM's normalised
        # scale); the gold RM's own labels keep the scorer's scale, gold.temperature.
        temperature = config.gold.get("temperature", 0.1) if _labels_from_gold(config) else config.labels.temperature
        annotator = SimulatedAnnotator(scorer, temperature=temperature, seed=config.seed + 1)
        _label_file(world, annotator, tokenizer, sft_hf, config, gold_pairs, config.gold.n_pairs, seed=103)
    if not P.stage_done(gold_dir):
        g = copy.deepcopy(r_base)
        g.data.train_files, g.data.eval_files = gold_pairs, eval_pairs
        g.train.steps = config.gold.steps
        P.log("gold reward model")
        P.check_preempted(rm_train(g, gold_dir))
        P.mark_done(gold_dir)
    gold_rm = P.ProxyScorer(gold_dir, max_length=r_base.data.max_length)
    return lambda prompts, responses: np.asarray(gold_rm(prompts, responses))


class _PairGold:
    """gold_of(prompts, responses) as an annotator's scorer (SimulatedAnnotator.pair_gold asks score_pairs)."""

    def __init__(self, gold_of):
        self.score_pairs = gold_of


def _labels_from_gold(config) -> bool:
    """gold.labels = 'gold': the proxies' labels come from the gold itself (with gold.kind='rm', the gold reward
    model, as in Gao et al., where a gold RM labels the proxies' data); 'scorer': from the scorer (default)."""
    source = config.gold.get("labels", "scorer")
    if source not in ("scorer", "gold"):
        raise ValueError(f"gold.labels={source!r}; expected 'scorer' or 'gold'")
    return source == "gold" and config.gold.kind == "rm"


def _labelling_gold_rm(config, workdir, scorer, r_base, *, world, tokenizer, sft_hf):
    """gold_of of the gold RM that labels the seeds' pairs (gold.labels='gold'), trained if not yet, and evaluated
    on its own held-out pairs (labels/gold_eval.jsonl, scorer labels): the seeds' held-out pairs are labelled by it,
    so cannot also be what it is evaluated on."""
    path = os.path.join(workdir, "labels", "gold_eval.jsonl")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        annotator = SimulatedAnnotator(scorer, temperature=config.gold.get("temperature", 0.1), seed=config.seed + 2)
        _label_file(world, annotator, tokenizer, sft_hf, config, path, config.labels.n_eval_pairs, seed=104)
    shared = dict(world=world, tokenizer=tokenizer, sft_hf=sft_hf)
    return _gold_fn(config, workdir, scorer=scorer, r_base=r_base, eval_pairs=path, **shared)


def proxy_steps(config, n_labels: int, batch_size: int, base_steps: int) -> int:
    """Training steps of the proxy on n_labels pairs: rm.train.steps, or with proxy.epochs > 0 that many
    passes over the labels (at least proxy.min_steps), so every label budget sees its data equally often."""
    epochs = float(config.proxy.get("epochs", 0.0))
    if epochs <= 0:
        return int(base_steps)
    return max(int(config.proxy.min_steps), math.ceil(epochs * n_labels / batch_size))


def _proxy_config(config, r_base, train_file, eval_pairs, n_labels):
    """The proxy RM's trainer config: r_base on these files, K members with config.proxy.ensemble_size,
    steps from proxy_steps (warmup and checkpoint cadence shrunk to fit a shorter run)."""
    r = copy.deepcopy(r_base)
    r.data.train_files, r.data.eval_files = train_file, eval_pairs
    r.model.ensemble_size = int(config.proxy.ensemble_size)
    # Proxies of another function class than the gold RM (which keeps r_base's full fine-tune), as Gao et al.'s
    # proxies are smaller than their gold: LoRA of this rank, at its own learning rate.
    if int(config.proxy.get("lora_rank", 0)) > 0:
        r.model.lora_rank = int(config.proxy.lora_rank)
    if float(config.proxy.get("learning_rate", 0.0)) > 0:
        r.train.learning_rate = float(config.proxy.learning_rate)
    steps = proxy_steps(config, n_labels, r.train.batch_size, r.train.steps)
    if steps != r.train.steps:
        r.train.steps = steps
        r.train.warmup_steps = min(r.train.warmup_steps, steps // 10)
        r.train.eval_every = r.train.save_every = min(r.train.save_every, steps)
    return r


def _seed_annotator(config, scorer):
    return SimulatedAnnotator(
        scorer, temperature=config.labels.temperature, noise=config.labels.noise, seed=config.seed
    )


def _eval_pairs(config, workdir, annotator, *, world, tokenizer, sft_hf):
    """This seed's held-out pairs (labels/eval.jsonl), labelled first (the annotator's rng order matters)."""
    eval_pairs = os.path.join(workdir, "labels", "eval.jsonl")
    os.makedirs(os.path.dirname(eval_pairs), exist_ok=True)
    if not os.path.exists(eval_pairs):
        shift = 1000 * int(config.seed)  # sampling seeds of this seed's labels (seed 0: the single-seed ones)
        n_eval = config.labels.n_eval_pairs
        _label_file(world, annotator, tokenizer, sft_hf, config, eval_pairs, n_eval, seed=101 + shift)
    elif not getattr(annotator, "held_out_drawn", False):
        # A resumed workdir whose held-out labels exist: skip the annotator's draws for them, so that training labels
        # written next equal a fresh run's. Without it 5-6% of them differed, and a resumed run's 1500-label best-of-n
        # peak was 1.87 where a fresh run's is 2.71 (2026-12-03, README).
        annotator.skip_labels(config.labels.n_eval_pairs)
    annotator.held_out_drawn = True  # the draws are taken once per annotator, however often this is called
    return eval_pairs


def _cached_bon_scores(path, key, score):
    """The proxy's scores of this seed's best-of-n samples: from `path` when it holds them under the same
    key (the samples' sha256 and the proxy stage's completion time), else score() and keep them there.
    Re-running a finished workdir (new fits, plots) then skips re-scoring 3 x 32,768 samples per seed at
    the documented size; new samples or a retrained proxy re-score."""
    if os.path.exists(path):
        cached = np.load(path)
        if "key" in cached and str(cached["key"]) == key:
            return cached["scores"]
    scores = np.asarray(score())
    np.savez(path, scores=scores, key=np.asarray(key))
    return scores


def _seed_points(config, workdir, *, annotator, world, tokenizer, sft_hf, paths, r_base, p_base, gold_of):
    """One seed: labels, a proxy per label count, best-of-n and PPO against each -> points {bon, rl}."""
    from ppo.train import train as ppo_train
    from rm.train import train as rm_train

    labels_dir = os.path.join(workdir, "labels")
    shift = 1000 * int(config.seed)
    eval_pairs = _eval_pairs(config, workdir, annotator, world=world, tokenizer=tokenizer, sft_hf=sft_hf)
    max_n = max(config.label_counts)
    all_pairs = os.path.join(labels_dir, f"train_{max_n}.jsonl")
    if not os.path.exists(all_pairs):
        _label_file(world, annotator, tokenizer, sft_hf, config, all_pairs, max_n, seed=102 + shift)
    rows = P.read_jsonl(all_pairs)

    # Best-of-n samples from the SFT policy, shared by this seed's proxies.
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
    with open(bon_path, "rb") as f:
        samples_key = hashlib.sha256(f.read()).hexdigest()  # the proxy-score caches are of these samples
    bon = json.load(open(bon_path))
    flat_p = [p for p, g in zip(bon["prompts"], bon["responses"]) for _ in g]
    flat_r = [r for g in bon["responses"] for r in g]
    bon_gold = gold_of(flat_p, flat_r).reshape(len(bon["prompts"]), -1)
    ns = [n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048) if n <= config.bon.n_max]
    objective, uwo_lambda = config.proxy.objective, config.proxy.uwo_lambda

    points = {"bon": {}, "rl": {}}
    for count in config.label_counts:
        label = f"{count} labels"
        rm_dir = os.path.join(workdir, f"proxy_{count}")
        if not P.stage_done(rm_dir):
            train_file = os.path.join(labels_dir, f"train_first_{count}.jsonl")
            P.write_jsonl(rows[:count], train_file)
            P.log(f"proxy RM on {count} labels (seed {config.seed})")
            P.check_preempted(rm_train(_proxy_config(config, r_base, train_file, eval_pairs, count), rm_dir))
            P.mark_done(rm_dir)
        proxy = _cached_bon_scores(
            os.path.join(rm_dir, f"bon_scores_{objective}_{uwo_lambda:g}.npz"),
            f"{samples_key}:{os.stat(os.path.join(rm_dir, 'STAGE_DONE')).st_mtime_ns}",  # samples + this proxy
            lambda: P.ProxyScorer(
                rm_dir, max_length=r_base.data.max_length, objective=objective, uwo_lambda=uwo_lambda
            )(flat_p, flat_r),
        ).reshape(len(bon["prompts"]), -1)
        curve = P.best_of_n_curve(np.asarray(proxy), bon_gold, ns)
        points["bon"][label] = {k: [c[k] for c in curve] for k in ("d", "proxy", "gold", "kl", "n")}
        # Each prompt's own unbiased estimate per n ([P][len(ns)]; their mean is "gold"): the bootstrap's units.
        units = np.stack([fits.best_of_n_prompt_estimates(proxy, bon_gold, n)[1] for n in ns], axis=1)
        points["bon"][label]["gold_units"] = units.tolist()

        ppo_dir = os.path.join(workdir, f"ppo_{count}")
        if not P.stage_done(ppo_dir):
            p = copy.deepcopy(p_base)
            p.reward.workdir = rm_dir
            p.reward.objective, p.reward.uwo_lambda = objective, uwo_lambda
            p.kl.kind, p.kl.init_beta = "fixed", config.rl.beta
            p.train.steps = config.rl.steps
            P.log(f"PPO against the {count}-label proxy (seed {config.seed})")
            P.check_preempted(ppo_train(p, ppo_dir))
            P.mark_done(ppo_dir)
        curve = P.ppo_gold_curve(ppo_dir, gold_of, gold_units=True)
        points["rl"][label] = {k: [c[k] for c in curve] for k in ("d", "proxy", "gold", "kl", "step")}
        points["rl"][label]["gold_units"] = [c["gold_units"] for c in curve]  # [T][rollouts] gold scores
    return points


def _seed_worker(config, workdir, seed, annotator_state=None):
    """One seed's stages in a worker process (config.workers): the world, tokenizer and gold are rebuilt
    from the workdir (the main process has finished SFT and any gold RM), and the seed's points returned.
    annotator_state: the rng state to go on from when the main process already labelled this seed's
    held-out pairs (the gold RM's eval set), so that the training labels are those of the sequential run."""
    world, paths = P.build_world(config, workdir)
    scorer = SentimentFluencyGold(world)
    shared = dict(
        world=world, tokenizer=data_io.load_tokenizer(paths["tokenizer"]), sft_hf=os.path.join(workdir, "sft", "hf")
    )
    [(_, seed_config, seed_dir)] = [r for r in seed_configs(config, workdir) if r[0] == seed]
    _, r_seed, p_seed = _sub_configs(seed_config, paths, seed_dir, sft_dir=os.path.join(workdir, "sft"))
    if _labels_from_gold(config):  # the gold RM (trained by the main process) labels this seed's pairs
        gold_of = _labelling_gold_rm(config, workdir, scorer, r_seed, **shared)
        annotator = _seed_annotator(seed_config, _PairGold(gold_of))  # _seed_points labels the held-out pairs first
    else:
        annotator = _seed_annotator(seed_config, scorer)
        if annotator_state is not None:
            annotator.rng.bit_generator.state = annotator_state  # after the held-out pairs' draws
            annotator.held_out_drawn = True
        eval_pairs = _eval_pairs(seed_config, seed_dir, annotator, **shared)
        gold_of = _gold_fn(config, workdir, scorer=scorer, r_base=r_seed, eval_pairs=eval_pairs, **shared)
    return _seed_points(
        seed_config, seed_dir, annotator=annotator, paths=paths, r_base=r_seed, p_base=p_seed, gold_of=gold_of,
        **shared,
    )  # fmt: skip


def _parallel_seed_points(config, workdir, runs, workers, *, scorer, paths, world, tokenizer, sft_hf):
    """{seed: points} from worker processes, `workers` at a time (experiments/parallel.py); each seed's output
    goes to <seed dir>/stages.log. A gold RM is trained here first, on the first seed's held-out pairs, as in
    the sequential loop; that seed's worker continues the annotator's rng from where labelling them left it."""
    states = [None] * len(runs)
    if _labels_from_gold(config):
        _, first_config, first_dir = runs[0]
        _, r_first, _ = _sub_configs(first_config, paths, first_dir, sft_dir=os.path.join(workdir, "sft"))
        _labelling_gold_rm(config, workdir, scorer, r_first, world=world, tokenizer=tokenizer, sft_hf=sft_hf)
    elif config.gold.kind == "rm":
        _, first_config, first_dir = runs[0]
        _, r_first, _ = _sub_configs(first_config, paths, first_dir, sft_dir=os.path.join(workdir, "sft"))
        annotator = _seed_annotator(first_config, scorer)
        shared = dict(world=world, tokenizer=tokenizer, sft_hf=sft_hf)
        eval_pairs = _eval_pairs(first_config, first_dir, annotator, **shared)
        _gold_fn(config, workdir, scorer=scorer, r_base=r_first, eval_pairs=eval_pairs, **shared)
        states[0] = annotator.rng.bit_generator.state
    P.log(f"{len(runs)} seeds in {min(workers, len(runs))} worker processes")
    jobs = [
        dict(config=config, workdir=workdir, seed=seed, annotator_state=state)
        for (seed, _, _), state in zip(runs, states)
    ]
    results = parallel.run_in_processes(
        _seed_worker, jobs, workers=workers, log_paths=[os.path.join(d, "stages.log") for _, _, d in runs]
    )
    return {seed: points for (seed, _, _), points in zip(runs, results)}


def fit_points(points: dict, rl_block: int = 1) -> dict:
    """Gao fits of gold and proxy gains (relative to the first point) per method and proxy, with the gold peak.
    PPO is fitted on points of rl_block iterations each after the first (peak_bootstrap.block_points); with
    rl_block > 1 the per-iteration fit's R^2 is kept beside it ("r2_per_iteration")."""
    fit_results = {"bon": {}, "rl": {}}
    for method, fit in (("bon", fits.fit_bon), ("rl", fits.fit_rl)):
        block = rl_block if method == "rl" else 1
        for label, pts in points[method].items():
            base_gold, base_proxy = pts["gold"][0], pts["proxy"][0]  # reward relative to the start (d ~ 0)
            d, gold = peak_bootstrap.block_points(pts["d"], np.asarray(pts["gold"]) - base_gold, block)
            _, proxy = peak_bootstrap.block_points(pts["d"], np.asarray(pts["proxy"]) - base_proxy, block)
            fit_results[method][label] = {
                "gold": _fit(fit, d, gold, f"{method} {label} gold"),
                "proxy": _fit(fit, d, proxy, f"{method} {label} proxy"),
                "gold_offset": base_gold,
                "proxy_offset": base_proxy,
            }
            if block > 1:
                raw_d, raw_gold = np.asarray(pts["d"]), np.asarray(pts["gold"]) - base_gold
                fit_results[method][label]["gold"]["r2_per_iteration"] = _fit(fit, raw_d, raw_gold, label).get("r2")
                fit_results[method][label]["block"] = int(block)
            g = fit_results[method][label]["gold"]
            peak = (
                (fits.peak_d_bon if method == "bon" else fits.peak_d_rl)(g["alpha"], g["beta"], d_max=float(d.max()))
                if np.isfinite(g["alpha"])
                else float("nan")
            )
            fit_results[method][label]["gold_peak_d"] = float(peak)
    return fit_results


def average_points(per_seed: list[dict]) -> dict:
    """Seed-averaged curves: best-of-n point-wise per n, PPO per iteration (d, proxy, gold averaged); the
    per-unit gold lists (gold_units) stay per seed (experiments/peak_bootstrap.py resamples them)."""
    return {
        method: {
            label: mean_curve(
                [p[method][label] for p in per_seed], [k for k in per_seed[0][method][label] if k != "gold_units"]
            )
            for label in per_seed[0][method]
        }
        for method in ("bon", "rl")
    }


def across_seeds(per_seed_fits: list[dict]) -> dict:
    """t-intervals across seeds of each per-seed fit's gold alpha, beta, R^2 and peak d."""
    out = {}
    for method in ("bon", "rl"):
        out[method] = {}
        for label in per_seed_fits[0][method]:
            fs = [f[method][label] for f in per_seed_fits]
            out[method][label] = {
                "gold_peak_d": interval([f["gold_peak_d"] for f in fs]),
                **{f"gold_{k}": interval([f["gold"][k] for f in fs]) for k in ("alpha", "beta", "r2")},
            }
    return out


def run(config, workdir):
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
    runs = seed_configs(config, workdir)
    shared = dict(world=world, tokenizer=tokenizer, sft_hf=sft_hf)
    workers = int(config.get("workers", 0))
    if workers > 0:
        per_seed = _parallel_seed_points(config, workdir, runs, workers, scorer=scorer, paths=paths, **shared)
    else:
        gold_of = None
        per_seed = {}
        for seed, seed_config, seed_dir in runs:
            _, r_seed, p_seed = _sub_configs(seed_config, paths, seed_dir, sft_dir=os.path.join(workdir, "sft"))
            if _labels_from_gold(config) and gold_of is None:  # the gold RM first: it labels every seed's pairs
                gold_of = _labelling_gold_rm(config, workdir, scorer, r_seed, **shared)
            annotator = _seed_annotator(seed_config, _PairGold(gold_of) if _labels_from_gold(config) else scorer)
            eval_pairs = _eval_pairs(seed_config, seed_dir, annotator, **shared)
            if gold_of is None:  # one gold for every seed; a gold RM is evaluated on the first seed's held-out pairs
                gold_of = _gold_fn(config, workdir, scorer=scorer, r_base=r_seed, eval_pairs=eval_pairs, **shared)
            per_seed[seed] = _seed_points(
                seed_config, seed_dir, annotator=annotator, paths=paths, r_base=r_seed, p_base=p_seed,
                gold_of=gold_of, **shared,
            )  # fmt: skip
    points = per_seed[runs[0][0]] if len(runs) == 1 else average_points(list(per_seed.values()))
    rl_block = int(config.rl.get("fit_block", 1))
    fit_results = fit_points(points, rl_block)
    b_cfg = config.get("bootstrap") or {}
    resamples, b_seed = int(b_cfg.get("resamples", 1000)), int(b_cfg.get("seed", 0))
    rl_window = int(b_cfg.get("rl_window", 11))
    P.log(f"bootstrap of the gold peaks ({resamples} resamples)")
    bootstrap = {
        m: peak_bootstrap.bootstrap_peaks(
            list(per_seed.values()), m, resamples=resamples, seed=b_seed, rl_window=rl_window, rl_block=rl_block
        )
        for m in ("bon", "rl")
    }
    summary_extra = {}
    if len(runs) > 1:
        seed_fits = {seed: fit_points(p, rl_block) for seed, p in per_seed.items()}
        summary_extra = {"seeds": list(per_seed), "across_seeds": across_seeds(list(seed_fits.values()))}
        with open(os.path.join(workdir, "points_per_seed.json"), "w") as f:
            json.dump({str(k): v for k, v in per_seed.items()}, f, indent=2)
        with open(os.path.join(workdir, "fits_per_seed.json"), "w") as f:
            json.dump({str(k): v for k, v in seed_fits.items()}, f, indent=2, default=float)

    with open(os.path.join(workdir, "points.json"), "w") as f:
        json.dump(points, f, indent=2)
    with open(os.path.join(workdir, "fits.json"), "w") as f:
        json.dump(dict(fit_results, bootstrap=bootstrap, **summary_extra), f, indent=2, default=float)
    averaged = f", mean of seeds {list(per_seed)}" if len(runs) > 1 else ""
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
            title=f"{'best-of-n' if method == 'bon' else 'PPO'}: reward gain vs d (gold: {config.gold.kind}{averaged})",
        )
    summary = {
        "fits": fit_results,
        "wall_time_s": time.time() - t0,
        "label_counts": list(config.label_counts),
        "gold": config.gold.kind,
        "bootstrap": bootstrap,
        **summary_extra,
    }
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=float)
    if len(runs) > 1:
        with open(os.path.join(workdir, "summary.md"), "w") as f:
            f.write(seed_table_markdown(summary))
    return summary


def _seed_peaks_cell(record: dict, far: float = 1e3) -> str:
    """Per-seed gold peaks, mean (95% t-interval); the seeds' own values instead when one lies beyond `far` or is
    inf (a fit with beta near 0 puts its peak at exp(alpha / beta - 1), e.g. 1e80, where a mean means nothing)."""
    values = [float(v) for v in record["values"]]
    if all(math.isfinite(v) and v <= far for v in values):
        return format_interval(record, 2)
    shown = [f"> {far:g}" if v > far else ("nan" if math.isnan(v) else f"{v:.2f}") for v in values]
    return "per seed " + " / ".join(shown)


def seed_table_markdown(summary: dict) -> str:
    """Markdown: per method and proxy, the fit on the seed-averaged curve (+- SE), the bootstrap interval of
    its peak, the per-seed peaks' interval; then per method how often the peak moves out with more labels."""
    boot = summary.get("bootstrap") or {}
    lines = [
        f"Seeds {summary['seeds']}: fits on the seed-averaged curves (alpha, beta +- OLS SE); its gold peak d with "
        "a 95% percentile bootstrap interval (units resampled within each seed: best-of-n prompts, PPO rollouts "
        "per iteration); gold peak d of each seed's own fit, mean (95% t-interval across seeds); the observed peak: "
        "d of the averaged gold curve's highest point (PPO: running mean over iterations), with its bootstrap "
        "interval (a lower bound where it sits at the largest d measured)\n",
        "| method | proxy | gold alpha +- SE | gold beta +- SE | R^2 | peak d (avg curve) | "
        "peak d 95% bootstrap CI (prompts / rollouts) | peak d across seeds | observed peak d (95% CI) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method in ("bon", "rl"):
        for label, f in summary["fits"][method].items():
            g = f["gold"]
            seeds = summary["across_seeds"][method][label]["gold_peak_d"]
            ci = peak_bootstrap.format_ci(boot[method][label]) if method in boot else "n/a"
            seen = peak_bootstrap.format_observed(boot[method][label]) if method in boot else "n/a"
            raw = g.get("r2_per_iteration")
            per_iteration = f" ({raw:.2f} per iteration, {f['block']} per point)" if raw is not None else ""
            lines.append(
                f"| {method} | {label} | {g['alpha']:.3f} +- {g['alpha_se']:.3f} | {g['beta']:.3f} +- "
                f"{g['beta_se']:.3f} | {g['r2']:.2f}{per_iteration} | {f['gold_peak_d']:.2f} | {ci} | {_seed_peaks_cell(seeds)} | {seen} |"
            )
    lines.append("")
    for method in boot:
        pairing = "paired prompt resamples" if method == "bon" else "independent rollout resamples"
        order = ", ".join(f"P({k.replace(' < ', ' peak < ')} peak) = {v:.3f}" for k, v in boot[method]["order"].items())
        lines.append(f"- {method}: fraction of bootstrap replicates ({pairing}) with the peak further out: {order}")
        if "order_observed" in boot[method]:
            seen = ", ".join(f"{k.replace(' < ', ' -> ')} {v:.3f}" for k, v in boot[method]["order_observed"].items())
            lines.append(f"  - observed peaks further out: {seen}")
    return "\n".join(lines) + "\n"


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
                f"R2={f['gold']['r2']:.3f}"
                + (f" (per iteration {g['r2_per_iteration']:.3f})" if "r2_per_iteration" in g else "")
                + f" peak d={f['gold_peak_d']:.2f}; proxy alpha={f['proxy']['alpha']:.3f}"
            )
    return summary
