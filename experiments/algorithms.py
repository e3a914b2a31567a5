"""PPO vs RLOO vs GRPO vs Dr. GRPO vs REINFORCE++ against one proxy reward model (configs/algorithms.py).

  python -m experiments.run --config configs/algorithms.py --workdir runs/algorithms

Stages (each resumes): the review world and SFT policy (experiments/pipeline.py, the quickstart's
settings), labels from simulated annotators and one proxy RM (as experiments/overoptimization.py),
then one PPO-trainer run per algorithm (ppo/algorithms.py presets below) with the same sample budget.
Gold is the world's scorer on every rollout (experiments/pipeline.py ppo_gold_curve); gold and proxy
gains over the first iteration are fitted against d = sqrt(KL) with Gao et al.'s RL form
(experiments/fits.py). Wall time per iteration is the mean of rollout + update time over the
iterations after the first (which compiles); peak memory is the process's peak RSS (each algorithm
runs in its own process when algos.isolate) and the bytes of the train state (params + Adam moments:
the critic-free ones hold no value model).
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import os
import time

import numpy as np

from common import data_io
from experiments import fits
from experiments import pipeline as P
from experiments.overoptimization import _fit, _label_file
from experiments.quickstart import _sub_configs
from tasks.gold import SentimentFluencyGold, SimulatedAnnotator

# name -> (algo.advantage, samples per prompt: 'group' = config.algos.group_size)
PRESETS = {
    "ppo": ("gae", 1),
    "rloo": ("rloo", "group"),
    "grpo": ("grpo", "group"),
    "dr_grpo": ("dr_grpo", "group"),
    "reinforce_pp": ("reinforce_pp", 1),
    "reinforce_baseline": ("reinforce_baseline", "group"),
}


def algorithm_config(p_base, config, name):
    """The PPO-trainer config of one algorithm: same budget, optimiser and fixed beta for all."""
    if name not in PRESETS:
        raise ValueError(f"config.algos.names has {name!r}; expected names from {sorted(PRESETS)}")
    advantage, k = PRESETS[name]
    p = copy.deepcopy(p_base)
    p.algo.advantage = advantage
    p.rollout.samples_per_prompt = config.algos.group_size if k == "group" else k
    p.kl.kind, p.kl.init_beta = "fixed", config.rl.beta
    p.train.steps = config.rl.steps
    p.train.save_every = max(config.rl.steps // 2, 1)
    return p


def _train_child(config, workdir):
    from ppo.train import train as ppo_train

    ppo_train(config, workdir)


def _run_ppo(config, workdir, isolate):
    if not isolate:
        return _train_child(config, workdir)
    proc = multiprocessing.get_context("spawn").Process(target=_train_child, args=(config, workdir))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"{workdir}: the training process exited with code {proc.exitcode}")


def _cost(workdir):
    metrics = P.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    later = metrics[1:] or metrics  # the first iteration compiles
    with open(os.path.join(workdir, "summary.json")) as f:
        summary = json.load(f)
    return {
        "iter_s": float(np.mean([m["time/rollout_s"] + m["time/update_s"] for m in later])),
        "rollout_s": float(np.mean([m["time/rollout_s"] for m in later])),
        "update_s": float(np.mean([m["time/update_s"] for m in later])),
        "peak_rss_mib": summary.get("memory/peak_rss_mib", float("nan")),
        "state_mib": summary["memory/train_state_bytes"] / 2**20,
        "value_mib": summary["memory/value_param_bytes"] / 2**20,
    }


def plot(points, fitted, path):
    """Gold (left) and proxy (right) gain vs d per algorithm: points and fitted RL curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    d_max = max([max(p["d"]) for p in points.values() if p["d"]] + [1e-3])
    grid = np.linspace(0, 1.05 * d_max, 200)
    for i, (name, p) in enumerate(points.items()):
        for ax, kind in zip(axes, ("gold", "proxy")):
            gain = np.asarray(p[kind]) - p[kind][0]
            ax.scatter(p["d"], gain, s=10, color=colors[i % len(colors)], alpha=0.6)
            f = fitted[name][kind]
            if np.isfinite(f["alpha"]):
                ax.plot(
                    grid,
                    fits.rl_curve(grid, f["alpha"], f["beta"]),
                    color=colors[i % len(colors)],
                    label=f"{name} (a={f['alpha']:.2f}, b={f['beta']:.2f})",
                )
    for ax, kind in zip(axes, ("gold", "proxy")):
        ax.axhline(0, color="0.7", linewidth=0.8)
        ax.set_xlabel("d = sqrt(KL)")
        ax.set_ylabel(f"{kind} reward gain over iteration 1")
        ax.set_title(f"{kind} reward vs d, fit d (a - b log d)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def table(rows):
    head = (
        "| algorithm | K | final KL | final proxy gain | final gold gain | best gold gain (at d) | "
        "gold alpha / beta (R^2) | gold peak d | s / iteration (rollout + update) | peak RSS MiB | "
        "train state MiB (value) |\n|---|---:|---:|---:|---:|---|---|---:|---|---:|---|"
    )
    lines = [head]
    for r in rows:
        g = r["fit_gold"]
        lines.append(
            f"| {r['name']} | {r['k']} | {r['final_kl']:.2f} | {r['final_proxy_gain']:+.2f} | "
            f"{r['final_gold_gain']:+.2f} | {r['best_gold_gain']:+.2f} ({r['best_gold_d']:.2f}) | "
            f"{g['alpha']:.3f} / {g['beta']:.3f} ({g['r2']:.2f}) | {r['gold_peak_d']:.2f} | "
            f"{r['iter_s']:.2f} ({r['rollout_s']:.2f} + {r['update_s']:.2f}) | {r['peak_rss_mib']:.0f} | "
            f"{r['state_mib']:.2f} ({r['value_mib']:.2f}) |"
        )
    return "\n".join(lines) + "\n"


def run(config, workdir):
    from rm.train import train as rm_train
    from sft.train import train as sft_train

    t0 = time.time()
    times = {}
    world, paths = P.build_world(config, workdir)
    scorer = SentimentFluencyGold(world)
    s_cfg, r_cfg, p_base = _sub_configs(config, paths, workdir)
    P.log("SFT policy")
    if not P.stage_done(os.path.join(workdir, "sft")):
        sft_train(s_cfg, os.path.join(workdir, "sft"))
        P.mark_done(os.path.join(workdir, "sft"))
    sft_hf = os.path.join(workdir, "sft", "hf")
    tokenizer = data_io.load_tokenizer(paths["tokenizer"])
    annotator = SimulatedAnnotator(
        scorer, temperature=config.labels.temperature, noise=config.labels.noise, seed=config.seed
    )
    os.makedirs(os.path.join(workdir, "labels"), exist_ok=True)
    for path, n, seed in (
        (r_cfg.data.eval_files, config.labels.n_eval_pairs, 101),
        (r_cfg.data.train_files, config.labels.n_pairs, 102),
    ):
        if not os.path.exists(path):
            _label_file(world, annotator, tokenizer, sft_hf, config, path, n, seed=seed)
        else:  # resumed: skip its draws, so that the next file gets a fresh run's labels
            annotator.skip_labels(n)
    rm_dir = os.path.join(workdir, "rm")
    if not P.stage_done(rm_dir):
        P.log(f"proxy RM on {config.labels.n_pairs} labels")
        rm_train(r_cfg, rm_dir)
        P.mark_done(rm_dir)
    times["setup_s"] = time.time() - t0

    def gold_of(prompts, responses):
        return np.asarray(scorer([p + r for p, r in zip(prompts, responses)]))

    points, fitted, rows = {}, {}, []
    for name in config.algos.names:
        p = algorithm_config(p_base, config, name)
        run_dir = os.path.join(workdir, name)
        t = time.time()
        if not P.stage_done(run_dir):
            P.log(
                f"{name}: {p.train.steps} iterations x {p.train.batch_size} rollouts "
                f"(K = {p.rollout.samples_per_prompt})"
            )
            _run_ppo(p, run_dir, config.algos.isolate)
            P.mark_done(run_dir)
        times[f"{name}_s"] = time.time() - t
        curve = P.ppo_gold_curve(run_dir, gold_of)
        pts = {k: [c[k] for c in curve] for k in ("d", "proxy", "gold", "kl", "step")}
        points[name] = pts
        d = np.asarray(pts["d"])
        fitted[name] = {
            kind: _fit(fits.fit_rl, d, np.asarray(pts[kind]) - pts[kind][0], f"{name} {kind}")
            for kind in ("gold", "proxy")
        }
        g = fitted[name]["gold"]
        peak = fits.peak_d_rl(g["alpha"], g["beta"], d_max=float(d.max())) if np.isfinite(g["alpha"]) else float("nan")
        fitted[name]["gold_peak_d"] = float(peak)
        gold_gain = np.asarray(pts["gold"]) - pts["gold"][0]
        best = int(np.argmax(gold_gain))
        rows.append(
            dict(
                name=name,
                k=p.rollout.samples_per_prompt,
                final_kl=pts["kl"][-1],
                final_proxy_gain=pts["proxy"][-1] - pts["proxy"][0],
                final_gold_gain=float(gold_gain[-1]),
                best_gold_gain=float(gold_gain[best]),
                best_gold_d=pts["d"][best],
                fit_gold=g,
                gold_peak_d=float(peak),
                **_cost(run_dir),
            )
        )

    with open(os.path.join(workdir, "points.json"), "w") as f:
        json.dump(points, f, indent=2)
    with open(os.path.join(workdir, "fits.json"), "w") as f:
        json.dump(fitted, f, indent=2, default=float)
    with open(os.path.join(workdir, "table.md"), "w") as f:
        f.write(table(rows))
    plot(points, fitted, os.path.join(workdir, "reward_vs_kl.png"))
    summary = {"rows": rows, "times_s": times, "wall_time_s": time.time() - t0}
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=float)
    return summary


def train(config, workdir):
    """Entry point for experiments.run (config.trainer = 'experiments.algorithms')."""
    from common.metrics import write_config_json

    os.makedirs(workdir, exist_ok=True)
    write_config_json(workdir, config)
    summary = run(config, workdir)
    with open(os.path.join(workdir, "table.md")) as f:
        print(f.read(), flush=True)
    P.log(f"done in {summary['wall_time_s']:.0f} s")
    return summary
