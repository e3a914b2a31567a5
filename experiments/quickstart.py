"""The whole RLHF loop on the built-in review world, with no downloads (configs/quickstart.py).

  python -m experiments.run --config configs/quickstart.py --workdir runs/quickstart

Stages (each resumable; outputs under the workdir):
  data/      the world's tokenizer, SFT corpus and prompt files
  sft/       SFT policy trained from scratch (sft/hf: Hugging Face folder)
  labels/    pairs sampled from the SFT policy, labelled by simulated annotators (gold scorer)
  rm/        proxy reward model trained from the SFT checkpoint, evaluated, normalised
  ppo/       PPO against the proxy RM with the adaptive KL controller
  bon/       best-of-n against the proxy RM (n = 1 .. bon.n_max)
  summary.json, training_curves.png, reward_vs_kl.png
Gold reward (VADER sentiment + exact grammar fluency, tasks/gold.py) is tracked beside the
proxy reward for the SFT policy, every PPO step and every best-of-n point.

The stages' trainer configs are config.sft / config.rm / config.ppo (configs/sft.py, rm.py, ppo.py with
overrides); `_sub_configs` fills in paths, seeds and the shared sampling lengths. labels.n_calibration_pairs
> 0 writes labels/calibration.jsonl and fits the RM's temperature there (ECE reported on eval.jsonl).
config.seeds = (0, 1, 2): labels, RM, best-of-n and PPO once per seed under seed_<s>/ (data/ and sft/
shared at the top), summary.json / summary.md with means and 95% t-intervals across seeds.
"""

from __future__ import annotations

import copy
import json
import os
import time

import numpy as np

from common import data_io
from experiments import pipeline as P
from tasks.gold import SentimentFluencyGold, SimulatedAnnotator


def _sub_configs(config, paths, workdir, *, sft_dir=None):
    """The SFT, RM and PPO trainer configs of a run: config.sft / .rm / .ppo (configs/sft.py, rm.py, ppo.py
    with the driver's overrides) with the run's paths, seed and shared sampling lengths filled in."""
    sc = config.sampling
    sft_dir = sft_dir or os.path.join(workdir, "sft")
    s = copy.deepcopy(config.sft)
    s.model.tokenizer = paths["tokenizer"]
    s.data.train_files, s.data.eval_files = paths["sft_train"], paths["sft_eval"]

    r = copy.deepcopy(config.rm)
    r.seed = config.seed
    r.model.init_from = os.path.join(sft_dir, "hf")
    r.data.train_files = os.path.join(workdir, "labels", "train.jsonl")
    r.data.eval_files = os.path.join(workdir, "labels", "eval.jsonl")
    if config.labels.get("n_calibration_pairs", 0) > 0:  # temperature fitted on its own split, ECE on eval
        r.eval.calibrate_on = os.path.join(workdir, "labels", "calibration.jsonl")
    r.data.max_length = sc.max_prompt_length + sc.max_new_tokens

    p = copy.deepcopy(config.ppo)
    p.seed = config.seed
    p.policy.init_from = os.path.join(sft_dir, "hf")
    p.reward.workdir = os.path.join(workdir, "rm")
    p.data.prompt_files = paths["prompts"]
    p.data.max_prompt_length = sc.max_prompt_length
    p.sampling.max_new_tokens, p.sampling.temperature = sc.max_new_tokens, sc.temperature
    p.train.num_samples = p.train.batch_size  # every rollout of every step (samples_every = 1): the gold curve
    return s, r, p


def run_stages(config, workdir, *, root=None):
    """Run (or resume) every stage; returns the summary dict. `root` (default: workdir) holds the world
    (data/) and the SFT policy (sft/), shared by the seeds of a multi-seed run."""
    from ppo.train import train as ppo_train
    from rm.train import train as rm_train
    from sft.train import train as sft_train

    t0 = time.time()
    times = {}
    root = root or workdir
    sft_dir = os.path.join(root, "sft")
    world, paths = P.build_world(config, root)
    gold = SentimentFluencyGold(world)
    s_cfg, r_cfg, p_cfg = _sub_configs(config, paths, workdir, sft_dir=sft_dir)
    sc = config.sampling

    t = time.time()
    P.log("stage 1/5: SFT policy from scratch")
    if not P.stage_done(sft_dir):
        P.check_preempted(sft_train(s_cfg, sft_dir))
        P.mark_done(sft_dir)
    times["sft"] = time.time() - t
    tokenizer = data_io.load_tokenizer(paths["tokenizer"])
    sft_hf = os.path.join(sft_dir, "hf")

    t = time.time()
    labels_dir = os.path.join(workdir, "labels")
    P.log(f"stage 2/5: sample {config.labels.n_pairs} pairs from the SFT policy and label them")
    if not P.stage_done(labels_dir):
        os.makedirs(labels_dir, exist_ok=True)
        annotator = SimulatedAnnotator(
            gold, temperature=config.labels.temperature, noise=config.labels.noise, seed=config.seed
        )
        n_calibration = config.labels.get("n_calibration_pairs", 0)
        # Calibration pairs come after the train and eval ones, so those stay what they are without them.
        world_prompts = world.prompts(config.labels.n_pairs + config.labels.n_eval_pairs + n_calibration, seed=11)
        prompt_file = os.path.join(labels_dir, "label_prompts.jsonl")
        P.write_jsonl([{"prompt": q} for q in world_prompts], prompt_file)
        prompts, grouped = P.sample_responses(
            sft_hf,
            tokenizer,
            prompt_file,
            n_per_prompt=2,
            max_new_tokens=sc.max_new_tokens,
            temperature=1.0,
            seed=config.seed,
            max_prompt_length=sc.max_prompt_length,
        )
        n = config.labels.n_pairs
        stats_train = P.label_pairs(annotator, prompts[:n], grouped[:n], os.path.join(labels_dir, "train.jsonl"))
        m = n + config.labels.n_eval_pairs
        stats_eval = P.label_pairs(annotator, prompts[n:m], grouped[n:m], os.path.join(labels_dir, "eval.jsonl"))
        if n_calibration:
            P.label_pairs(annotator, prompts[m:], grouped[m:], os.path.join(labels_dir, "calibration.jsonl"))
        P.mark_done(labels_dir, {"train": _jsonable(stats_train), "eval": _jsonable(stats_eval)})
    times["labels"] = time.time() - t

    t = time.time()
    P.log("stage 3/5: proxy reward model from the SFT checkpoint")
    rm_dir = os.path.join(workdir, "rm")
    if not P.stage_done(rm_dir):
        P.check_preempted(rm_train(r_cfg, rm_dir))
        P.mark_done(rm_dir)
    rm_eval = json.load(open(os.path.join(rm_dir, "eval_final.json")))
    times["rm"] = time.time() - t

    t = time.time()
    P.log("stage 4/5: best-of-n against the proxy (and the SFT baseline)")
    bon_dir = os.path.join(workdir, "bon")
    bon_file = os.path.join(bon_dir, "bon.json")
    if not os.path.exists(bon_file):
        os.makedirs(bon_dir, exist_ok=True)
        prompts, grouped = P.sample_responses(
            sft_hf,
            tokenizer,
            paths["prompts_eval"],
            n_per_prompt=config.bon.n_max,
            max_new_tokens=sc.max_new_tokens,
            temperature=sc.temperature,
            seed=config.seed + 7,
            max_prompt_length=sc.max_prompt_length,
        )
        flat_p = [p for p, g in zip(prompts, grouped) for _ in g]
        flat_r = [r for g in grouped for r in g]
        proxy = P.ProxyScorer(rm_dir, max_length=r_cfg.data.max_length)(flat_p, flat_r).reshape(len(prompts), -1)
        golds = gold([p + r for p, r in zip(flat_p, flat_r)]).reshape(len(prompts), -1)
        ns = [n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256) if n <= config.bon.n_max]
        curve = P.best_of_n_curve(proxy, golds, ns)
        with open(bon_file, "w") as f:
            json.dump(
                {"curve": curve, "example": {"prompt": prompts[0], "best": grouped[0][int(np.argmax(proxy[0]))]}},
                f,
                indent=2,
            )
    bon = json.load(open(bon_file))
    times["bon"] = time.time() - t

    t = time.time()
    P.log("stage 5/5: PPO against the proxy reward model (adaptive KL)")
    ppo_dir = os.path.join(workdir, "ppo")
    if not P.stage_done(ppo_dir):
        P.check_preempted(ppo_train(p_cfg, ppo_dir))
        P.mark_done(ppo_dir)
    ppo_curve = P.ppo_gold_curve(ppo_dir, lambda ps, rs: gold([a + b for a, b in zip(ps, rs)]))
    times["ppo"] = time.time() - t

    before = bon["curve"][0]  # n = 1: plain SFT samples
    last = ppo_curve[-max(1, len(ppo_curve) // 10) :]
    after = {k: float(np.mean([r[k] for r in last])) for k in ("proxy", "gold", "kl")}
    summary = {
        "rm": {
            k.split("/", 1)[1]: rm_eval[k]
            for k in (
                "eval/accuracy",
                "eval/ece",
                "eval/brier",
                "eval/margin",
                "eval/accuracy_ci_low",
                "eval/accuracy_ci_high",
                "eval/temperature",
                "eval/calibrated/ece",
                "eval/calibrated/brier",
            )
            if k in rm_eval
        },
        "rm_normalization": rm_eval.get("normalization"),
        "before": {"proxy": before["proxy"], "gold": before["gold"], "kl": 0.0},
        "after_ppo": after,
        "best_of_n": bon["curve"],
        "ppo_curve": ppo_curve,
        "stage_seconds": times,
        "wall_time_s": time.time() - t0,
    }
    return summary


def _jsonable(stats):
    return {
        k: (v.tolist() if hasattr(v, "tolist") else v)
        for k, v in stats.items()
        if not isinstance(v, (list, np.ndarray)) or len(v) < 50
    }


def plot_quickstart(workdir, summary, *, sft_dir=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sft = P.read_jsonl(os.path.join(sft_dir or os.path.join(workdir, "sft"), "metrics.jsonl"))
    rm = P.read_jsonl(os.path.join(workdir, "rm", "metrics.jsonl"))
    ppo = summary["ppo_curve"]
    fig, ax = plt.subplots(1, 4, figsize=(18, 4))
    pts = [(m["step"], m["train/loss"]) for m in sft if "train/loss" in m]
    ev = [(m["step"], m["eval/loss"]) for m in sft if "eval/loss" in m]
    ax[0].plot(*zip(*pts), label="train")
    if ev:
        ax[0].plot(*zip(*ev), "o-", label="held-out")
    ax[0].set(title="SFT next-token loss", xlabel="step")
    ax[0].legend()
    pts = [(m["step"], m["train/loss"], m["train/accuracy"]) for m in rm if "train/loss" in m]
    ax[1].plot([p[0] for p in pts], [p[1] for p in pts], label="BT loss")
    ax[1].plot([p[0] for p in pts], [p[2] for p in pts], label="train accuracy")
    ax[1].set(title=f"reward model (held-out acc {summary['rm'].get('accuracy', float('nan')):.3f})", xlabel="step")
    ax[1].legend()
    steps = [r["step"] for r in ppo]
    ax[2].plot(steps, [r["proxy"] for r in ppo], label="proxy (RM) score")
    ax[2].plot(steps, [r["gold"] for r in ppo], label="gold score")
    ax[2].set(title="PPO rewards", xlabel="PPO step")
    ax[2].legend()
    ax[3].plot(steps, [r["kl"] for r in ppo], color="C3")
    ax[3].set(title="PPO KL(policy || SFT), nats", xlabel="PPO step")
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "training_curves.png"), dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    bon = summary["best_of_n"]
    ax.plot([b["d"] for b in bon], [b["proxy"] for b in bon], "o--", color="C0", mfc="none", label="best-of-n proxy")
    ax.plot([b["d"] for b in bon], [b["gold"] for b in bon], "o-", color="C0", label="best-of-n gold")
    # PPO: one point per iteration (KL does not grow monotonically, so no connecting lines).
    ax.scatter(
        [r["d"] for r in ppo],
        [r["proxy"] for r in ppo],
        marker="s",
        s=14,
        facecolors="none",
        edgecolors="C1",
        label="PPO proxy (per step)",
    )
    ax.scatter(
        [r["d"] for r in ppo], [r["gold"] for r in ppo], marker="s", s=14, color="C1", label="PPO gold (per step)"
    )
    ax.set(xlabel="d = sqrt(KL(policy || SFT))", ylabel="reward", title="gold vs proxy reward against KL")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(workdir, "reward_vs_kl.png"), dpi=90)
    plt.close(fig)


# Rows of the multi-seed table: (name, function of one seed's summary).
SEED_ROWS = (
    ("RM held-out accuracy", lambda s: s["rm"].get("accuracy")),
    ("RM ECE", lambda s: s["rm"].get("ece")),
    ("RM ECE after temperature scaling", lambda s: s["rm"].get("calibrated/ece")),
    ("SFT gold", lambda s: s["before"]["gold"]),
    ("best-of-n_max proxy", lambda s: s["best_of_n"][-1]["proxy"]),
    ("best-of-n_max gold", lambda s: s["best_of_n"][-1]["gold"]),
    ("after PPO proxy", lambda s: s["after_ppo"]["proxy"]),
    ("after PPO gold", lambda s: s["after_ppo"]["gold"]),
    ("after PPO KL (nats)", lambda s: s["after_ppo"]["kl"]),
)


def _report(summary, workdir):
    b, a = summary["before"], summary["after_ppo"]
    rm = summary["rm"]
    P.log(
        f"done in {summary['wall_time_s']:.0f}s: RM accuracy {rm.get('accuracy', float('nan')):.3f} "
        f"ECE {rm.get('ece', float('nan')):.3f} (after temperature {rm.get('temperature', float('nan')):.3g}: "
        f"{rm.get('calibrated/ece', float('nan')):.3f}); proxy {b['proxy']:.3f} -> {a['proxy']:.3f}, "
        f"gold {b['gold']:.3f} -> {a['gold']:.3f}, KL {a['kl']:.2f}; see {workdir}/summary.json"
    )


def train(config, workdir):
    """Entry point for experiments.run (trainer 'quickstart'); config.seeds runs the loop once per seed."""
    os.makedirs(workdir, exist_ok=True)
    from common.metrics import write_config_json
    from experiments.seeds import interval, seed_configs, table_markdown

    write_config_json(workdir, config)
    runs = seed_configs(config, workdir)
    summaries = {}
    t0 = time.time()
    for seed, seed_config, seed_dir in runs:
        try:
            summary = run_stages(seed_config, seed_dir, root=workdir)
        except P.StagePreempted as stopped:  # SIGTERM inside a stage: saved, unfinished
            return stopped.result
        plot_quickstart(seed_dir, summary, sft_dir=os.path.join(workdir, "sft"))
        with open(os.path.join(seed_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        _report(summary, seed_dir)
        summaries[seed] = summary
    if len(runs) == 1:
        return summary
    table = {name: interval([get(s) for s in summaries.values()]) for name, get in SEED_ROWS}
    combined = {"seeds": list(summaries), "table": table, "per_seed": summaries, "wall_time_s": time.time() - t0}
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(combined, f, indent=2)
    markdown = table_markdown(table)
    with open(os.path.join(workdir, "summary.md"), "w") as f:
        f.write(f"Quickstart, seeds {list(summaries)} (95% t-intervals across seeds)\n\n" + markdown)
    P.log("seeds " + str(list(summaries)) + ":\n" + markdown)
    return combined
