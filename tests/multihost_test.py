"""Multi-process runs on JAX's distributed runtime (CPU, gloo collectives).

The end-to-end test starts the reward-model trainer as 2 processes x 2 fake CPU devices
on localhost and as 1 process x 4 fake devices, with the same config, and checks that
the two runs log the same losses step by step, that metrics.jsonl is written once, and
that both leave the same final checkpoint. Unit tests cover the settings resolution and
the per-process batch slicing.
"""

import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from common import distributed
from common import mesh as mesh_lib
from common.checkpoint import CheckpointManager
from tests.rm_data_gen import make_rows, make_tiny_policy, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6


# ----------------------------------------------------------------------------- unit tests


def test_resolve_settings_sources():
    # Nothing set: a plain single-process run, and initialize starts nothing.
    assert distributed.resolve_settings(None, environ={}) is None
    assert distributed.initialize(None, environ={}) is False and jax.process_count() == 1
    assert (
        distributed.resolve_settings(
            {"coordinator_address": "", "num_processes": 0, "process_id": -1, "auto": False}, environ={}
        )
        is None
    )
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed.resolve_settings(None, environ=env) == {
        "coordinator_address": "10.0.0.1:1234",
        "num_processes": 4,
        "process_id": 3,
        "auto": False,
    }
    # Config values win over the environment, field by field.
    section = {"coordinator_address": "host:9", "num_processes": 0, "process_id": 1, "auto": False}
    assert distributed.resolve_settings(section, environ=env) == {
        "coordinator_address": "host:9",
        "num_processes": 4,
        "process_id": 1,
        "auto": False,
    }
    # auto=True with nothing else: everything is left to cluster detection.
    assert distributed.resolve_settings({"auto": True}, environ={}) == {
        "coordinator_address": None,
        "num_processes": None,
        "process_id": None,
        "auto": True,
    }


@pytest.mark.parametrize(
    "section, env, match",
    [
        ({"num_processes": 2, "process_id": 1}, {}, "no coordinator"),
        ({}, {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, "process_id=2"),
        ({}, {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two"}, "JAX_NUM_PROCESSES"),
        ({"coordinator_address": "nohostport", "num_processes": 2, "process_id": 0}, {}, "HOST:PORT"),
    ],
)
def test_resolve_settings_errors(section, env, match):
    with pytest.raises(ValueError, match=match):
        distributed.resolve_settings(section, environ=env)


def test_local_rows_equal_shares(monkeypatch):
    batch = {"ids": np.arange(24).reshape(12, 2), "w": np.arange(12.0)}
    assert mesh_lib.local_rows(batch) is batch  # one process: unchanged
    monkeypatch.setattr(jax, "process_count", lambda: 3)
    for pid in range(3):
        monkeypatch.setattr(jax, "process_index", lambda pid=pid: pid)
        rows = mesh_lib.local_rows(batch)
        np.testing.assert_array_equal(rows["w"], np.arange(12.0)[4 * pid : 4 * pid + 4])
        np.testing.assert_array_equal(rows["ids"], np.arange(24).reshape(12, 2)[4 * pid : 4 * pid + 4])
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        mesh_lib.local_rows({"ids": np.zeros((10, 2))})
    with pytest.raises(ValueError, match="same leading batch dimension"):
        mesh_lib.local_rows({"a": np.zeros((12, 2)), "b": np.zeros((6,))})


# ----------------------------------------------------------------------------- end to end


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("multihost")
    make_tiny_policy(d)
    return {"dir": d, "hf": str(d / "hf"), "train": write_jsonl(d / "train.jsonl", make_rows(96, 0))}


def _command(setup, workdir):
    return [
        sys.executable,
        "-m",
        "experiments.run",
        "--config",
        "configs/rm.py:size=tiny",
        "--workdir",
        workdir,
        f"--config.model.init_from={setup['hf']}",
        f"--config.data.train_files={setup['train']}",
        f"--config.train.steps={STEPS}",
        "--config.train.log_every=1",
        "--config.train.eval_every=0",
        "--config.train.save_every=3",
        "--config.eval.batch_size=48",
    ]


def _env(devices: int, **extra) -> dict:
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        **extra,
    )
    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        if key not in extra:
            env.pop(key, None)
    return env


def _run_all(commands_envs, timeout=400):
    """Runs the processes together; on any failure (or timeout) kills the rest and shows the logs."""
    procs = [
        subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for cmd, env in commands_envs
    ]
    deadline = time.time() + timeout
    try:
        while any(p.poll() is None for p in procs):
            if time.time() > deadline or any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    logs = [p.communicate()[0] for p in procs]
    if any(p.returncode != 0 for p in procs):
        shown = "\n".join(
            f"--- process {i} (rc {p.returncode}):\n{log[-3000:]}" for i, (p, log) in enumerate(zip(procs, logs))
        )
        pytest.fail(f"trainer processes failed:\n{shown}")
    return logs


@pytest.fixture(scope="module")
def runs(setup):
    multi, single = str(setup["dir"] / "multi"), str(setup["dir"] / "single")
    port = _free_port()
    t0 = time.time()
    # All three processes at once (they mostly compile, single-threaded): the two of the
    # distributed run, and the single-process reference with 4 devices.
    _run_all(
        [
            (
                _command(setup, multi),
                _env(2, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i)),
            )
            for i in range(2)
        ]
        + [(_command(setup, single), _env(4))]
    )
    print(f"2-process and 1-process runs together: {time.time() - t0:.1f}s")
    return multi, single


def _lines(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


# One test on the runs, not several: under pytest-xdist (-n 2) tests of a module may land on
# different workers, and each would repeat the module fixture's runs.
def test_two_processes_match_one(runs):
    multi, single = runs
    _check_metrics(multi, single)
    _check_checkpoints_and_outputs(multi, single)


def _check_metrics(multi, single):
    multi_lines, single_lines = _lines(multi), _lines(single)
    # Written once: exactly the single-process lines (data stats at step 0, one train line per step).
    assert [l["step"] for l in multi_lines] == [l["step"] for l in single_lines] == list(range(STEPS + 1))
    assert [sorted(l) for l in multi_lines] == [sorted(l) for l in single_lines]
    multi_loss = [l["train/loss"] for l in multi_lines[1:]]
    single_loss = [l["train/loss"] for l in single_lines[1:]]
    np.testing.assert_allclose(multi_loss, single_loss, rtol=0, atol=1e-5)
    assert np.ptp(single_loss) > 1e-3  # the model is actually training, so matching is not trivial
    for key in ("train/accuracy", "train/grad_norm"):
        np.testing.assert_allclose(
            [l[key] for l in multi_lines[1:]], [l[key] for l in single_lines[1:]], rtol=0, atol=1e-5
        )
    assert multi_lines[0] == single_lines[0]


def _check_checkpoints_and_outputs(multi, single):
    params = {}
    for name, workdir in (("multi", multi), ("single", single)):
        ckpt = CheckpointManager(os.path.join(workdir, "checkpoints"), save_every=1)
        try:
            assert ckpt.all_steps() == [3, STEPS]
            params[name], extra = ckpt.restore_subtree("params")
        finally:
            ckpt.close()
        assert extra["step"] == STEPS and "normalization" in extra
        for name_ in (
            "config.json",
            "model_config.json",
            "data_stats.json",
            "normalization.json",
            "eval_final.json",
            "tokenizer",
        ):
            assert os.path.exists(os.path.join(workdir, name_)), (workdir, name_)
    multi_flat, single_flat = (
        np.concatenate([np.ravel(x) for x in jax.tree.leaves(params[k])]) for k in ("multi", "single")
    )
    diff = np.abs(multi_flat - single_flat)
    # Adam's step lr * m / sqrt(v) is ~lr even for a gradient that is zero up to rounding (the
    # head bias, k_proj biases, final-norm bias along the head: Bradley-Terry and softmax are
    # blind to them), so reduction-order rounding moves those few by up to ~lr (1e-3) apart;
    # every other parameter agrees to 1e-5.
    assert np.mean(diff > 1e-5) < 1e-3, np.mean(diff > 1e-5)
    assert diff.max() <= 2e-3, diff.max()
    with open(os.path.join(multi, "normalization.json")) as f, open(os.path.join(single, "normalization.json")) as g:
        m, s = json.load(f), json.load(g)
    np.testing.assert_allclose(m["gain"], s["gain"], rtol=1e-4)
    # The bias absorbs the reward offset, which those gradient-free parameters shift (~steps * lr).
    np.testing.assert_allclose(m["bias"], s["bias"], atol=0.05)
