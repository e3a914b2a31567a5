"""Reward-model ensembles against over-optimisation (Coste et al., ICLR 2024) on the built-in review world.

  python -m experiments.run --config configs/ensembles.py --workdir runs/ensembles

The quickstart's world, tokenizer and SFT policy. For each label-noise level (annotators flip a label
with that probability): K reward models trained in one run (model.ensemble_size = K; member 0 is the
single RM, the run of that seed alone), then best-of-n and PPO (small fixed KL coefficient) against the
single RM and the ensemble under each objective (mean, wco, uwo). Gold reward at its peak and at the end
of optimisation, with intervals (across seeds with `seeds = (0, 1, 2)`; bootstrap over prompts /
rollouts for one seed). Writes results.json, table.md, bon.png, ppo.png. Variant `:size=tiny` for tests.
"""

import ml_collections

import configs.overoptimization as overoptimization
from configs.common import parse_arg


def get_config(arg=None):
    args = parse_arg(arg, size="default")
    c = overoptimization.get_config("size=tiny" if args["size"] == "tiny" else None)
    c.trainer = "experiments.ensembles"
    c.label_counts = ()  # unused here (the over-optimisation driver's)
    # The quickstart's annotator, best-of-n size and one seed, as the documented Coste run used: the Gao
    # driver's own choices (sharper annotator, n up to 2048 on 16 prompts, 3 seeds) are not inherited.
    c.labels.temperature, c.proxy.epochs, c.seeds = 0.3, 0.0, ()
    # Worker processes for the (seed, noise level) runs (experiments/parallel.py): the two noise levels side by
    # side; 0 runs them one after another in this process.
    c.workers = 0 if args["size"] == "tiny" else 2
    if args["size"] != "tiny":
        c.bon.n_max, c.world.n_eval_prompts = 128, 48

    c.coste = ml_collections.ConfigDict()
    c.coste.n_labels = 1000  # labelled pairs every reward model trains on
    c.coste.noise_levels = (0.0, 0.25)  # probability that an annotator flips a training label
    c.coste.ensemble_size = 4  # K members (Coste et al. use 5)
    c.coste.bootstrap = False  # members train on bootstrap resamples of the pairs (else: all pairs, other seeds)
    c.coste.variants = ("single", "mean", "wco", "uwo")  # single RM (member 0) and the ensemble objectives
    c.coste.uwo_lambda = 1.0  # uwo = mean - lambda * variance over members' normalised scores
    c.coste.methods = ("bon", "ppo")  # best-of-n and / or PPO
    c.coste.window = 10  # PPO: gold of an iteration = mean over this many iterations (peak and end)
    c.coste.bootstrap_resamples = 1000  # one seed: bootstrap over prompts (best-of-n) / rollouts (PPO)

    c.rl.steps = 100  # PPO iterations per variant (8 runs at the default size); bon.n_max: 128 (as Gao's)
    c.ppo.train.learning_rate = 1e-4  # the quickstart's (not the over-optimisation driver's 2e-5)
    if args["size"] == "tiny":
        c.coste.n_labels = 64
        c.coste.ensemble_size = 2
        c.coste.window = 2
        c.coste.bootstrap_resamples = 100
        c.rl.steps = 3
    return c
