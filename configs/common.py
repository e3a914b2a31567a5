"""Helpers shared by config files (argument parsing, the mesh section)."""

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
