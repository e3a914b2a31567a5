"""Helpers shared by config files: argument parsing and the sections every trainer has (mesh, optimizer, LoRA, ...)."""

import ml_collections


def parse_arg(arg, **defaults) -> dict:
    """'size=tiny,foo=1' -> {'size': 'tiny', 'foo': '1'} on top of defaults; unknown keys are an error."""
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r} in {arg!r}; known: {sorted(defaults)}")
        out[key] = value
    return out


def mesh_config() -> ml_collections.ConfigDict:
    mesh = ml_collections.ConfigDict()
    mesh.shape = (-1, 1)  # devices per axis; -1 = all remaining devices
    mesh.axis_names = ("data", "model")  # data: batch / FSDP axis, model: tensor-parallel axis
    mesh.fsdp_tp = True  # shard params/optimizer state by models.sharding.DEFAULT_RULES; False = replicate
    return mesh


def optimizer_config(
    *,
    learning_rate: float,
    warmup_steps: int,
    min_lr_ratio: float,
    weight_decay: float = 0.0,
    adam_eps: float = 1e-8,
    max_grad_norm: float = 1.0,
    betas: bool = True,
) -> ml_collections.ConfigDict:
    """AdamW fields of a trainer's `train` section (read by common.optim.optimizer_from_config).

    Merged into `c.train` with `c.train.update(...)`. betas=False leaves adam_b1/adam_b2 out (PPO's
    config has never had them; the optimizer then uses 0.9 / 0.999), so saved configs still match.
    """
    o = ml_collections.ConfigDict()
    o.learning_rate = learning_rate  # peak AdamW learning rate
    o.warmup_steps = warmup_steps  # optimizer updates of linear warmup
    o.min_lr_ratio = min_lr_ratio  # cosine decays to this fraction of the peak (1.0 = constant after warmup)
    o.weight_decay = weight_decay  # AdamW decoupled weight decay (matrices only)
    if betas:
        o.adam_b1 = 0.9  # Adam first-moment decay
        o.adam_b2 = 0.999  # Adam second-moment decay
    o.adam_eps = adam_eps  # Adam denominator epsilon
    o.max_grad_norm = max_grad_norm  # global-norm clipping; 0 = off
    return o


def lora_config() -> ml_collections.ConfigDict:
    """LoRA / QLoRA fields of a model section (model, policy, value), read by models.adapters.add_lora_and_quant.

    Merged into the section with `c.model.update(lora_config())`.
    """
    lo = ml_collections.ConfigDict()
    lo.lora_rank = 0  # LoRA adapter rank; > 0 trains only adapters + scalar heads (base frozen); 0 = full fine-tune
    lo.lora_alpha = 16.0  # adapter output scale is lora_alpha / lora_rank
    lo.lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj")  # projections that get adapters
    lo.lora_dropout = 0.0  # dropout on the adapters' input, in training steps only (never in evaluation or rollouts)
    lo.quant = ""  # '' | 'int8': int8 weight-only frozen base under LoRA (QLoRA); needs lora_rank > 0
    return lo


def distributed_config() -> ml_collections.ConfigDict:
    """Multi-process (multi-host) settings read by common.distributed.initialize; all unset = one process."""
    d = ml_collections.ConfigDict()
    d.coordinator_address = ""  # HOST:PORT of process 0's coordinator; '' = env JAX_COORDINATOR_ADDRESS (or none)
    d.num_processes = 0  # processes in the run; 0 = env JAX_NUM_PROCESSES (or auto-detected)
    d.process_id = -1  # this process's index in [0, num_processes); -1 = env JAX_PROCESS_ID (or auto-detected)
    d.auto = False  # True: let JAX detect unset values from the cluster (SLURM, Open MPI, Cloud TPU, k8s)
    return d


def logging_config() -> ml_collections.ConfigDict:
    """Where metrics go besides metrics.jsonl (common/tracking.py)."""
    lg = ml_collections.ConfigDict()
    lg.tensorboard = True  # TensorBoard event files in workdir/tensorboard/ (tensorboardX)
    lg.wandb = False  # also log to Weights & Biases (needs `pip install wandb`; imported only when True)
    lg.wandb_project = "rlhf-jax"  # W&B project name
    lg.wandb_mode = "offline"  # 'offline' (no network; `wandb sync` later) | 'online'
    lg.peak_flops = 0.0  # peak FLOP/s per device for perf/mfu; 0 = bf16 table (GPU/TPU) or measured (CPU); -1 = off
    return lg


def runtime_config() -> ml_collections.ConfigDict:
    """How a run executes, never what it computes: all of it may change on resume (common/resume.py)."""
    rt = ml_collections.ConfigDict()
    rt.compilation_cache = "auto"  # persistent XLA cache: 'auto' (~/.cache/rlhf-jax/xla or $JAX_COMPILATION_CACHE_DIR), '' = off, or a folder
    rt.async_checkpointing = (
        False  # Orbax writes checkpoints in the background (accelerator runs); end/SIGTERM saves still wait
    )
    rt.allow_config_change = (
        False  # resume even if non-resumable config keys or the training data changed (recorded); --allow_config_change
    )
    rt.dry_run = False  # load data and model, print sizes and memory, exit (set by experiments.run --dry_run)
    return rt
