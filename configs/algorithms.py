"""PPO, RLOO, GRPO, Dr. GRPO and REINFORCE++ side by side against one proxy reward model.

  python -m experiments.run --config configs/algorithms.py --workdir runs/algorithms

The quickstart's built-in review world, tokenizer and SFT policy; one proxy reward model trained
on `labels.n_pairs` simulated-annotator labels; then one run of each algorithm with matched sample
budgets (rl.steps iterations of ppo.batch_size rollouts each, the group estimators as
batch_size / K prompts x K samples), the same optimiser, epochs, minibatches, learning rate and
fixed KL coefficient. Every rollout is scored by the gold scorer. Writes points.json, fits.json
(Gao et al.'s RL form d (alpha - beta log d) fitted to gold and proxy gains per algorithm),
table.md (gold/proxy/KL, wall time and peak memory per iteration), reward_vs_kl.png and
summary.json. Variant `:size=tiny` for tests.
"""

import ml_collections

from configs import quickstart
from configs.common import parse_arg


def get_config(arg=None):
    args = parse_arg(arg, size="default")
    c = quickstart.get_config("size=tiny" if args["size"] == "tiny" else None)
    c.trainer = "experiments.algorithms"
    c.labels.n_pairs = 1000  # labelled pairs of the one proxy reward model (few enough that it can be gamed)

    c.algos = ml_collections.ConfigDict()
    # Algorithms compared: ppo | rloo | grpo | dr_grpo | reinforce_pp | reinforce_baseline (experiments/algorithms.py)
    c.algos.names = ("ppo", "rloo", "grpo", "dr_grpo", "reinforce_pp")
    c.algos.group_size = 4  # K samples per prompt of the group estimators (rloo, grpo, dr_grpo, reinforce_baseline)
    c.algos.isolate = True  # each algorithm in its own process, so peak memory (VmHWM) is its own

    c.rl = ml_collections.ConfigDict()
    c.rl.steps = 60  # iterations per algorithm (each ppo.batch_size rollouts: the matched sample budget)
    c.rl.beta = 0.002  # fixed KL coefficient, small so the policies travel far (as configs/overoptimization.py)

    if args["size"] == "tiny":
        c.labels.n_pairs = 64
        c.rl.steps = 4
        c.algos.isolate = False
    return c
