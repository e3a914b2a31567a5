"""Device mesh and batch placement.

The mesh has a 'data' axis (batch is split over it) and a 'model' axis (params
are split over it by `models/sharding.py`). A laptop CPU gets a 1x1 mesh; a
pod slice gets e.g. (-1, 4).

  mesh = make_mesh((-1, 1))                 # all devices on 'data'
  batch = shard_batch(batch, mesh)          # leading dim split over 'data'

Multi-process (multi-host) runs: every process calls these with the same
arguments, and `shard_batch` expects each process to pass only ITS OWN slice of
the global batch (its local rows, [B_global / process_count, ...]); the global
array is assembled with `jax.make_array_from_process_local_data`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "make_mesh",
    "batch_sharding",
    "replicated",
    "shard_batch",
    "data_axis_size",
    "local_rows",
    "process_row_range",
]


def _resolve_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Replaces one -1 with whatever makes the product equal `num_devices`."""
    shape = tuple(int(s) for s in shape)
    unknown = [i for i, s in enumerate(shape) if s == -1]
    if len(unknown) > 1 or any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"make_mesh: shape {shape} may contain at most one -1 and otherwise positive sizes.")
    known = math.prod(s for s in shape if s != -1)
    if unknown:
        if num_devices % known:
            raise ValueError(
                f"make_mesh: the fixed axes of shape {shape} (product {known}) do not divide "
                f"the {num_devices} available devices."
            )
        shape = tuple(num_devices // known if s == -1 else s for s in shape)
    elif known != num_devices:
        raise ValueError(f"make_mesh: shape {shape} needs {known} devices, but {num_devices} are available.")
    return shape


def make_mesh(
    shape: Sequence[int] = (-1, 1),
    axis_names: Sequence[str] = ("data", "model"),
    *,
    devices: Sequence[Any] | None = None,
) -> Mesh:
    """A mesh over all (or the given) devices, with automatic-sharding axes.

    Args:
      shape: size of each axis; one entry may be -1 for "all remaining devices".
      axis_names: one name per axis.
      devices: defaults to `jax.devices()` (all processes' devices).
    """
    if len(shape) != len(axis_names):
        raise ValueError(
            f"make_mesh: shape {tuple(shape)} and axis_names {tuple(axis_names)} must have the same length."
        )
    num_devices = len(devices) if devices is not None else jax.device_count()
    resolved = _resolve_shape(shape, num_devices)
    return jax.make_mesh(
        resolved, tuple(axis_names), axis_types=(jax.sharding.AxisType.Auto,) * len(resolved), devices=devices
    )


def _as_axes(data_axes: str | Sequence[str]) -> tuple[str, ...]:
    return (data_axes,) if isinstance(data_axes, str) else tuple(data_axes)


def data_axis_size(mesh: Mesh, data_axes: str | Sequence[str] = ("data",)) -> int:
    """How many ways the batch is split: the product of the data axes' sizes."""
    axes = _as_axes(data_axes)
    missing = [a for a in axes if a not in mesh.shape]
    if missing:
        raise ValueError(f"Mesh axes {tuple(mesh.shape)} lack data axes {missing}.")
    return math.prod(mesh.shape[a] for a in axes)


def batch_sharding(mesh: Mesh, data_axes: str | Sequence[str] = ("data",)) -> NamedSharding:
    """Leading (batch) dim split over `data_axes`; other dims replicated."""
    data_axis_size(mesh, data_axes)  # Validates the axis names.
    return NamedSharding(mesh, P(_as_axes(data_axes)))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (small state, scalars, frozen tables)."""
    return NamedSharding(mesh, P())


def shard_batch(batch: Any, mesh: Mesh, data_axes: str | Sequence[str] = ("data",)) -> Any:
    """Places every batch leaf with its leading dim split over `data_axes`.

    Args:
      batch: pytree of numpy/jax arrays, all with a leading batch dimension. In a
        multi-process run each process passes its local rows only.
      mesh: from `make_mesh`.
      data_axes: mesh axes the batch is split over.

    Returns:
      The same pytree of global `jax.Array`s sharded with `batch_sharding`.
    """
    sharding = batch_sharding(mesh, data_axes)
    splits = data_axis_size(mesh, data_axes)
    processes = jax.process_count()

    def place(path, leaf):
        name = jax.tree_util.keystr(path) or "<batch>"
        leaf = leaf if isinstance(leaf, jax.Array) else np.asarray(leaf)
        if leaf.ndim == 0:
            raise ValueError(f"shard_batch: batch leaf {name} is a scalar; it needs a leading batch dimension.")
        global_rows = leaf.shape[0] * processes
        if global_rows % splits:
            where = (
                f"{leaf.shape[0]} rows per process x {processes} processes"
                if processes > 1
                else f"batch size {leaf.shape[0]}"
            )
            raise ValueError(
                f"shard_batch: batch leaf {name} has {where}, not divisible by "
                f"the data-axis size {splits} (axes {_as_axes(data_axes)})."
            )
        if processes > 1:
            return jax.make_array_from_process_local_data(sharding, np.asarray(leaf))
        return jax.device_put(leaf, sharding)

    return jax.tree_util.tree_map_with_path(place, batch)


def process_row_range(
    num_rows: int, mesh: Mesh | None = None, data_axes: str | Sequence[str] = ("data",)
) -> tuple[int, int]:
    """Rows [start, stop) of a `num_rows` global batch that this process feeds.

    Without a mesh: the process's equal contiguous share, [pid*B/P, (pid+1)*B/P).
    With a mesh: the rows `batch_sharding(mesh)` puts on this process's devices
    (the same block whenever the devices of process i come i-th along the data axis,
    as on CPU and most GPU clusters, but also right when they do not), so the global
    array `shard_batch` assembles equals the single-process batch row for row.
    """
    processes, pid = jax.process_count(), jax.process_index()
    if mesh is None:
        if num_rows % processes:
            raise ValueError(
                f"local_rows: global batch of {num_rows} rows is not divisible by the "
                f"{processes} processes; make the batch size a multiple of {processes}."
            )
        share = num_rows // processes
        return pid * share, (pid + 1) * share
    splits = data_axis_size(mesh, data_axes)
    if num_rows % splits or num_rows % processes:
        raise ValueError(
            f"local_rows: global batch of {num_rows} rows is not divisible by the "
            f"data-axis size {splits} and the {processes} processes; make the batch "
            f"size a multiple of {math.lcm(splits, processes)}."
        )
    indices = batch_sharding(mesh, data_axes).addressable_devices_indices_map((num_rows,))
    blocks = sorted({s[0].indices(num_rows)[:2] for s in indices.values()})
    start, stop = blocks[0][0], max(b[1] for b in blocks)
    if sum(b - a for a, b in blocks) != stop - start:  # Must be one contiguous block.
        raise ValueError(
            f"local_rows: process {pid} holds non-contiguous batch rows {blocks} "
            "on this mesh; order the devices so each process owns one block."
        )
    return start, stop


def local_rows(batch: Any, mesh: Mesh | None = None, data_axes: str | Sequence[str] = ("data",)) -> Any:
    """This process's slice of a global batch, the input `shard_batch` expects.

    Every process builds the same global batch (data order depends only on seed and
    step) and keeps its own rows (see `process_row_range`). A single-process run
    gets the batch back unchanged.

    Args:
      batch: pytree of arrays with the same leading (global batch) dimension.
      mesh, data_axes: as passed to `shard_batch`; None uses equal shares by process id.
    """
    if jax.process_count() == 1:
        return batch
    leaves = jax.tree_util.tree_leaves_with_path(batch)
    sizes = {int(np.shape(leaf)[0]) if np.ndim(leaf) else None for _, leaf in leaves}
    if len(sizes) != 1 or None in sizes:
        shapes = {jax.tree_util.keystr(p) or "<batch>": np.shape(leaf) for p, leaf in leaves}
        raise ValueError(f"local_rows: every batch leaf needs the same leading batch dimension; got {shapes}.")
    start, stop = process_row_range(sizes.pop(), mesh, data_axes)
    return jax.tree.map(lambda leaf: leaf[start:stop], batch)
