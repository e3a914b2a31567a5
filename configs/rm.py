"""Reward model: Bradley-Terry training from a Hugging Face (SFT) checkpoint.

  python -m experiments.run --config configs/rm.py --workdir W \
      --config.model.init_from=HF_DIR --config.data.train_files=A.jsonl \
      --config.data.eval_files=B.jsonl --config.train.steps=300

Variant: `configs/rm.py:size=tiny` (short run, small batches, short sequences; CPU seconds).
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
    c.trainer = "rm"
    c.seed = 0  # data order, head init and step rngs

    c.model = ml_collections.ConfigDict()
    c.model.init_from = ""  # Hugging Face folder (config.json + *.safetensors), usually an SFT checkpoint
    c.model.tokenizer = ""  # tokenizer folder; empty = the one in init_from
    c.model.dtype = "float32"  # compute dtype: float32 | bfloat16
    c.model.param_dtype = "float32"  # parameter dtype: float32 | bfloat16
    c.model.remat = False  # jax.checkpoint each transformer block (less memory, more compute)
    c.model.remat_policy = "nothing_saveable"  # what remat may keep: nothing_saveable | dots_saveable | ...
    c.model.scan_layers = (
        False  # scan over the layers (one compiled block; stacks weights per forward); training/scoring only
    )
    c.model.attention = (
        "auto"  # attention implementation: auto | xla | chunked (blockwise, O(T) memory) | cudnn (GPU flash)
    )
    c.model.mlp_chunk = 0  # the MLP over chunks of this many positions (models/mlp.py: less activation memory); 0 = off
    c.model.update(lora_config())  # lora_rank (0 = full fine-tune), lora_alpha, lora_targets, lora_dropout, quant
    c.model.ensemble_size = 1  # K reward models in one run (rm/ensemble_train.py), member k = seed + k; 1 = one
    c.model.ensemble_bootstrap = False  # ensemble members train on bootstrap resamples of the pairs (K > 1)

    c.data = ml_collections.ConfigDict()
    c.data.train_files = ""  # preference files, comma-separated (.jsonl/.json/.parquet) or a hub name
    c.data.eval_files = ""  # held-out preference files (a `subset` column gives per-subset accuracy)
    c.data.max_length = 512  # tokens of prompt + response; longer pairs lose prompt tokens from the left
    c.data.on_bad_row = "error"  # 'error': stop naming file/row/key; 'skip': count and report
    c.data.bucket = 64  # pad batches to a multiple of this many tokens (fewer compilations); 0 = max_length
    c.data.packing = False  # training batches pack several sequences per max_length row (common/packing.py)
    c.data.pack_rows = 0  # packed rows per group; 0 = the most any training step needs (computed at start)
    c.data.pack_segments = 0  # most sequences in one packed row; 0 = the most any training step needs
    c.data.pack_row_buckets = 1  # row counts a packed step may take (k > 1: fewer padded rows, <= k compilations)

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000  # optimizer steps
    c.train.batch_size = 32  # preference pairs per step (all micro-batches together)
    c.train.grad_accum_steps = 1  # micro-batches per step; batch_size must divide by it
    c.train.update(optimizer_config(learning_rate=1e-5, warmup_steps=50, min_lr_ratio=0.0))  # AdamW + clipping
    c.train.center_coef = 0.0  # coefficient of mean((r_c + r_r)^2), keeps rewards centred (~0.01)
    c.train.use_margin = True  # subtract the data's `margin` column inside the sigmoid when present
    c.train.label_smoothing = 0.0  # eps in [0, 0.5): each label y -> (1 - eps) y + eps (1 - y); 0 = off
    c.train.tie_model = "none"  # rows with label 0.5: 'none' (soft label 0.5) | 'rao_kupper' (-log P(tie))
    c.train.tie_theta = 1.5  # Rao-Kupper theta > 1 (fixed; larger = ties more likely), used with tie_model
    c.train.log_every = 10  # steps between train metrics lines
    c.train.eval_every = 100  # steps between evaluations (0 = only at the end)
    c.train.save_every = 100  # steps between checkpoints (one is always written at the end)
    c.train.keep_checkpoints = 2  # most recent checkpoints kept on disk

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 32  # pairs per eval batch
    c.eval.n_bins = 10  # bins of the ECE and the reliability diagram
    c.eval.normalize_on = "eval"  # responses whose rewards get mean 0 / std 1: 'eval', 'train' or files
    c.eval.calibrate_on = "eval"  # pairs the temperature T is fitted on: 'eval', 'none' (T = 1) or files
    c.eval.bootstrap_resamples = 1000  # resamples of the eval pairs for accuracy's 95% interval; 0 = off

    c.mesh = mesh_config()
    c.distributed = distributed_config()  # multi-process runs (see common/distributed.py); unset = one process
    c.logging = logging_config()  # TensorBoard (on) and W&B (off) besides metrics.jsonl
    c.runtime = runtime_config()  # compilation cache, async checkpoints, resume with a changed config, dry run

    c.debug = ml_collections.ConfigDict()
    c.debug.inject_nan_at_step = -1  # make the loss NaN at this step (tests the NaN guard); -1 = off

    if args["size"] == "tiny":
        c.data.max_length = 64
        c.data.bucket = 0  # one shape, one compilation
        c.train.steps = 60
        c.train.batch_size = 16
        c.train.learning_rate = 1e-3
        c.train.warmup_steps = 5
        c.train.log_every = 5
        c.train.eval_every = 20
        c.train.save_every = 20
        c.eval.batch_size = 32
    elif args["size"] != "base":
        raise ValueError(f"size={args['size']!r}; expected 'base' or 'tiny'")
    return c
