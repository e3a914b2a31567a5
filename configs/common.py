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
