"""Logical axis rules -> mesh shardings for parameters, optimizer state and batches.

Every parameter leaf gets logical axis names from its path (`logical_axes`), and a rule
table maps logical names to mesh axes (`DEFAULT_RULES`, `REPLICATED_RULES`). The result
is one `NamedSharding` per leaf:

  mesh = make_mesh((2, 4))                                    # ('data', 'model')
  state_sharding = tree_shardings(state, mesh)                # params, opt_state, step, rng
  state = jax.device_put(state, state_sharding)
  step_fn = jax.jit(train_step, in_shardings=(state_sharding, batch_sharding(mesh)),
                    out_shardings=(state_sharding, replicated(mesh)), donate_argnums=(0,))

or, to create parameters already sharded (never materialised whole on one device):

  abstract, shardings = abstract_sharded(lambda: model.init(rng, ids, mask)['params'], mesh)
  params = jax.jit(lambda: model.init(rng, ids, mask)['params'], out_shardings=shardings)()

Default layout (FSDP + tensor parallel on a ('data', 'model') mesh):

  leaf                                logical axes          mesh axes (DEFAULT_RULES)
  embed/embedding [V, d]              ('vocab', 'embed')    ('model', 'data')
  pos_embed/embedding [P, d]          (None, 'embed')       (None, 'data')
  {q,k,v}_proj/kernel [d, H*D]        ('embed', 'heads')    ('data', 'model')
  o_proj/kernel [H*D, d]              ('heads', 'embed')    ('model', 'data')
  {gate,up}_proj/kernel [d, F]        ('embed', 'mlp')      ('data', 'model')
  down_proj/kernel [F, d]             ('mlp', 'embed')      ('model', 'data')
  lm_head/kernel [d, V]               ('embed', 'vocab')    ('data', 'model')
  <proj>/bias [out]                   (out-axis,)           e.g. q_proj/bias -> ('model',)
  *norm*/{scale,bias} [d]             (None,)               replicated (q_norm/k_norm [D] and
                                                            Gemma's post_*_norm too)
  head/{kernel,bias} (scalar head)    (None, None), (None,) replicated (d x 1 is tiny)
  <proj>/lora_a [in, r]               (in-axis, None)       LoRA (models/lora.py)
  <proj>/lora_b [r, out]              (None, out-axis)
  <proj>/qvalue [in, out]             as the kernel         int8 weights (models/quant.py)
  <proj>/scale [out] or [1, out]      (..., out-axis)       per-output-channel scale
  anything else, and all scalars      replicated

'embed' -> 'data' is FSDP: every matrix (and its Adam moments, which share its path
suffix) is split over the data axis too, and under jit GSPMD all-gathers a weight
just before it is used. Paths are matched by their END, so the same table serves the
params tree, optimizer states (`.../mu/backbone/layers_0/attn/q_proj/kernel`) and a
whole train state; leaves whose path names nothing known (the step counter, the rng
key data, Adam's `count`) are replicated. Leaves with extra leading dims (layers
stacked for `scan`) get None on those dims.

A dim is split only when its size is divisible by the product of its mesh axes'
sizes; otherwise that dim is replicated (e.g. a vocabulary of 50 on a 4-way model
axis). Mesh axes of size 1 or absent from the mesh are dropped, and one mesh axis is
used at most once per leaf (the first dim that asks for it wins).

Note: 'heads' shards the flattened H*D output of q/k/v. Any split that divides H*D is
correct, but it is only free of extra communication when the model axis divides the
number of KV heads; otherwise GSPMD reshards around the [B, T, H, D] reshape.

Batches: only the leading (batch) dim is placed, split over 'data'
(`common.mesh.shard_batch`). Activations are not annotated: under jit GSPMD
propagates shardings from the parameters and the batch through the computation.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional, Union

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "DEFAULT_RULES",
    "REPLICATED_RULES",
    "logical_axes",
    "spec_for",
    "tree_partition_specs",
    "tree_shardings",
    "param_shardings",
    "shard_params",
    "abstract_sharded",
    "with_shardings",
    "param_path",
    "layer_sharding",
    "with_layer_sharding",
    "constrain_layer_params",
]

MeshAxes = Union[None, str, Sequence[str]]
Rules = Union[Mapping[str, MeshAxes], Sequence[tuple]]

# FSDP over 'data' (params and optimizer state split along d_model), tensor parallel over 'model'.
DEFAULT_RULES: dict[str, MeshAxes] = {
    "embed": "data",
    "heads": "model",
    "mlp": "model",
    "vocab": "model",
}

# Pure data parallelism: every device holds whole params; only batches are split.
REPLICATED_RULES: dict[str, MeshAxes] = {"embed": None, "heads": None, "mlp": None, "vocab": None}

# Module name -> (logical axis of the input dim, of the output dim) of its [in, out] matrix.
_MATRIX_AXES: dict[str, tuple[Optional[str], Optional[str]]] = {
    "embed": ("vocab", "embed"),  # [V, d] table: rows are tokens
    "pos_embed": (None, "embed"),  # [P, d]: positions are few, never split
    "q_proj": ("embed", "heads"),
    "k_proj": ("embed", "heads"),
    "v_proj": ("embed", "heads"),
    "o_proj": ("heads", "embed"),
    "gate_proj": ("embed", "mlp"),
    "up_proj": ("embed", "mlp"),
    "down_proj": ("mlp", "embed"),
    "lm_head": ("embed", "vocab"),
    "head": (None, None),  # scalar reward/value head [d, 1]: tiny, replicated
}
_MATRIX_LEAVES = ("kernel", "embedding", "qvalue")  # the [in, out] matrix itself (or its int8 copy)


def param_path(path: tuple[Any, ...]) -> str:
    """'/'-joined names of a pytree key path, e.g. 'backbone/layers_0/attn/kernel'."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        else:
            parts.append(str(key))
    return "/".join(parts)


def _find_module(parts: list[str]) -> Optional[int]:
    """Index of the last path component naming a known module (suffix match)."""
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] in _MATRIX_AXES:
            return i
    return None


def logical_axes(path: str, shape: Sequence[int]) -> tuple[Optional[str], ...]:
    """Logical axis names (one per dim of `shape`) of the leaf at '/'-joined `path`.

    The path may carry any prefix (optimizer-state or train-state nesting): the module
    is the last known name in it (q_proj, embed, lm_head, ...). Norm parameters,
    unknown paths and shapes that do not fit the expected rank get all-None (replicated).
    See the module docstring for the table.
    """
    rank = len(shape)
    if rank == 0:
        return ()
    replicated = (None,) * rank
    parts = [p for p in str(path).split("/") if p]
    where = _find_module(parts)
    if where is None:
        return replicated
    in_axis, out_axis = _MATRIX_AXES[parts[where]]
    rest = parts[where + 1 :]  # what lies under the module: ['kernel'], ['lora_a'], ['lora_a', 'kernel'] ...
    if not rest:
        return replicated
    leaf = rest[-1]
    if any("lora_a" in p for p in rest):
        axes: tuple = (in_axis, None)  # [in, r]: the rank dim is small
    elif any("lora_b" in p for p in rest):
        axes = (None, out_axis)  # [r, out]
    elif leaf in _MATRIX_LEAVES and len(rest) == 1:
        axes = (in_axis, out_axis)
    elif leaf == "bias" and len(rest) == 1:
        axes = (out_axis,)
    elif leaf == "scale" and len(rest) == 1:
        # Per-output-channel scale of an int8 matrix: [out] or [1, out] (keepdims).
        axes = (None,) * (rank - 1) + (out_axis,)
    else:
        return replicated
    if len(axes) > rank:
        return replicated
    # Extra leading dims (layers stacked for scan, ensembles) are never split.
    return (None,) * (rank - len(axes)) + tuple(axes)


def _rules_dict(rules: Rules) -> dict[str, MeshAxes]:
    if isinstance(rules, Mapping):
        return dict(rules)
    out: dict[str, MeshAxes] = {}
    for item in rules:
        if len(item) != 2:
            raise ValueError(f"sharding rules: expected (logical_name, mesh_axes) pairs, got {item!r}")
        out.setdefault(item[0], item[1])  # first rule for a name wins (as in flax's logical rules)
    return out


def _mesh_sizes(mesh: Any) -> dict[str, int]:
    """{axis name: size} of a Mesh or AbstractMesh."""
    return {str(k): int(v) for k, v in dict(mesh.shape).items()}


def spec_for(path: str, shape: Sequence[int], mesh: Any, rules: Rules = DEFAULT_RULES) -> P:
    """PartitionSpec (one entry per dim) of a leaf with `path` and `shape` on `mesh`.

    Dims whose size the mesh axes do not divide, mesh axes of size 1, axes missing from
    the mesh and axes already used by an earlier dim of this leaf all fall back to None.
    """
    sizes = _mesh_sizes(mesh)
    table = _rules_dict(rules)
    used: set[str] = set()
    entries = []
    for dim, name in zip(shape, logical_axes(path, shape)):
        target = table.get(name) if name is not None else None
        if target is None:
            entries.append(None)
            continue
        axes = (target,) if isinstance(target, str) else tuple(target)
        axes = tuple(a for a in axes if sizes.get(a, 1) > 1 and a not in used)
        split = math.prod(sizes[a] for a in axes)
        if not axes or dim % split:
            entries.append(None)
            continue
        used.update(axes)
        entries.append(axes[0] if len(axes) == 1 else axes)
    return P(*entries)


def _shape_of(leaf: Any) -> tuple[int, ...]:
    shape = getattr(leaf, "shape", None)
    return tuple(shape) if shape is not None else tuple(np.shape(leaf))


def tree_partition_specs(tree: Any, mesh: Any, rules: Rules = DEFAULT_RULES) -> Any:
    """PartitionSpec per leaf of any pytree whose leaf paths end with a param path.

    Works on params, optax states, whole train states and `jax.eval_shape` outputs;
    `mesh` may be a `Mesh` or an `AbstractMesh` (only axis names and sizes are read).
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: spec_for(param_path(path), _shape_of(leaf), mesh, rules), tree
    )


def tree_shardings(tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """NamedSharding per leaf (see `tree_partition_specs`); scalars and unknown leaves replicated."""
    specs = tree_partition_specs(tree, mesh, rules)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, P))


def param_shardings(params: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """NamedSharding per parameter leaf. Same as `tree_shardings`, named for the common case."""
    return tree_shardings(params, mesh, rules)


def shard_params(params: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """Places existing (host or single-device) params (or any state tree) on `mesh` by the rules.

    Single-process only: every value must be whole on this host. Multi-host runs create
    params sharded instead (`abstract_sharded` + `jax.jit(init_fn, out_shardings=...)`).
    """
    return jax.device_put(params, tree_shardings(params, mesh, rules))


def abstract_sharded(
    init_fn: Callable[..., Any], mesh: Mesh, rules: Rules = DEFAULT_RULES, *args, **kwargs
) -> tuple[Any, Any]:
    """Shapes and shardings of `init_fn(*args, **kwargs)`'s output, computed without running it.

    Returns (abstract, shardings): `abstract` is the `jax.eval_shape` tree with each
    ShapeDtypeStruct carrying its sharding (a restore template for Orbax), `shardings`
    the matching NamedSharding tree, for creating the values already sharded:

      abstract, shardings = abstract_sharded(init_fn, mesh)
      params = jax.jit(init_fn, out_shardings=shardings)()
    """
    shapes = jax.eval_shape(init_fn, *args, **kwargs)
    shardings = tree_shardings(shapes, mesh, rules)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    return abstract, shardings


def with_shardings(tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """ShapeDtypeStruct per leaf of `tree` (arrays, ShapeDtypeStructs) carrying its NamedSharding on
    `mesh` by `rules`: a restore template that makes Orbax place every array straight onto its shard."""
    shardings = tree_shardings(tree, mesh, rules)
    return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree, shardings)


# ----------------------------------------------------------------------------- inside the layer scan

# (mesh, rules) the scanned layers constrain their per-layer params to while a step is traced
# (models/scan.py); None: no constraint (one device, or no trainer asked).
_LAYER_SHARDING: contextvars.ContextVar = contextvars.ContextVar("layer_sharding", default=None)


@contextlib.contextmanager
def layer_sharding(mesh: Optional[Mesh], rules: Rules = DEFAULT_RULES):
    """Within this context, code traced through `scan_layers` models constrains each layer's param
    slice inside the scan body to its sharding on `mesh` by `rules`; the constraint's transpose
    puts the same sharding on that layer's gradient, so the backward scan accumulates sharded
    weight gradients (GSPMD alone leaves the stacked accumulator whole on every device).
    No-op on a mesh of one device."""
    token = _LAYER_SHARDING.set(None if mesh is None or mesh.size <= 1 else (mesh, rules))
    try:
        yield
    finally:
        _LAYER_SHARDING.reset(token)


def with_layer_sharding(fn: Callable[..., Any], mesh: Optional[Mesh], rules: Rules = DEFAULT_RULES):
    """`fn` traced inside `layer_sharding(mesh, rules)`: wrap a step before `jax.jit`, so the
    context is active whenever the step is traced."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with layer_sharding(mesh, rules):
            return fn(*args, **kwargs)

    return wrapped


def layer_sharding_active() -> bool:
    """Whether a `layer_sharding` context with a multi-device mesh is active."""
    return _LAYER_SHARDING.get() is not None


def constrain_layer_params(params: Any) -> Any:
    """One layer's param tree (paths ending like attn/q_proj/kernel) with every leaf constrained to
    its sharding under the active `layer_sharding`; unchanged outside one."""
    active = _LAYER_SHARDING.get()
    if active is None:
        return params
    mesh, rules = active
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jax.lax.with_sharding_constraint(
            x, NamedSharding(mesh, spec_for(param_path(path), x.shape, mesh, rules))
        ),
        params,
    )
