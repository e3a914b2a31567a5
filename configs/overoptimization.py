"""Reward-model over-optimisation (Gao et al. 2022): proxies at several label counts, best-of-n and PPO.

  python -m experiments.run --config configs/overoptimization.py --workdir runs/overopt

Writes points.json, fits.json (alpha, beta, R^2 per proxy and method), bon.png, rl.png and
summary.json. Variant `:size=tiny` for tests; `:gold=rm` for Gao et al.'s setup (a gold reward model labels and
judges LoRA proxies; `configs/overoptimization.py:gold=rm`). Shares the quickstart's world/policy settings.

The documented size runs three seeds (labels, proxies, best-of-n samples and PPO per seed; one world and
SFT policy), fits on the seed-averaged curves and each seed's gold peak with its 95% interval (fits.json,
summary.md). One seed: --config.seeds='()'.
"""

import ml_collections

import configs.quickstart as quickstart
from configs.common import parse_arg


def get_config(arg=None):
    args = parse_arg(arg, size="default", gold="scorer")
    c = quickstart.get_config("size=tiny" if args["size"] == "tiny" else None)
    c.trainer = "overoptimization"
    c.seeds = (0, 1, 2)
    # Worker processes that run the seeds side by side (experiments/parallel.py); 0: one after another in this
    # process. One seed keeps 1.4 of this machine's 2 cores busy on average, so 3 workers use the rest.
    c.workers = 3
    # Proxy reward models on these many labelled pairs, each for proxy.epochs passes over its labels. Decades
    # apart, so that the proxies differ in quality beyond the held-out accuracy's noise (+-0.055 on 300 pairs):
    # at the quickstart's 300 steps for every budget, 250 and 1000 labels came out equally good (0.597, 0.604
    # over 3 seeds; the 1000-label proxy needed a temperature of 18, overfit at 10 epochs).
    c.label_counts = (100, 1000, 10000)
    c.labels.n_eval_pairs = 300
    # A sharper annotator than the quickstart's 0.3: with 0.3, proxy accuracy saturates near 0.65 from 3000 labels
    # on (label noise), and the best-of-n gold peak of seed 0 did not move out with labels (1.15 at 1000 labels,
    # 3.32 at 3000, 2.39 at 10000); at 0.1 it did (0.92 / 1.53 / 3.52 at 100 / 1000 / 10000, accuracy
    # 0.54 / 0.62 / 0.71), pilot of 2026-12-01.
    c.labels.temperature = 0.1
    # > 0: each labelled response is replaced with this probability by a degenerate variant (tasks/gold.py
    # PERTURBATIONS), so that a proxy's share of what an optimised policy writes grows with its label count.
    c.labels.perturb_prob = 0.0

    c.gold = ml_collections.ConfigDict()
    c.gold.kind = "scorer"  # 'scorer' (VADER + exact grammar fluency) or 'rm' (gold RM trained on gold labels)
    c.gold.n_pairs = 20000  # labels for the gold RM (gold.kind='rm')
    c.gold.steps = 1500  # gold RM training steps
    # Who labels the proxies' pairs: 'scorer' (the annotator over the scorer) or 'gold' (with kind='rm': over the
    # gold RM's normalised scores, as in Gao et al.; labels.temperature is then on that scale). gold.temperature:
    # the annotator of the gold RM's own labels when they differ (scorer scale; std of SFT samples' gold 1.55).
    c.gold.labels = "scorer"
    c.gold.temperature = 0.1

    c.proxy = ml_collections.ConfigDict()
    c.proxy.ensemble_size = 1  # K > 1: each proxy is K reward models trained in one run (rm/ensemble_train.py)
    c.proxy.objective = "mean"  # how an ensemble proxy scores, in best-of-n and PPO: mean | wco | uwo
    c.proxy.uwo_lambda = 1.0  # uwo = mean - uwo_lambda * variance over members
    c.proxy.epochs = 2.0  # > 0: each proxy trains this many passes over its labels (else rm.train.steps)
    # With proxy.epochs: the fewest steps a proxy trains (50: 16 epochs over 100 labels). At 0 (2 epochs for every
    # budget: 7, 63 and 625 steps) the 100-label proxy's best-of-n peak came out at d = 0.78-0.85 in every seed,
    # ordered against 1,000 labels in 1.000 of bootstrap replicates (0.48 at 50 steps), but PPO against it
    # collapsed the gold at d ~ 1.5-2.8 (R^2 0.78); a documented trade-off, run of 2026-12-02 in the README.
    c.proxy.min_steps = 50
    # > 0: the proxies (not the gold RM) are LoRA of this rank on the SFT base, at proxy.learning_rate (> 0; else
    # rm.train.learning_rate): a function class other than the gold RM's full fine-tune (gold.kind='rm').
    c.proxy.lora_rank = 0
    c.proxy.learning_rate = 0.0

    c.rl = ml_collections.ConfigDict()
    c.rl.beta = 0.002  # small fixed KL coefficient, so the policy travels far from the SFT policy
    c.rl.steps = 150  # PPO iterations per proxy
    # PPO iterations per fitted point after the first (d = 0): 1 fits every iteration's 32 rollouts per seed; k > 1
    # their means over k iterations, a checkpoint's measurement (fits.json keeps the per-iteration R^2 beside it).
    # Against the gold RM one iteration's gold has a standard error of ~0.1 over 3 seeds, which alone caps the
    # per-iteration R^2 near 0.9 (runs/gl2, README).
    c.rl.fit_block = 1
    # The quickstart's PPO learning rate (1e-4) takes the policy to d = 2-2.8 within 10 iterations, where
    # the gold peak already lies, and spends the other 140 on a plateau at d = 5-15: 5x slower spreads
    # the RL curve over the rise and the fall (measured on 2026-12-01, seeds 0 and 2).
    c.ppo.train.learning_rate = 2e-5

    # Samples per prompt for best-of-n (n = 1 .. 2048: d up to 2.57 through the unbiased estimator), on fewer
    # prompts than the quickstart's so that sampling and scoring 3 x 32,768 responses per seed stays minutes.
    c.bon.n_max = 2048
    c.world.n_eval_prompts = 16

    # Percentile bootstrap of the seed-averaged curve's fitted gold peak (experiments/peak_bootstrap.py):
    # best-of-n prompts / PPO rollouts resampled within each seed, this many times, from this rng seed.
    c.bootstrap = ml_collections.ConfigDict()
    c.bootstrap.resamples = 1000
    c.bootstrap.seed = 0
    # The observed (model-free) peak beside the fitted one: PPO's gold averaged over this many iterations (odd)
    # before its highest point is read off; one iteration's 32 rollouts are too noisy for a raw argmax.
    c.bootstrap.rl_window = 11
    if args["gold"] not in ("scorer", "rm"):
        raise ValueError(f"configs/overoptimization.py: gold={args['gold']!r}; expected 'scorer' or 'rm'")
    if args["gold"] == "rm":
        # Gao et al.'s own setup (README, "LoRA proxies against the gold RM"): a gold RM labels the proxies' pairs
        # (at 0.065 on its normalised scale, about the scorer's 0.1 / 1.55) and judges them; the proxies are rank-8
        # LoRA, a smaller function class than the gold's full fine-tune; PPO warms up over 10 of 200 iterations and
        # is fitted on means over 5 iterations (one iteration's gold is too noisy against the gold RM).
        c.gold.kind, c.gold.labels = "rm", "gold"
        c.labels.temperature = 0.065
        c.proxy.lora_rank, c.proxy.learning_rate = 8, 1e-3
        c.ppo.train.warmup_steps, c.rl.steps, c.rl.fit_block = 80, 200, 5
    if args["size"] == "tiny":
        c.seeds, c.workers = (), 0
        c.label_counts = (16, 32, 64)
        c.labels.temperature = 0.3  # the quickstart's annotator and the trainer's own RM steps at tiny size
        c.proxy.epochs = 0.0
        c.labels.n_eval_pairs = 16
        c.rl.steps = 6
        c.ppo.train.learning_rate = 1e-4  # the tiny quickstart's: a few iterations must move the policy
        c.bon.n_max = 4
        c.gold.n_pairs, c.gold.steps = 64, 5
        c.world.n_eval_prompts = 8  # best-of-n prompts
        c.bootstrap.resamples = 50
    return c
