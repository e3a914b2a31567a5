"""Checkpoint I/O at real size (models/hf.py, models/safetensors_io.py): bf16 folders in and
out, sharded index folders in and out, and loading straight onto a mesh of 8 fake devices
(each device receives only its shard)."""

import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _torch_state(model):
    return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def test_bf16_folder_loads_as_bf16_and_saves_as_bf16(tmp_path):
    import torch
    import transformers

    from models.hf import load_hf_checkpoint, save_hf_checkpoint
    from models.safetensors_io import read_header
    from tests.hf_fixtures import make_tiny_hf_model

    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    model = make_tiny_hf_model("llama", src, d=32, layers=1)
    model.to(torch.bfloat16).save_pretrained(src)  # a bf16 folder, as published checkpoints are
    header, _ = read_header(os.path.join(src, "model.safetensors"))
    assert {v["dtype"] for v in header.values()} == {"BF16"}

    config, params = load_hf_checkpoint(src)
    assert config.param_dtype == "bfloat16"
    assert str(params["embed"]["embedding"].dtype) == "bfloat16"
    want = _torch_state(model.to(torch.bfloat16))
    np.testing.assert_array_equal(
        np.asarray(params["layers_0"]["attn"]["q_proj"]["kernel"], np.float32),
        want["model.layers.0.self_attn.q_proj.weight"].T,
    )

    save_hf_checkpoint(config, params, out)
    header, _ = read_header(os.path.join(out, "model.safetensors"))
    assert {v["dtype"] for v in header.values()} == {"BF16"}
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.dtype == torch.bfloat16
    got = _torch_state(reloaded)
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    # Asked for float32, it loads as float32 with the same values.
    config32, params32 = load_hf_checkpoint(out, param_dtype="float32")
    assert config32.param_dtype == "float32" and params32["embed"]["embedding"].dtype == np.float32
    np.testing.assert_array_equal(params32["embed"]["embedding"], want["model.embed_tokens.weight"])


def test_sharded_index_folder_in_and_out(tmp_path):
    import transformers

    from models.hf import load_hf_checkpoint, save_hf_checkpoint
    from tests.hf_fixtures import make_tiny_hf_model

    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    model = make_tiny_hf_model("qwen2", src, d=32, layers=2)
    config, params = load_hf_checkpoint(src)
    save_hf_checkpoint(config, params, out, max_shard_bytes=20_000)
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not os.path.exists(os.path.join(out, "model.safetensors"))
    assert all(os.path.getsize(os.path.join(out, f)) < 20_000 + 8192 for f in files)
    # transformers reads our shards, and we read them back.
    got = _torch_state(transformers.AutoModelForCausalLM.from_pretrained(out))
    for name, value in _torch_state(model).items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)
    _, params2 = load_hf_checkpoint(out)
    np.testing.assert_array_equal(
        params2["layers_1"]["mlp"]["down_proj"]["kernel"], params["layers_1"]["mlp"]["down_proj"]["kernel"]
    )


def _worker(folder):
    import jax

    from common.mesh import make_mesh
    from models.hf import load_hf_checkpoint, read_hf_folder

    mesh = make_mesh((2, 4), ("data", "model"))
    _, params = load_hf_checkpoint(folder, mesh=mesh)
    _, tensors = read_hf_folder(folder)
    full = {
        "embed/embedding": tensors["model.embed_tokens.weight"],
        "layers_0/attn/q_proj/kernel": tensors["model.layers.0.self_attn.q_proj.weight"].T,
        "layers_1/mlp/down_proj/kernel": tensors["model.layers.1.mlp.down_proj.weight"].T,
        "final_norm/scale": tensors["model.norm.weight"],
    }
    report = {"devices": jax.device_count()}
    for path, want in full.items():
        array = params
        for key in path.split("/"):
            array = array[key]
        shards = array.addressable_shards
        report[path] = {
            "global": list(array.shape),
            "spec": [str(s) for s in array.sharding.spec],
            "devices": sorted(s.device.id for s in shards),
            "shard_shapes": sorted({tuple(s.data.shape) for s in shards}),
            "shards_match": all(np.array_equal(np.asarray(s.data), np.asarray(want)[s.index]) for s in shards),
            "on_one_device": all(len(s.data.devices()) == 1 for s in shards),
        }
    print(json.dumps(report))


def test_load_onto_8_device_mesh_places_each_shard(tmp_path):
    from tests.hf_fixtures import make_tiny_hf_model

    folder = str(tmp_path / "llama")
    make_tiny_hf_model("llama", folder, d=64, layers=2, vocab_size=128)
    from tests.worker import run_worker

    report = run_worker(
        __file__, xla_flags="--xla_force_host_platform_device_count=8", args=("--worker", folder), timeout=300
    )
    assert report["devices"] == 8
    # vocab on 'model' (4), embed on 'data' (2): each device holds a [128/4, 64/2] block.
    assert report["embed/embedding"]["shard_shapes"] == [[32, 32]]
    assert report["layers_0/attn/q_proj/kernel"]["shard_shapes"] == [[32, 16]]  # [d/2, 64/4]
    assert report["layers_1/mlp/down_proj/kernel"]["shard_shapes"] == [[32, 32]]  # [128/4, d/2]
    assert report["final_norm/scale"]["shard_shapes"] == [[64]]  # replicated
    for path, r in report.items():
        if path != "devices":
            assert r["devices"] == list(range(8)) and r["shards_match"] and r["on_one_device"], (path, r)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker(sys.argv[2])
