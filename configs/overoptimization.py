"""Reward-model over-optimisation (Gao et al. 2022): proxies at several label counts, best-of-n and PPO.

  python -m experiments.run --config configs/overoptimization.py --workdir runs/overopt

Writes points.json, fits.json (alpha, beta, R^2 per proxy and method), bon.png, rl.png and
summary.json. Variant `:size=tiny` for tests. Shares the quickstart's world/policy settings.

Three seeds (labels, proxies, best-of-n samples and PPO per seed; one world and SFT policy), fits on the
seed-averaged curves and each seed's gold peak with its 95% interval (fits.json, summary.md):
  python -m experiments.run --config configs/overoptimization.py --workdir runs/overopt3 --config.seeds='(0,1,2)'
"""

import ml_collections

import configs.quickstart as quickstart
from configs.common import parse_arg


def get_config(arg=None):
    args = parse_arg(arg, size="default")
    c = quickstart.get_config("size=tiny" if args["size"] == "tiny" else None)
    c.trainer = "overoptimization"
    c.label_counts = (250, 1000, 4000)  # proxy reward models trained on these many labelled pairs
    c.labels.n_eval_pairs = 300

    c.gold = ml_collections.ConfigDict()
    c.gold.kind = "scorer"  # 'scorer' (VADER + exact grammar fluency) or 'rm' (gold RM trained on gold labels)
    c.gold.n_pairs = 20000  # labels for the gold RM (gold.kind='rm')
    c.gold.steps = 1500  # gold RM training steps

    c.proxy = ml_collections.ConfigDict()
    c.proxy.ensemble_size = 1  # K > 1: each proxy is K reward models trained in one run (rm/ensemble_train.py)
    c.proxy.objective = "mean"  # how an ensemble proxy scores, in best-of-n and PPO: mean | wco | uwo
    c.proxy.uwo_lambda = 1.0  # uwo = mean - uwo_lambda * variance over members

    c.rl = ml_collections.ConfigDict()
    c.rl.beta = 0.002  # small fixed KL coefficient, so the policy travels far from the SFT policy
    c.rl.steps = 150  # PPO iterations per proxy
    # The quickstart's PPO learning rate (1e-4) takes the policy to d = 2-2.8 within 10 iterations, where
    # the gold peak already lies, and spends the other 140 on a plateau at d = 5-15: 5x slower spreads
    # the RL curve over the rise and the fall (measured on 2026-12-01, seeds 0 and 2).
    c.ppo.train.learning_rate = 2e-5

    c.bon.n_max = 128  # samples per prompt for best-of-n (n = 1 .. 128)
    c.world.n_eval_prompts = 48
    if args["size"] == "tiny":
        c.label_counts = (16, 32, 64)
        c.labels.n_eval_pairs = 16
        c.rl.steps = 6
        c.ppo.train.learning_rate = 1e-4  # the tiny quickstart's: a few iterations must move the policy
        c.bon.n_max = 4
        c.gold.n_pairs, c.gold.steps = 64, 5
        c.world.n_eval_prompts = 8  # best-of-n prompts
    return c
