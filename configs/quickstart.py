"""Quickstart: the whole RLHF loop on the built-in review world, no downloads, < 10 min on 2 CPU cores.

  python -m experiments.run --config configs/quickstart.py --workdir runs/quickstart

World -> tokenizer -> SFT policy (from scratch) -> pairs sampled from it and labelled by simulated
annotators -> proxy reward model (from the SFT checkpoint) -> evaluation + normalisation ->
best-of-n and PPO (adaptive KL) against the proxy, with the gold reward tracked throughout.
Writes summary.json, training_curves.png and reward_vs_kl.png. Variant `:size=tiny` for tests.
"""

import ml_collections

import configs.ppo as ppo_config
import configs.rm as rm_config
import configs.sft as sft_config
from configs.common import parse_arg


def get_config(arg=None):
    args = parse_arg(arg, size="default")
    c = ml_collections.ConfigDict()
    c.trainer = "quickstart"
    c.seed = 0  # sampling, labelling and trainer seeds (of the RM and PPO stages; SFT keeps c.sft.seed)
    c.seeds = ()  # several seeds, e.g. (0, 1, 2): labels, RM, best-of-n and PPO once per seed (one world and
    # SFT policy), tables with means and 95% t-intervals across seeds; () = the one run of c.seed

    c.world = ml_collections.ConfigDict()
    c.world.seed = 0  # the review world's grammar and word frequencies
    c.world.vocab_size = 1024  # BPE vocabulary (about one token per word)
    c.world.n_tokenizer_texts = 3000  # reviews the tokenizer is trained on
    c.world.n_sft_texts = 6000  # SFT training reviews
    c.world.n_sft_eval_texts = 200  # held-out SFT reviews
    c.world.n_prompts = 1024  # PPO prompts (review openings)
    c.world.n_eval_prompts = 64  # prompts for best-of-n evaluation

    # The stages' trainer configs are the real ones (configs/sft.py, rm.py, ppo.py), overridden here
    # (e.g. --config.rm.train.steps=500); the driver fills in only paths and the shared sampling lengths.
    c.sft = sft_config.get_config()  # SFT policy trained from scratch
    c.sft.model.tokenizer = ""  # filled by the driver: the world's tokenizer
    c.sft.model.family, c.sft.model.d_model, c.sft.model.n_layers, c.sft.model.n_heads = "gpt2", 128, 2, 4
    c.sft.model.d_ff, c.sft.model.max_position_embeddings = 512, 128
    c.sft.train.steps, c.sft.train.batch_size, c.sft.train.learning_rate, c.sft.train.warmup_steps = 400, 32, 2e-3, 30
    c.sft.train.eval_every, c.sft.train.save_every = 200, 200
    c.sft.data.max_length, c.sft.data.bucket = 64, 0  # tokens per review; one shape

    c.sampling = ml_collections.ConfigDict()
    c.sampling.max_prompt_length = 8  # prompt tokens (review openings are short); PPO's data.max_prompt_length
    c.sampling.max_new_tokens = 40  # response length limit (PPO, best-of-n, labels); RM max_length = sum of both
    c.sampling.temperature = 0.7  # PPO and best-of-n sampling temperature

    c.labels = ml_collections.ConfigDict()
    c.labels.n_pairs = 2000  # labelled pairs for the proxy reward model
    c.labels.n_eval_pairs = 300  # held-out labelled pairs (accuracy, ECE)
    c.labels.n_calibration_pairs = 0  # > 0: a separate calibration split the RM's temperature is fitted on
    c.labels.temperature = 0.3  # annotator: P(a preferred) = sigmoid((gold_a - gold_b) / temperature)
    c.labels.noise = 0.0  # probability that an annotator flips a label

    c.rm = rm_config.get_config()  # proxy reward model from the SFT checkpoint
    c.rm.train.steps, c.rm.train.batch_size, c.rm.train.learning_rate, c.rm.train.warmup_steps = 300, 32, 3e-4, 20
    c.rm.train.eval_every, c.rm.train.save_every, c.rm.train.log_every = 150, 150, 10
    c.rm.data.bucket = 0

    c.ppo = ppo_config.get_config()  # PPO against the proxy, adaptive KL
    c.ppo.train.steps, c.ppo.train.batch_size, c.ppo.train.num_minibatches = 50, 32, 2  # iterations, rollouts
    c.ppo.train.ppo_epochs, c.ppo.train.learning_rate = 4, 1e-4
    c.ppo.kl.kind, c.ppo.kl.init_beta, c.ppo.kl.target, c.ppo.kl.horizon = "adaptive", 0.05, 6.0, 10000
    c.ppo.train.samples_every = 1  # every rollout is logged (num_samples = batch_size): the gold curve
    c.ppo.train.save_every = 12

    c.bon = ml_collections.ConfigDict()
    c.bon.n_max = 64  # samples per prompt; best-of-n for n = 1, 2, 4, ... n_max

    if args["size"] == "tiny":
        c.world.vocab_size = 512
        c.world.n_tokenizer_texts, c.world.n_sft_texts, c.world.n_sft_eval_texts = 300, 400, 32
        c.world.n_prompts, c.world.n_eval_prompts = 64, 8
        c.sft.model.d_model, c.sft.model.d_ff = 32, 64
        c.sft.train.steps, c.sft.train.batch_size, c.sft.train.warmup_steps = 20, 16, 2
        c.sft.train.eval_every, c.sft.train.save_every = 10, 10
        c.sampling.max_new_tokens = 12
        c.labels.n_pairs, c.labels.n_eval_pairs = 64, 16
        c.rm.train.steps, c.rm.train.batch_size, c.rm.train.warmup_steps = 10, 16, 2
        c.rm.train.eval_every, c.rm.train.save_every = 5, 5
        c.ppo.train.steps, c.ppo.train.batch_size, c.ppo.train.save_every = 4, 8, 1
        c.bon.n_max = 4
    elif args["size"] != "default":
        raise ValueError(f"size={args['size']!r}; expected 'default' or 'tiny'")
    return c
