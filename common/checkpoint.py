"""Orbax checkpoints of a training run: the array state plus a small JSON dict.

Every checkpoint step holds two items:

  'state'  a pytree of jax/numpy arrays and Python scalars (params, optimizer
           state, step counter, PRNG keys ...), written with Orbax's pytree
           handler (the format of StandardSave) so large sharded arrays are
           saved/restored per shard.
  'extra'  a JSON-serialisable dict of small bookkeeping values that are not
           arrays: data-loader position, adaptive-KL coefficient, epoch, ...

Typical resume order in a trainer::

  ckpt = CheckpointManager(f'{workdir}/checkpoints', save_every=config.save_every)
  state = init_state(...)                       # or jax.eval_shape(init_state, ...)
  start_step, extra = 0, {}
  if ckpt.latest_step() is not None:
    state, extra = ckpt.restore(state)          # arrays get state's dtypes/shardings
    start_step = int(extra['step'])
  ...
  ckpt.save(step, state, {'step': step, 'data_position': pos})   # every save_every
  ckpt.save(step, state, {...}, force=True)     # at the end or on SIGTERM
  ckpt.close()

A subset of a checkpoint, e.g. only the params of a training state, is read with
`ckpt.restore({'params': abstract_params}, partial=True)`.

Saves are synchronous by default (they return once the checkpoint is committed;
`async_save=True` lets Orbax write in the background, for accelerator runs), and Orbax
writes each step into a temporary directory that is renamed only when complete, so
a process killed at any moment leaves either a complete checkpoint or none.

Integrity: once a step is committed, `checksums.json` in its folder records the size and
CRC-32 of every file. `verify(step)` re-reads them, so a truncated, deleted or rewritten
array file is caught instead of being restored as garbage (Orbax itself does not notice
a shortened OCDBT data file). `restore_newest_intact` tries the steps newest first,
reports each damaged one in one line (step and file or error), moves it aside to
`<directory>_damaged/` and restores the newest intact step.

PRNG keys: typed keys (`jax.random.key`) round-trip through Orbax 0.12 directly.
`rng_to_data` / `rng_from_data` convert to/from raw uint32 key data for code that
prefers to keep raw keys in its state or in JSON.

Multi-process: call every method on every process with the same arguments; the
save decision depends only on `step`, so all processes agree, and Orbax
coordinates which process writes what.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = [
    "CheckpointManager",
    "default_sharding",
    "CheckpointDamaged",
    "NoIntactCheckpoint",
    "rng_to_data",
    "rng_from_data",
]

_ITEMS = ("state", "extra")
CHECKSUM_FILE = "checksums.json"


class CheckpointDamaged(ValueError):
    """One checkpoint step cannot be restored; the message names the step and the file or key."""


class NoIntactCheckpoint(RuntimeError):
    """Every checkpoint on disk is damaged: the run stops instead of restoring garbage."""


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            crc = zlib.crc32(chunk, crc)
    return crc


def _files_under(root: str) -> list[str]:
    out = []
    for folder, _, names in os.walk(root):
        for name in names:
            rel = os.path.relpath(os.path.join(folder, name), root)
            if rel != CHECKSUM_FILE:
                out.append(rel)
    return sorted(out)


def rng_to_data(key: jax.Array) -> jax.Array:
    """Returns the raw uint32 data of a typed PRNG key (raw keys pass through)."""
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.random.key_data(key)
    return key


def rng_from_data(data: Any, *, impl: str | None = None) -> jax.Array:
    """Wraps raw uint32 key data (e.g. from `rng_to_data`) back into a typed key.

    Args:
      data: uint32 array of shape [..., *key_shape] (key_shape is (2,) for the
        default threefry implementation).
      impl: PRNG implementation name; None means JAX's default.
    """
    data = jax.numpy.asarray(data, dtype=jax.numpy.uint32)
    return jax.random.wrap_key_data(data, impl=impl)


def default_sharding() -> jax.sharding.Sharding:
    """Where a restored array goes when its template names no sharding."""
    if jax.process_count() == 1:
        return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    # Across processes a single device would be unreachable from the others, so
    # replicate over every device instead.
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("all",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def _abstract_leaf(leaf: Any) -> Any:
    """Turns one template leaf into the abstract leaf Orbax restores into.

    jax arrays become ShapeDtypeStructs carrying their sharding, so the restored
    arrays land exactly where the template's arrays live; ShapeDtypeStructs without
    a sharding get a default one; numpy arrays and Python scalars stay as they are
    (Orbax restores them as numpy arrays / Python scalars).
    """
    if isinstance(leaf, jax.Array):
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
    if isinstance(leaf, jax.ShapeDtypeStruct):
        if leaf.sharding is None:
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=default_sharding())
        return leaf
    return leaf


class CheckpointManager:
    """Periodic, atomic Orbax checkpoints of ('state' pytree, 'extra' JSON dict).

    Args:
      directory: where the step folders go, usually `<workdir>/checkpoints`;
        created if missing.
      save_every: `save(step, ...)` writes when `step % save_every == 0`
        (or when forced). Must be >= 1.
      max_to_keep: how many most recent checkpoints to keep on disk; older ones
        are deleted after each save.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        save_every: int,
        max_to_keep: int = 2,
        async_save: bool = False,
        checksums: bool = True,
    ):
        if int(save_every) < 1:
            raise ValueError(f"CheckpointManager: save_every must be >= 1, got {save_every}.")
        if int(max_to_keep) < 1:
            raise ValueError(f"CheckpointManager: max_to_keep must be >= 1, got {max_to_keep}.")
        self.directory = os.path.abspath(os.fspath(directory))
        self.save_every = int(save_every)
        self.async_save = bool(async_save)
        self.checksums = bool(checksums)
        self._unsummed: list[int] = []  # committed (or in flight) steps without checksums.json yet
        options = ocp.CheckpointManagerOptions(
            max_to_keep=int(max_to_keep),
            create=True,
            # Synchronous by default: when save() returns, the step is committed on disk. Async
            # saves overlap writing with training; forced saves (end, SIGTERM) still wait.
            enable_async_checkpointing=self.async_save,
        )
        # PyTree (not Standard) handlers: same on-disk format, but restores may be
        # partial, and one manager may mix full and partial restores.
        self._manager = ocp.CheckpointManager(
            self.directory,
            item_names=_ITEMS,
            options=options,
            item_handlers={"state": ocp.PyTreeCheckpointHandler(), "extra": ocp.JsonCheckpointHandler()},
        )

    def all_steps(self) -> list[int]:
        """Steps with a complete checkpoint on disk, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None if there is none."""
        return self._manager.latest_step()

    def should_save(self, step: int) -> bool:
        """Whether `save(step, ...)` without force would write."""
        return int(step) % self.save_every == 0

    def save(self, step: int, state: Any, extra: Mapping[str, Any] | None = None, *, force: bool = False) -> bool:
        """Saves `state` and `extra` as checkpoint `step` when due.

        Args:
          step: the training step this state corresponds to (steps completed).
          state: pytree of jax/numpy arrays and Python scalars.
          extra: JSON-serialisable dict (data position, KL coefficient, ...).
          force: save even when `step % save_every != 0`.

        Returns:
          True if a checkpoint was written; False if not due, or if `step` is
          already on disk (e.g. a forced final save right after a periodic one).
        """
        step = int(step)
        if not (force or self.should_save(step)):
            return False
        if step in self._manager.all_steps():
            return False
        extra = dict(extra or {})
        self._write_pending_checksums()  # a previous async save must be finished before the next
        saved = self._manager.save(
            step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state), extra=ocp.args.JsonSave(extra)), force=True
        )  # The save_every decision is ours, made above.
        if saved:
            self._unsummed.append(step)
        if not self.async_save or force:
            self._write_pending_checksums()
        return bool(saved)

    def _step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(int(step)))

    def _write_pending_checksums(self) -> None:
        """Waits for in-flight saves, then writes checksums.json for the steps that lack one."""
        self._manager.wait_until_finished()
        steps, self._unsummed = self._unsummed, []
        if not self.checksums or jax.process_index() != 0:
            return
        for step in steps:
            root = self._step_dir(step)
            if not os.path.isdir(root):  # already rotated out by max_to_keep
                continue
            sums = {
                rel: {"size": os.path.getsize(os.path.join(root, rel)), "crc32": _crc32(os.path.join(root, rel))}
                for rel in _files_under(root)
            }
            tmp = os.path.join(root, CHECKSUM_FILE + ".tmp")
            with open(tmp, "w") as f:
                json.dump({"algorithm": "crc32", "files": sums}, f, indent=0, sort_keys=True)
            os.replace(tmp, os.path.join(root, CHECKSUM_FILE))

    def verify(self, step: int) -> str | None:
        """None if checkpoint `step` matches its checksums.json, else what is wrong (file and how).

        A step saved without checksums (older runs) is only checked for Orbax's own files."""
        root = self._step_dir(step)
        if not os.path.isdir(root):
            return f"folder {root} is missing"
        path = os.path.join(root, CHECKSUM_FILE)
        if not os.path.exists(path):
            for rel in ("_CHECKPOINT_METADATA", os.path.join("state", "_METADATA")):
                if not os.path.exists(os.path.join(root, rel)):
                    return f"{rel} is missing"
            return None
        try:
            with open(path) as f:
                files = json.load(f)["files"]
        except (OSError, ValueError, KeyError) as e:
            return f"{CHECKSUM_FILE} is unreadable ({e})"
        for rel, want in sorted(files.items()):
            full = os.path.join(root, rel)
            if not os.path.exists(full):
                return f"{rel} is missing"
            size = os.path.getsize(full)
            if size != want["size"]:
                return f"{rel} has {size} bytes, {want['size']} were written (truncated or rewritten)"
            if _crc32(full) != want["crc32"]:
                return f"{rel} does not match its CRC-32 checksum (corrupted)"
        return None

    def quarantine(self, step: int, reason: str) -> str | None:
        """Moves damaged step `step` to `<directory>_damaged/<step>-<time>` (process 0) so the run
        can save that step again; returns the new location."""
        target = None
        if jax.process_index() == 0:
            damaged = self.directory.rstrip(os.sep) + "_damaged"
            os.makedirs(damaged, exist_ok=True)
            target = os.path.join(damaged, f"{int(step)}-{time.strftime('%Y%m%dT%H%M%S')}")
            shutil.move(self._step_dir(step), target)
            with open(os.path.join(target, "DAMAGED.txt"), "w") as f:
                f.write(reason + "\n")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"checkpoint_quarantine_{step}")
        self._manager.reload()
        return target

    def restore_newest_intact(
        self, state_template: Any, *, partial: bool = False, report=print
    ) -> tuple[int | None, Any, dict[str, Any]]:
        """(step, state, extra) of the newest checkpoint that verifies and restores.

        Each damaged step is reported in one line through `report`, moved aside (`quarantine`)
        and the next older one is tried. Returns (None, None, {}) when there is no checkpoint;
        raises NoIntactCheckpoint when there are some but none is intact.
        """
        damaged = []
        for step in sorted(self.all_steps(), reverse=True):
            problem = self.verify(step)
            if problem is None:
                try:
                    state, extra = self.restore(state_template, step, partial=partial)
                    return step, state, extra
                except Exception as e:  # Orbax/tensorstore raise many types for unreadable data
                    problem = f"restore failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            where = self.quarantine(step, problem)
            damaged.append(f"step {step}: {problem}")
            older = [s for s in self.all_steps() if s < step]
            report(
                f"Checkpoint step {step} in {self.directory} is damaged ({problem}); moved to {where}; "
                + (f"falling back to step {max(older)}." if older else "no older checkpoint.")
            )
        if damaged:
            raise NoIntactCheckpoint(
                f"No intact checkpoint in {self.directory} ({'; '.join(damaged)}); the damaged ones are in "
                f"{self.directory}_damaged/. Delete the workdir's checkpoints/ to start over."
            )
        return None, None, {}

    def subtree_keys(self, key: str, step: int | None = None) -> list[str]:
        """Keys of state[key] in checkpoint `step` (e.g. the params' top level), [] if not a dict."""
        step = self.latest_step() if step is None else step
        if step is None:
            return []
        metadata = self._manager.item_metadata(int(step))["state"]
        tree = metadata.tree if hasattr(metadata, "tree") else metadata
        sub = tree.get(key) if hasattr(tree, "get") else None
        return sorted(sub) if hasattr(sub, "keys") else []

    def read_extra(self, step: int | None = None) -> dict[str, Any]:
        """The 'extra' JSON dict of checkpoint `step` (default: the latest) without its arrays."""
        step = self.latest_step() if step is None else step
        if step is None:
            return {}
        restored = self._manager.restore(int(step), args=ocp.args.Composite(extra=ocp.args.JsonRestore()))
        return dict(restored.extra or {})

    def restore(
        self, state_template: Any, step: int | None = None, *, partial: bool = False
    ) -> tuple[Any, dict[str, Any]]:
        """Restores checkpoint `step` (default: the latest).

        Args:
          state_template: pytree with the structure of the saved state; its leaves
            are concrete arrays or `jax.ShapeDtypeStruct`s (e.g. from
            `jax.eval_shape`), optionally with `.sharding`. Restored arrays get
            the template's dtypes and shardings (casting if the saved dtype
            differs); leaves without a sharding go to the first local device.
          step: which checkpoint; None means the latest.
          partial: if True, the template may hold only some of the saved subtrees
            (e.g. `{'params': ...}` out of a full training state); the rest is
            not read. If False, the template must match the saved structure.

        Returns:
          (state, extra): the restored pytree and the JSON dict saved with it.

        Raises:
          FileNotFoundError: if there is no checkpoint (or not that step).
        """
        available = self.all_steps()
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"No checkpoint to restore in {self.directory}.")
        elif int(step) not in available:
            raise FileNotFoundError(f"No checkpoint for step {step} in {self.directory}; available steps: {available}.")
        abstract = jax.tree.map(_abstract_leaf, state_template)
        args = ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item=abstract,
                restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                partial_restore=partial,
            ),
            extra=ocp.args.JsonRestore(),
        )
        try:
            restored = self._manager.restore(int(step), args=args)
        except ValueError as e:
            raise ValueError(
                f"Restoring step {step} from {self.directory} failed: {e}\n"
                "(CheckpointManager.restore(..., partial=True) reads a subset "
                "of the saved state.)"
            ) from e
        extra = restored.extra if restored.extra is not None else {}
        return restored.state, dict(extra)

    def restore_subtree(self, key: str, step: int | None = None, template: Any = None) -> tuple[Any, dict[str, Any]]:
        """Restores only `state[key]` (e.g. 'params' without the optimizer state).

        Shapes and dtypes come from the checkpoint's own metadata, so callers need not
        rebuild the optimizer to load a trained model. Arrays land on the default
        device (or `template`'s dtypes/shardings when given).

        Returns:
          (subtree, extra).
        """
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"No checkpoint to restore in {self.directory}.")
        self._check_intact(step)
        abstract = self.abstract_subtree(key, step) if template is None else template
        state, extra = self._restore_partial(int(step), {key: jax.tree.map(_abstract_leaf, abstract)})
        return state[key], extra

    def abstract_subtree(self, key: str, step: int | None = None) -> Any:
        """`state[key]` of checkpoint `step` (default: the latest) as saved, without reading it: a tree of
        ShapeDtypeStructs (no shardings; non-array leaves as their metadata), from Orbax's metadata."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint to restore in {self.directory}.")
        metadata = self._manager.item_metadata(int(step))["state"]
        tree = metadata.tree if hasattr(metadata, "tree") else metadata
        if key not in tree:
            raise KeyError(f"checkpoint {step} in {self.directory} has no {key!r}; keys: {sorted(tree)}")
        return jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype) if hasattr(m, "shape") else m, dict(tree)[key]
        )

    def restore_subset(self, template: Any, step: int, *, verify: bool = True) -> tuple[Any, dict[str, Any]]:
        """Restores only the leaves `template` names: a nested subset of the saved state, e.g.
        {'params': {'backbone': {'layers_3': ...}}} (one layer of the params); nothing else is read.

        Leaves are ShapeDtypeStructs or arrays: restored with their dtypes (cast if the saved one
        differs) and shardings (the default device when none). verify=False skips the checksum pass,
        for a caller that verified the step once and restores it piece by piece.

        Returns:
          (the restored subset, extra).
        """
        if verify:
            self._check_intact(step)
        return self._restore_partial(int(step), jax.tree.map(_abstract_leaf, template))

    def _check_intact(self, step: int) -> None:
        problem = self.verify(int(step))
        if problem is not None:
            raise CheckpointDamaged(
                f"checkpoint step {step} in {self.directory} is damaged: {problem}; "
                f"available steps: {self.all_steps()} (pass an older step)"
            )

    def _restore_partial(self, step: int, item: Any) -> tuple[Any, dict[str, Any]]:
        """(state subset, extra) of the abstract `item` (a subset of the saved state's tree)."""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=item,
                    restore_args=jax.tree.map(
                        lambda a: (
                            ocp.ArrayRestoreArgs(sharding=a.sharding, dtype=a.dtype)
                            if isinstance(a, jax.ShapeDtypeStruct)
                            else ocp.RestoreArgs()
                        ),
                        item,
                    ),
                    partial_restore=True,
                ),
                extra=ocp.args.JsonRestore(),
            ),
        )
        extra = restored.extra if restored.extra is not None else {}
        return restored.state, dict(extra)

    def wait(self) -> None:
        """Blocks until any in-flight save has finished (and its checksums are written)."""
        self._write_pending_checksums()

    def close(self) -> None:
        """Waits for pending work and releases Orbax's resources."""
        self._write_pending_checksums()
        self._manager.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
