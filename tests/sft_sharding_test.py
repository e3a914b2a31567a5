"""SFT under (data, model) meshes of fake CPU devices gives the losses and weights of one device.

The SFT trainer itself (`sft.train.train`, from scratch on the built-in review world, with
gradient accumulation and FSDP + tensor-parallel sharding from `models.sharding.DEFAULT_RULES`)
runs in two subprocesses (this file as a script): one with a single CPU device, the reference,
and one with XLA_FLAGS=--xla_force_host_platform_device_count=8 that trains the same config under
meshes (1, 8), (2, 4) and (8, 1). Each run writes metrics.jsonl and its exported Hugging Face
safetensors; the test compares every logged train/eval loss and every exported weight. The
extra XLA flags (no LLVM optimisation, no CPU fusion emitters) cut compile time; both
subprocesses use them, so the only difference between the runs is the device layout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

MESHES = [(1, 8), (2, 4), (8, 1)]  # (data, model)
STEPS = 6
TOL = 2e-5
FAST_COMPILE = (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false"
)


def _run_worker(devices: int, out_dir: str, meshes) -> None:
    flags = f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip(),
    )
    arg = ";".join(f"{d}x{m}" for d, m in meshes)
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--worker", out_dir, arg],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _losses(workdir):
    train, evals = {}, {}
    for line in open(os.path.join(workdir, "metrics.jsonl")):
        m = json.loads(line)
        if "train/loss" in m:
            train[m["step"]] = m["train/loss"]
        if "eval/loss" in m:
            evals[m["step"]] = m["eval/loss"]
    return train, evals


def _weights(workdir):
    from safetensors.numpy import load_file

    out = {}
    for name in sorted(os.listdir(os.path.join(workdir, "hf"))):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(workdir, "hf", name)))
    return out


def test_sft_meshes_match_one_device(tmp_path):
    t0 = time.time()
    _run_worker(1, str(tmp_path), [(1, 1)])
    _run_worker(8, str(tmp_path), MESHES)
    print(f"SFT sharding workers: {time.time() - t0:.1f}s")
    ref_train, ref_eval = _losses(str(tmp_path / "1x1"))
    ref_w = _weights(str(tmp_path / "1x1"))
    assert sorted(ref_train) == list(range(1, STEPS + 1)) and sorted(ref_eval) == [0, 3, 6]
    assert ref_eval[6] < ref_eval[0] - 0.1  # it trains (6 steps: 5.99 -> 5.76 nats)
    for d, m in MESHES:
        name = f"{d}x{m}"
        train, evals = _losses(str(tmp_path / name))
        assert sorted(train) == sorted(ref_train) and sorted(evals) == sorted(ref_eval), name
        np.testing.assert_allclose(
            [train[s] for s in sorted(train)], [ref_train[s] for s in sorted(train)], rtol=0, atol=TOL, err_msg=name
        )
        np.testing.assert_allclose(
            [evals[s] for s in sorted(evals)], [ref_eval[s] for s in sorted(evals)], rtol=0, atol=TOL, err_msg=name
        )
        weights = _weights(str(tmp_path / name))
        assert set(weights) == set(ref_w), name
        for key, ref in ref_w.items():
            np.testing.assert_allclose(weights[key], ref, rtol=0, atol=TOL, err_msg=f"{name} {key}")


# ----------------------------------------------------------------------------- subprocess


def _worker(out_dir: str, meshes: str) -> None:
    import jax

    import configs.sft as sft_config
    from sft.train import train
    from tasks.reviews import ReviewWorld, train_tokenizer, write_corpus_jsonl

    world = ReviewWorld(0)
    data_dir = os.path.join(out_dir, f"data_{jax.device_count()}")
    tok = train_tokenizer(world.corpus(300, 1), os.path.join(data_dir, "tok"), vocab_size=400)
    train_file, eval_file = os.path.join(data_dir, "train.jsonl"), os.path.join(data_dir, "eval.jsonl")
    write_corpus_jsonl(train_file, 200, 2, world=world)
    write_corpus_jsonl(eval_file, 32, 3, world=world)
    for spec in meshes.split(";"):
        shape = tuple(int(x) for x in spec.split("x"))
        c = sft_config.get_config("size=tiny")
        c.model.tokenizer, c.data.train_files, c.data.eval_files = tok, train_file, eval_file
        c.model.family, c.model.n_kv_heads = "llama", 2  # RMSNorm, RoPE, GQA: 4 query heads over 2 kv heads
        c.model.d_model, c.model.d_ff, c.data.max_length = 32, 64, 48
        c.train.steps, c.train.batch_size, c.train.grad_accum_steps = STEPS, 16, 2
        c.train.log_every, c.train.eval_every, c.train.save_every, c.train.warmup_steps = 1, 3, 3, 1
        c.eval.batch_size = 16
        c.mesh.shape = shape
        train(c, os.path.join(out_dir, spec))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit("usage: sft_sharding_test.py --worker OUT_DIR MESHES")
