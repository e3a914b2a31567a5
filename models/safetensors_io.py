"""Safetensors files read lazily (memory-mapped, any dtype incl. bfloat16) and written in shards.

`safetensors.numpy` cannot hold bfloat16 (NumPy has no such dtype), and `get_tensor` reads a
whole tensor. The format is simple enough to read directly (an 8-byte little-endian header
length, a JSON header {name: {dtype, shape, data_offsets}}, then the raw bytes): each tensor
becomes a read-only `np.memmap` view with an `ml_dtypes.bfloat16` dtype where needed, so
slicing a view reads only that slice from disk. That is what lets models/hf.py place each
tensor straight onto its sharding with host memory bounded by one shard, never the model.

Writing goes through a temporary file and `os.replace`, so a folder can be overwritten while
views of its old files are still alive (they keep reading the old inode).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"


def read_header(path: str) -> tuple[dict, int]:
    """(header dict without __metadata__, byte offset where the data starts) of one file."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 2**20:
            raise ValueError(f"{path}: safetensors header of {n} bytes; not a safetensors file?")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def lazy_tensors(path: str) -> dict[str, np.ndarray]:
    """{name: read-only memory-mapped array} of one safetensors file (nothing read yet)."""
    header, start = read_header(path)
    size = os.path.getsize(path)
    out = {}
    for name, info in header.items():
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}; supported: {sorted(_DTYPES)}")
        dtype, shape = _DTYPES[info["dtype"]], tuple(info["shape"])
        begin, end = info["data_offsets"]
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or start + end > size:
            raise ValueError(
                f"{path}: tensor {name!r} ({info['dtype']} {list(shape)}) has inconsistent offsets "
                f"{begin}..{end} (file of {size} bytes)"
            )
        if end == begin:
            out[name] = np.zeros(shape, dtype)
        else:
            out[name] = np.memmap(path, dtype=dtype, mode="r", offset=start + begin, shape=shape)
    return out


def _write_file(path: str, tensors: Iterable[tuple[str, np.ndarray]], metadata: dict) -> None:
    items = [(name, np.asarray(array)) for name, array in tensors]
    header, offset = {}, 0
    for name, array in items:
        if array.dtype not in _NAMES:
            raise ValueError(f"tensor {name!r} has dtype {array.dtype}; safetensors takes {sorted(_NAMES.values())}")
        header[name] = {
            "dtype": _NAMES[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        offset += array.nbytes
    header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data start aligned to 8 bytes, as safetensors writes it
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, array in items:
            f.write(np.ascontiguousarray(array).tobytes())
    os.replace(tmp, path)


def save_tensors(tensors: dict[str, np.ndarray], out_dir: str, *, max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Write `tensors` as model.safetensors, or as model-0000i-of-0000n.safetensors shards of at
    most `max_shard_bytes` each (a tensor larger than that gets a shard of its own) plus
    model.safetensors.index.json, HF's sharded layout. Returns the file names written."""
    shards, current, current_bytes = [], [], 0
    for name, array in tensors.items():
        nbytes = np.asarray(array).nbytes if not hasattr(array, "nbytes") else array.nbytes
        if current and current_bytes + nbytes > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += nbytes
    shards.append(current)
    stale = [os.path.join(out_dir, INDEX_NAME)] if len(shards) == 1 else [os.path.join(out_dir, "model.safetensors")]
    for path in stale:  # a previous save in the other layout would shadow or confuse this one
        if os.path.exists(path):
            os.remove(path)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        _write_file(os.path.join(out_dir, "model.safetensors"), ((n, tensors[n]) for n in shards[0]), metadata)
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map, total = {}, 0
    for file, shard in zip(names, shards):
        _write_file(os.path.join(out_dir, file), ((n, tensors[n]) for n in shard), metadata)
        for n in shard:
            weight_map[n] = file
            total += np.asarray(tensors[n]).nbytes
    with open(os.path.join(out_dir, INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names + [INDEX_NAME]
