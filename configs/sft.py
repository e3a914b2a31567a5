"""Supervised fine-tuning (next-token loss): the checkpoint the reward model and PPO start from.

  python -m experiments.run --config configs/sft.py --workdir W \
      --config.data.train_files=A.jsonl [--config.data.eval_files=B.jsonl] \
      [--config.model.init_from=HF_DIR | --config.model.init_from= --config.model.tokenizer=TOK_DIR]

With `model.init_from` (a Hugging Face causal-LM folder) the model is fine-tuned; with
`model.init_from=''` and `model.tokenizer=TOK_DIR` a model of the `model.family`, `d_model`,
... fields is trained from random init (vocabulary and pad/EOS ids from the tokenizer).
At the end the model is written to W/hf as a Hugging Face causal-LM folder.

Variant: `configs/sft.py:size=tiny` (tiny model, short run, short sequences; CPU seconds).
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
    c.trainer = "sft"
    c.seed = 0  # data order, held-out split, random init and step rngs

    c.model = ml_collections.ConfigDict()
    c.model.init_from = ""  # Hugging Face causal-LM folder (config.json + *.safetensors); '' = random init
    c.model.tokenizer = ""  # tokenizer folder; empty = the one in init_from (required when init_from is '')
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
    c.model.logits_chunk = (
        128  # log-probs/entropy/loss over chunks of this many positions (no [B,T,V] logits); 0 = full
    )
    c.model.mlp_chunk = 0  # the MLP over chunks of this many positions (models/mlp.py: less activation memory); 0 = off
    c.model.update(lora_config())  # lora_rank (0 = full fine-tune), lora_alpha, lora_targets, lora_dropout, quant
    # Architecture of a from-scratch model (ignored with init_from); defaults are GPT-2 small.
    c.model.family = "gpt2"  # from scratch: gpt2 (LayerNorm, learned positions, tied) | llama (RMSNorm, RoPE, SwiGLU); init_from: any of models.transformer.FAMILIES
    c.model.d_model = 768  # hidden width
    c.model.n_layers = 12  # transformer blocks
    c.model.n_heads = 12  # query heads (head_dim = d_model / n_heads)
    c.model.n_kv_heads = 0  # key/value heads (llama grouped-query attention); 0 = n_heads
    c.model.d_ff = 0  # MLP inner width; 0 = 4 * d_model
    c.model.max_position_embeddings = 1024  # longest sequence (gpt2: size of the position table)
    c.model.norm_eps = 1e-5  # LayerNorm / RMSNorm epsilon
    c.model.rope_theta = 10000.0  # RoPE base (llama)
    c.model.tie_embeddings = False  # llama: lm head shares the token embedding (gpt2: always tied)

    c.data = ml_collections.ConfigDict()
    c.data.train_files = ""  # SFT files (text | prompt+completion | messages), comma-separated, or a hub name
    c.data.eval_files = ""  # held-out SFT files for eval loss / perplexity
    c.data.eval_fraction = 0.0  # without eval_files: hold out this fraction of the training rows (0 = no eval)
    c.data.max_length = 512  # tokens per example; longer examples keep their first max_length tokens
    c.data.on_bad_row = "error"  # 'error': stop naming file/row/key; 'skip': count and report
    c.data.bucket = 64  # pad batches to a multiple of this many tokens (fewer compilations); 0 = max_length
    c.data.packing = False  # training batches pack several sequences per max_length row (common/packing.py)
    c.data.pack_rows = 0  # packed rows per group; 0 = the most any training step needs (computed at start)
    c.data.pack_row_buckets = 1  # row counts a packed step may take (k > 1: fewer padded rows, <= k compilations)

    c.train = ml_collections.ConfigDict()
    c.train.steps = 1000  # optimizer steps
    c.train.batch_size = 32  # sequences per step (all micro-batches together)
    c.train.grad_accum_steps = 1  # micro-batches per step; batch_size must divide by it
    c.train.update(optimizer_config(learning_rate=2e-5, warmup_steps=50, min_lr_ratio=0.1))  # AdamW + clipping
    c.train.log_every = 10  # steps between train metrics lines
    c.train.eval_every = 100  # steps between evaluations (0 = only at the start and the end)
    c.train.save_every = 100  # steps between checkpoints (one is always written at the end)
    c.train.keep_checkpoints = 2  # most recent checkpoints kept on disk

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 32  # sequences per eval batch
    c.eval.at_start = True  # evaluate before the first step (step 0 of the eval curve)

    c.export = ml_collections.ConfigDict()
    c.export.hf = True  # write the final model to workdir/hf as a Hugging Face causal-LM folder

    c.mesh = mesh_config()
    c.distributed = distributed_config()  # multi-process runs (see common/distributed.py); unset = one process
    c.logging = logging_config()  # TensorBoard (on) and W&B (off) besides metrics.jsonl
    c.runtime = runtime_config()  # compilation cache, async checkpoints, resume with a changed config, dry run

    c.debug = ml_collections.ConfigDict()
    c.debug.inject_nan_at_step = -1  # make the loss NaN at this step (tests the NaN guard); -1 = off

    if args["size"] == "tiny":
        c.model.d_model = 64
        c.model.n_layers = 2
        c.model.n_heads = 4
        c.model.d_ff = 256
        c.model.max_position_embeddings = 128
        c.data.max_length = 64
        c.data.bucket = 0  # one shape, one compilation
        c.train.steps = 60
        c.train.batch_size = 16
        c.train.learning_rate = 3e-3
        c.train.warmup_steps = 5
        c.train.log_every = 5
        c.train.eval_every = 20
        c.train.save_every = 20
        c.eval.batch_size = 32
    elif args["size"] != "base":
        raise ValueError(f"size={args['size']!r}; expected 'base' or 'tiny'")
    return c
