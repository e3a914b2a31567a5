"""PPO (RLHF) of a policy against a trained reward model, with a KL penalty to the reference.

  python -m experiments.run --config configs/ppo.py --workdir W --config.policy.init_from=HF_DIR \
      --config.reward.workdir=RM_WORKDIR --config.data.prompt_files=PROMPTS.jsonl --config.train.steps=50

`--config.reward.init_from=HF_RM_DIR` (an exported reward folder) works in place of reward.workdir.
Variant: `configs/ppo.py:size=tiny` (small batches, short responses; CPU seconds per step).
Defaults follow published PPO reproductions (lr 3e-6, 4 epochs, clip 0.2, vf_coef 0.1, gamma 1,
lam 0.95, temperature 0.7, 53 new tokens).
"""

import ml_collections

from configs.common import (
    distributed_config,
    logging_config,
    lora_config,
    mesh_config,
    optimizer_config,
    parse_arg,
    runtime_config,
)


def get_config(arg=None):
    args = parse_arg(arg, size="base")
    c = ml_collections.ConfigDict()
    c.trainer = "ppo"
    c.seed = 0  # prompt order, sampling and minibatch shuffling

    c.policy = ml_collections.ConfigDict()
    c.policy.init_from = ""  # Hugging Face causal-LM folder (the SFT policy); also the frozen reference
    c.policy.tokenizer = ""  # tokenizer folder; empty = the one in init_from
    c.policy.dtype = "float32"  # compute dtype: float32 | bfloat16
    c.policy.param_dtype = "float32"  # parameter dtype
    c.policy.remat = False  # jax.checkpoint each block
    c.policy.remat_policy = "nothing_saveable"
    c.policy.scan_layers = (
        False  # scan over the layers (one compiled block; stacks weights per forward); training/scoring only
    )
    c.policy.attention = (
        "auto"  # attention implementation: auto | xla | chunked (blockwise, O(T) memory) | cudnn (GPU flash)
    )
    c.policy.logits_chunk = (
        128  # log-probs/entropy/loss over chunks of this many positions (no [B,T,V] logits); 0 = full
    )
    c.policy.mlp_chunk = (
        0  # the MLP over chunks of this many positions (models/mlp.py: less activation memory); 0 = off
    )
    c.policy.update(lora_config())  # lora_rank (0 = full), lora_alpha, lora_targets, lora_dropout, quant
    # Reference policy: 'copy' (separate frozen copy) | 'adapters_off' (the policy with its adapters ignored,
    # no second base in memory; needs lora_rank > 0) | 'auto' (adapters_off when lora_rank > 0, else copy).
    c.policy.reference = "auto"
    c.policy.ref_quant = ""  # '' | 'int8': quantise the separate reference copy (reference='copy' only)

    c.reward = ml_collections.ConfigDict()
    c.reward.workdir = ""  # RM workdir written by configs/rm.py (normalisation read from its checkpoint)
    c.reward.init_from = ""  # or: an exported HF reward folder (python -m rm.export)
    c.reward.dtype = "float32"  # compute dtype of the frozen reward model
    c.reward.scan_layers = False  # scan over the frozen reward model's layers when scoring
    c.reward.quant = ""  # '' | 'int8': int8 weight-only frozen reward model (LoRA adapters merged first)
    c.reward.missing_eos_penalty = 1.0  # subtracted from the score of responses that never emit EOS
    c.reward.length_penalty = 0.0  # subtracted from the score per response token (against verbosity hacking); 0 = off
    c.reward.objective = "mean"  # ensemble reward (reward.workdir = an ensemble run): mean | wco (min) | uwo
    c.reward.uwo_lambda = 1.0  # uwo = mean - uwo_lambda * variance over members' normalised scores

    c.value = ml_collections.ConfigDict()
    c.value.init = "reward"  # 'reward': separate value model initialised from the RM; 'policy_head': head on the policy
    c.value.update(lora_config())  # LoRA / int8 of the separate value model (value.init='reward')
    c.value.scan_layers = False  # scan over the value model's layers (value.init='reward')
    c.value.mlp_chunk = 0  # the value model's MLP over chunks of this many positions (models/mlp.py); 0 = off

    c.data = ml_collections.ConfigDict()
    c.data.prompt_files = ""  # JSONL/JSON/Parquet with `prompt` (string or message list), comma-separated
    c.data.max_prompt_length = 64  # prompt tokens kept (from the right); prompts are left-padded to this
    c.data.on_bad_row = "error"  # 'error' | 'skip'

    c.sampling = ml_collections.ConfigDict()
    c.sampling.max_new_tokens = 53  # response length limit
    c.sampling.temperature = 0.7  # also divides the logits when computing PPO log-probs
    c.sampling.top_k = 0  # 0 = off
    c.sampling.top_p = 1.0  # 1.0 = off
    c.sampling.stop_tokens = ""  # extra stop tokens (comma-separated token strings) besides EOS

    c.kl = ml_collections.ConfigDict()
    c.kl.kind = "adaptive"  # 'adaptive' (Ziegler et al.) | 'fixed'
    c.kl.init_beta = 0.05  # initial KL coefficient
    c.kl.target = 6.0  # adaptive target KL per sequence (nats)
    c.kl.horizon = 10000  # adaptive horizon (rollouts)
    c.kl.estimator = "k1"  # per-token KL estimator in the reward: k1 | k2 | k3

    c.rollout = ml_collections.ConfigDict()
    c.rollout.samples_per_prompt = (
        1  # K responses per prompt, kept together as a group (train.batch_size counts rollouts)
    )

    # Policy-optimisation algorithm on the same rollout engine (ppo/algorithms.py; formulas in ppo/advantages.py
    # and ppo/objectives.py). The defaults are PPO exactly as before.
    c.algo = ml_collections.ConfigDict()
    c.algo.advantage = "gae"  # gae (PPO, value model) | rloo | grpo | dr_grpo | reinforce_pp | reinforce_baseline
    c.algo.kl_placement = (
        "auto"  # in_reward (-beta kl_t per token) | in_loss (beta * KL term) | auto (in_loss for grpo, dr_grpo)
    )
    c.algo.kl_loss_estimator = "k3"  # per-token KL estimator of the loss term (in_loss): k1 | k2 | k3
    c.algo.clip_eps_low = -1.0  # ratio clip below 1 - eps_low; < 0 = train.clip_eps
    c.algo.clip_eps_high = -1.0  # ratio clip above 1 + eps_high (DAPO clip-higher e.g. 0.28); < 0 = train.clip_eps
    c.algo.dual_clip_c = 0.0  # dual-clip constant c > 1 (Ye et al. 2020, e.g. 3); 0 = off
    # token_mean | seq_mean_token_mean | seq_mean_token_sum | seq_mean_token_sum_norm | auto
    # (auto: seq_mean_token_mean for grpo, seq_mean_token_sum_norm for dr_grpo, token_mean otherwise)
    c.algo.loss_agg = "auto"
    c.algo.norm_constant = 0.0  # constant divisor of seq_mean_token_sum_norm (tokens); 0 = sampling.max_new_tokens
    c.algo.group_eps = 1e-6  # GRPO: added to the group std

    c.train = ml_collections.ConfigDict()
    c.train.steps = 100  # PPO iterations (rollout batch + update)
    c.train.batch_size = 64  # rollouts per iteration
    c.train.num_minibatches = 4  # minibatches per PPO epoch
    c.train.grad_accum_steps = 1  # micro-batches per minibatch
    c.train.ppo_epochs = 4  # passes over each rollout batch
    # AdamW (policy and value), constant learning rate after warmup; no adam_b1/b2 keys (0.9 / 0.999)
    c.train.update(optimizer_config(learning_rate=3e-6, warmup_steps=0, min_lr_ratio=1.0, adam_eps=1e-5, betas=False))
    c.train.clip_eps = 0.2  # policy ratio clip
    c.train.vf_clip_eps = 0.2  # value clip
    c.train.vf_coef = 0.1  # value loss weight
    # True: per minibatch the policy's gradients are computed and applied, then the value model's, each by
    # its own AdamW clipped on its own norm (OpenRLHF-style; one model's gradients live at a time). Needs
    # value.init='reward'. False: one joint loss, one optimizer, one global norm over both models.
    c.train.sequential_value_update = False
    c.train.gamma = 1.0  # discount
    c.train.lam = 0.95  # GAE lambda
    c.train.whiten_rewards = False  # whiten per-token rewards before GAE
    c.train.log_every = 1  # iterations between metrics lines
    c.train.samples_every = 10  # iterations between samples.jsonl dumps (0 = never)
    c.train.num_samples = 8  # samples written each time
    c.train.save_every = 20  # iterations between checkpoints (one is always written at the end)
    c.train.keep_checkpoints = 2

    c.mesh = mesh_config()
    c.distributed = distributed_config()  # multi-process runs (see common/distributed.py); unset = one process
    c.logging = logging_config()  # TensorBoard (on) and W&B (off) besides metrics.jsonl
    c.runtime = runtime_config()  # compilation cache, async checkpoints, resume with a changed config, dry run

    if args["size"] == "tiny":
        c.data.max_prompt_length = 16
        c.sampling.max_new_tokens = 16
        c.train.steps = 20
        c.train.batch_size = 16
        c.train.num_minibatches = 2
        c.train.ppo_epochs = 2
        c.train.learning_rate = 1e-3
        c.train.samples_every = 5
        c.train.save_every = 5
    elif args["size"] != "base":
        raise ValueError(f"size={args['size']!r}; expected 'base' or 'tiny'")
    return c
