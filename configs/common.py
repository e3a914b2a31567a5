"""Helpers shared by config files (argument parsing, the mesh and distributed sections)."""

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
