"""Quickstart: the whole RLHF loop on the built-in review world, no downloads, < 10 min on 2 CPU cores.

  python -m experiments.run --config configs/quickstart.py --workdir runs/quickstart

World -> tokenizer -> SFT policy (from scratch) -> pairs sampled from it and labelled by simulated
annotators -> proxy reward model (from the SFT checkpoint) -> evaluation + normalisation ->
best-of-n and PPO (adaptive KL) against the proxy, with the gold reward tracked throughout.
Writes summary.json, training_curves.png and reward_vs_kl.png. Variant `:size=tiny` for tests.
"""

import ml_collections

from configs.common import parse_arg


def get_config(arg=None):
    args = parse_arg(arg, size="default")
    c = ml_collections.ConfigDict()
    c.trainer = "quickstart"
    c.seed = 0  # sampling, labelling and trainer seeds

    c.world = ml_collections.ConfigDict()
    c.world.seed = 0  # the review world's grammar and word frequencies
    c.world.vocab_size = 1024  # BPE vocabulary (about one token per word)
    c.world.n_tokenizer_texts = 3000  # reviews the tokenizer is trained on
    c.world.n_sft_texts = 6000  # SFT training reviews
    c.world.n_sft_eval_texts = 200  # held-out SFT reviews
    c.world.n_prompts = 1024  # PPO prompts (review openings)
    c.world.n_eval_prompts = 64  # prompts for best-of-n evaluation

    c.policy = ml_collections.ConfigDict()  # SFT policy architecture (trained from scratch)
    c.policy.family = "gpt2"
    c.policy.d_model = 128
    c.policy.n_layers = 2
    c.policy.n_heads = 4
    c.policy.d_ff = 512
    c.policy.max_position_embeddings = 128

    c.sft = ml_collections.ConfigDict()
    c.sft.steps = 400  # optimizer steps
    c.sft.batch_size = 32
    c.sft.learning_rate = 2e-3
    c.sft.warmup_steps = 30
    c.sft.max_length = 64  # tokens per review

    c.sampling = ml_collections.ConfigDict()
    c.sampling.max_prompt_length = 8  # prompt tokens (review openings are short)
    c.sampling.max_new_tokens = 40  # response length limit
    c.sampling.temperature = 0.7  # PPO and best-of-n sampling temperature

    c.labels = ml_collections.ConfigDict()
    c.labels.n_pairs = 2000  # labelled pairs for the proxy reward model
    c.labels.n_eval_pairs = 300  # held-out labelled pairs
    c.labels.temperature = 0.3  # annotator: P(a preferred) = sigmoid((gold_a - gold_b) / temperature)
    c.labels.noise = 0.0  # probability that an annotator flips a label

    c.rm = ml_collections.ConfigDict()
    c.rm.steps = 300
    c.rm.batch_size = 32
    c.rm.learning_rate = 3e-4
    c.rm.warmup_steps = 20

    c.ppo = ml_collections.ConfigDict()
    c.ppo.steps = 50  # PPO iterations
    c.ppo.batch_size = 32  # rollouts per iteration
    c.ppo.num_minibatches = 2
    c.ppo.ppo_epochs = 4
    c.ppo.learning_rate = 1e-4
    c.ppo.init_beta = 0.05  # initial KL coefficient (adaptive controller)
    c.ppo.target = 6.0  # adaptive KL target (nats per response)
    c.ppo.horizon = 10000  # adaptive KL horizon (rollouts)

    c.bon = ml_collections.ConfigDict()
    c.bon.n_max = 64  # samples per prompt; best-of-n for n = 1, 2, 4, ... n_max

    if args["size"] == "tiny":
        c.world.vocab_size = 512
        c.world.n_tokenizer_texts, c.world.n_sft_texts, c.world.n_sft_eval_texts = 300, 400, 32
        c.world.n_prompts, c.world.n_eval_prompts = 64, 8
        c.policy.d_model, c.policy.d_ff = 32, 64
        c.sft.steps, c.sft.batch_size, c.sft.warmup_steps = 20, 16, 2
        c.sampling.max_new_tokens = 12
        c.labels.n_pairs, c.labels.n_eval_pairs = 64, 16
        c.rm.steps, c.rm.batch_size, c.rm.warmup_steps = 10, 16, 2
        c.ppo.steps, c.ppo.batch_size = 4, 8
        c.bon.n_max = 4
    elif args["size"] != "default":
        raise ValueError(f"size={args['size']!r}; expected 'default' or 'tiny'")
    return c
