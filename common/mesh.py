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
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = ['make_mesh', 'batch_sharding', 'replicated', 'shard_batch', 'data_axis_size']


def _resolve_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Replaces one -1 with whatever makes the product equal `num_devices`."""
  shape = tuple(int(s) for s in shape)
  unknown = [i for i, s in enumerate(shape) if s == -1]
  if len(unknown) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f'make_mesh: shape {shape} may contain at most one -1 and '
                     'otherwise positive sizes.')
  known = math.prod(s for s in shape if s != -1)
  if unknown:
    if num_devices % known:
      raise ValueError(
          f'make_mesh: the fixed axes of shape {shape} (product {known}) do not divide '
          f'the {num_devices} available devices.')
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  elif known != num_devices:
    raise ValueError(f'make_mesh: shape {shape} needs {known} devices, but '
                     f'{num_devices} are available.')
  return shape


def make_mesh(shape: Sequence[int] = (-1, 1),
              axis_names: Sequence[str] = ('data', 'model'),
              *, devices: Sequence[Any] | None = None) -> Mesh:
  """A mesh over all (or the given) devices, with automatic-sharding axes.

  Args:
    shape: size of each axis; one entry may be -1 for "all remaining devices".
    axis_names: one name per axis.
    devices: defaults to `jax.devices()` (all processes' devices).
  """
  if len(shape) != len(axis_names):
    raise ValueError(f'make_mesh: shape {tuple(shape)} and axis_names '
                     f'{tuple(axis_names)} must have the same length.')
  num_devices = len(devices) if devices is not None else jax.device_count()
  resolved = _resolve_shape(shape, num_devices)
  return jax.make_mesh(resolved, tuple(axis_names),
                       axis_types=(jax.sharding.AxisType.Auto,) * len(resolved),
                       devices=devices)


def _as_axes(data_axes: str | Sequence[str]) -> tuple[str, ...]:
  return (data_axes,) if isinstance(data_axes, str) else tuple(data_axes)


def data_axis_size(mesh: Mesh, data_axes: str | Sequence[str] = ('data',)) -> int:
  """How many ways the batch is split: the product of the data axes' sizes."""
  axes = _as_axes(data_axes)
  missing = [a for a in axes if a not in mesh.shape]
  if missing:
    raise ValueError(f'Mesh axes {tuple(mesh.shape)} lack data axes {missing}.')
  return math.prod(mesh.shape[a] for a in axes)


def batch_sharding(mesh: Mesh, data_axes: str | Sequence[str] = ('data',)) -> NamedSharding:
  """Leading (batch) dim split over `data_axes`; other dims replicated."""
  data_axis_size(mesh, data_axes)  # Validates the axis names.
  return NamedSharding(mesh, P(_as_axes(data_axes)))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (small state, scalars, frozen tables)."""
  return NamedSharding(mesh, P())


def shard_batch(batch: Any, mesh: Mesh,
                data_axes: str | Sequence[str] = ('data',)) -> Any:
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
    name = jax.tree_util.keystr(path) or '<batch>'
    leaf = leaf if isinstance(leaf, jax.Array) else np.asarray(leaf)
    if leaf.ndim == 0:
      raise ValueError(f'shard_batch: batch leaf {name} is a scalar; it needs a '
                       'leading batch dimension.')
    global_rows = leaf.shape[0] * processes
    if global_rows % splits:
      where = (f'{leaf.shape[0]} rows per process x {processes} processes'
               if processes > 1 else f'batch size {leaf.shape[0]}')
      raise ValueError(f'shard_batch: batch leaf {name} has {where}, not divisible by '
                       f'the data-axis size {splits} (axes {_as_axes(data_axes)}).')
    if processes > 1:
      return jax.make_array_from_process_local_data(sharding, np.asarray(leaf))
    return jax.device_put(leaf, sharding)

  return jax.tree_util.tree_map_with_path(place, batch)
