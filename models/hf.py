"""Hugging Face checkpoints in and out: config.json + *.safetensors <-> (TransformerConfig, params).

Safetensors only. A folder that holds only pickle weights (pytorch_model.bin, *.pt, ...) is
refused with a clear error: pickle can execute code, and nothing from the folder is ever run
(no `trust_remote_code`). Sharded checkpoints (model.safetensors.index.json) load too.

This module is the file I/O; the name mapping (config.json <-> TransformerConfig, HF tensor
names <-> our param tree, per family) is models/hf_mapping.py, re-exported here.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
from typing import Optional

import jax.numpy as jnp
import numpy as np

from models import safetensors_io
from models.families import CAUSAL_LM
from models.hf_mapping import _map, config_from_hf, config_to_hf, params_from_hf, params_to_hf  # noqa: F401
from models.scan import stack_layers
from models.transformer import TransformerConfig

PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "*.pickle")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


# ----------------------------------------------------------------------------- reading


def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not os.path.exists(os.path.join(path, f))]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are not in the folder: {missing}")
        return [os.path.join(path, f) for f in files]
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if files:
        return files
    pickles = [os.path.basename(p) for pat in PICKLE_PATTERNS for p in glob.glob(os.path.join(path, pat))]
    if pickles:
        raise ValueError(
            f"{path} holds only pickle weights ({', '.join(sorted(pickles))}); this loader reads safetensors "
            "only and never unpickles (pickle can run arbitrary code). Convert it once in a trusted "
            "environment, e.g. transformers' `model.save_pretrained(dir, safe_serialization=True)`."
        )
    raise FileNotFoundError(f"no *.safetensors weights in {path}")


def read_hf_folder(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json dict, {tensor name: numpy array}) of a local HF folder.

    The arrays are read-only memory-mapped views (models/safetensors_io.py): nothing is read
    from disk until a tensor (or a slice of it) is used, and bfloat16 tensors keep their dtype
    (ml_dtypes.bfloat16)."""
    path = os.fspath(path)
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path} is not a Hugging Face model folder: {cfg_path} is missing")
    with open(cfg_path) as f:
        hf_config = json.load(f)
    tensors = {}
    for file in _weight_files(path):
        tensors.update(safetensors_io.lazy_tensors(file))
    return hf_config, tensors


def folder_param_dtype(tensors: dict) -> str:
    """The floating dtype the folder's weights are stored in ('float32', 'bfloat16', 'float16')."""
    for array in tensors.values():
        if jnp.issubdtype(array.dtype, jnp.floating):
            return jnp.dtype(array.dtype).name
    return "float32"


class StackedView:
    """[G, ...] stack of G same-shaped (memory-mapped) views that reads only the slices asked for:
    indexing it stacks the sliced views, so a device's shard of a stacked leaf is read from disk
    alone (scan_layers loads: models/scan.py)."""

    def __init__(self, views):
        self.views = list(views)
        self.shape = (len(self.views),) + tuple(self.views[0].shape)
        self.dtype = self.views[0].dtype

    def __getitem__(self, index):
        index = index if isinstance(index, tuple) else (index,)
        first, rest = (index[0], index[1:]) if index else (slice(None), ())
        chosen = self.views[first] if isinstance(first, slice) else [self.views[first]]
        out = np.stack([np.asarray(v[rest]) for v in chosen])
        return out if isinstance(first, slice) else out[0]

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype)


def place_params(views: dict, *, param_dtype: str, mesh=None, rules=None) -> dict:
    """Tree of NumPy views -> jax arrays of `param_dtype`, one tensor at a time.

    Without a mesh each tensor is copied whole onto the default device. With a mesh each
    tensor goes straight onto its NamedSharding (models/sharding.py rules): every device's
    callback reads only its own slice of the view (a memory map: only those bytes come off
    disk), so no device and no host buffer ever holds more than one tensor's shard.
    """
    import jax

    cast = jnp.dtype(param_dtype)
    if mesh is None:
        return _map(lambda x: jnp.asarray(np.array(x, dtype=cast)), views)
    from models.sharding import DEFAULT_RULES, tree_shardings

    shapes = _map(lambda x: jax.ShapeDtypeStruct(x.shape, cast), views)
    shardings = tree_shardings(shapes, mesh, DEFAULT_RULES if rules is None else rules)

    def place(view, sharding):
        read = {}  # devices holding the same slice (a partly replicated leaf) share one host copy of it

        def shard(index):
            key = tuple((s.start, s.stop, s.step) for s in index)
            if key not in read:
                read[key] = np.array(view[index], dtype=cast)
            return read[key]

        return jax.make_array_from_callback(view.shape, sharding, shard)

    return jax.tree.map(place, views, shardings, is_leaf=lambda x: isinstance(x, (np.ndarray, StackedView)))


def load_hf_checkpoint(
    path: str,
    *,
    dtype: str = "float32",
    param_dtype: Optional[str] = None,
    with_leftovers: bool = False,
    mesh=None,
    rules=None,
    scan_layers: bool = False,
):
    """Load a local HF folder into (TransformerConfig, params) [+ leftover tensors such as score.weight].

    A causal-LM folder without lm_head (a sequence-classification export) gets no `lm_head`
    params; tensors not part of the backbone (e.g. `score.weight`) come back as leftovers.
    Unknown extra tensors are an error unless `with_leftovers=True`.

    param_dtype: None keeps the folder's dtype (a bf16 folder loads as bf16). mesh (+ rules):
    place every tensor straight onto its sharding (see `place_params`); sharded
    model.safetensors.index.json folders load either way. scan_layers: the config runs with
    scan_layers and the params come stacked (`layers_stacked/p{j}` [G, ...], models/scan.py),
    each stacked leaf read slice by slice like the others.
    """
    hf_config, tensors = read_hf_folder(path)
    param_dtype = param_dtype or folder_param_dtype(tensors)
    config = config_from_hf(hf_config, dtype=dtype, param_dtype=param_dtype)
    views, leftovers = params_from_hf(config, tensors, cast=False)
    if scan_layers:
        config = config.replace(scan_layers=True)
        views = stack_layers(views, config, stack=StackedView)
    params = place_params(views, param_dtype=param_dtype, mesh=mesh, rules=rules)
    leftovers = {k: np.array(v) for k, v in leftovers.items()}  # copies: independent of the files
    if with_leftovers:
        return config, params, leftovers
    unknown = sorted(k for k in leftovers if k not in ("score.weight",))
    if unknown:
        raise ValueError(f"{path}: tensors not understood for {config.family}: {unknown[:10]}")
    return config, params


# ----------------------------------------------------------------------------- writing


def copy_tokenizer_files(src: Optional[str], dst: str) -> list[str]:
    """Copy the tokenizer files that exist in `src` into `dst`; returns their names."""
    copied = []
    if src:
        for name in TOKENIZER_FILES:
            if os.path.exists(os.path.join(src, name)):
                shutil.copy(os.path.join(src, name), os.path.join(dst, name))
                copied.append(name)
    return copied


def save_hf_checkpoint(
    config: TransformerConfig,
    params: dict,
    out_dir: str,
    *,
    tokenizer_dir: Optional[str] = None,
    architecture: Optional[str] = None,
    extra_tensors: Optional[dict] = None,
    extra_config: Optional[dict] = None,
    max_shard_bytes: int = 5 * 2**30,
    dtype: Optional[str] = None,
) -> str:
    """Write a HF folder (config.json, model.safetensors, tokenizer files) loadable by transformers.

    `architecture` defaults to the causal-LM class; for a reward model pass e.g.
    'LlamaForSequenceClassification' with `extra_tensors={'score.weight': W[1, d]}`. Tensors
    keep their dtype (bfloat16 included) unless `dtype` ('float32' / 'bfloat16' / 'float16')
    casts every floating tensor on disk; above `max_shard_bytes` the weights are split into
    model-0000i-of-0000n.safetensors files and a model.safetensors.index.json. The host holds
    one copy of the weights while writing.
    """
    os.makedirs(out_dir, exist_ok=True)
    default_arch = {
        "gpt2": "GPT2LMHeadModel",
        "llama": "LlamaForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "mistral": "MistralForCausalLM",
        **CAUSAL_LM,
    }[config.family]
    architecture = architecture or default_arch
    causal = architecture.endswith("LMHeadModel") or architecture.endswith("ForCausalLM")
    tensors = params_to_hf(config, params, include_lm_head=causal)
    tensors.update({k: np.ascontiguousarray(np.asarray(v)) for k, v in (extra_tensors or {}).items()})
    if dtype is not None:
        target = np.dtype(jnp.dtype(dtype))
        tensors = {
            k: np.ascontiguousarray(v.astype(target)) if jnp.issubdtype(v.dtype, jnp.floating) else v
            for k, v in tensors.items()
        }
    safetensors_io.save_tensors(tensors, out_dir, max_shard_bytes=max_shard_bytes)
    hf = config_to_hf(config, architecture=architecture, extra=extra_config)
    floating = [v.dtype for v in tensors.values() if jnp.issubdtype(v.dtype, jnp.floating)]
    if floating and not (extra_config and ("torch_dtype" in extra_config or "dtype" in extra_config)):
        hf["torch_dtype"] = hf["dtype"] = jnp.dtype(floating[0]).name  # what the files hold
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
    copy_tokenizer_files(tokenizer_dir, out_dir)
    return out_dir
