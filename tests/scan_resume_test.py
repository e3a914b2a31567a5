"""A stacked (`model.scan_layers=True`) reward-model run killed with SIGKILL mid-run and rerun ends
bit-identical to an uninterrupted one: final params (stacked leaves) and every step's metrics."""

import json
import os
import signal
import subprocess

import jax
import numpy as np
import pytest

from tests.rm_data_gen import make_rows, make_tiny_policy, write_jsonl
from tests.rm_train_test import ROOT, _steps, final_params, run_cli, wait_for

STEPS = ("--config.train.steps=12", "--config.train.save_every=3", "--config.model.scan_layers=True")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("rm_scan")
    make_tiny_policy(d)
    return {
        "dir": d,
        "hf": str(d / "hf"),
        "train": write_jsonl(d / "train.jsonl", make_rows(200, 0)),
        "eval": write_jsonl(d / "eval.jsonl", make_rows(32, 1)),
    }


def _train_losses(workdir):
    """{step: train/loss} of metrics.jsonl (a step logged twice keeps its last line)."""
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_stacked_run_sigkill_and_resume_is_exact(setup):
    reference = str(setup["dir"] / "reference")
    subprocess.run(run_cli(reference, setup, *STEPS), check=True, cwd=ROOT, capture_output=True)
    workdir = str(setup["dir"] / "killed")
    proc = subprocess.Popen(run_cli(workdir, setup, *STEPS), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert wait_for(lambda: any(s >= 3 for s in _steps(workdir)) or proc.poll() is not None, timeout=300)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-run"
    assert max(_steps(workdir)) < 12
    resumed = subprocess.run(run_cli(workdir, setup, *STEPS), check=True, cwd=ROOT, capture_output=True, text=True)
    assert "Resuming from checkpoint" in resumed.stdout
    params, extra = final_params(workdir)
    ref_params, ref_extra = final_params(reference)
    assert extra["step"] == ref_extra["step"] == 12
    assert "layers_stacked" in params["backbone"]  # the checkpoint holds the stacked tree
    assert jax.tree.structure(params) == jax.tree.structure(ref_params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, ref_params)
    ours, ref = _train_losses(workdir), _train_losses(reference)
    assert ref and ours == ref, (ours, ref)  # the same losses, bit for bit (JSON floats round-trip exactly)
