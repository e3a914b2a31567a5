"""A stacked (`model.scan_layers=True`) reward-model run that lost everything after its step-6
checkpoint (as if killed there) resumes and ends bit-identical to the uninterrupted run: final params
(stacked leaves) and every step's train loss. In process, to stay cheap: tests/rm_train_test.py
covers the SIGKILL / SIGTERM mechanics of the same checkpoint path on the unrolled tree."""

import json
import os
import shutil

import jax
import numpy as np

from rm.train import train
from tests.rm_data_gen import make_rows, make_tiny_policy, write_jsonl
from tests.rm_train_test import final_params, tiny_config


def _train_losses(workdir):
    """{step: train/loss} of metrics.jsonl (a step logged twice keeps its last line)."""
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_stacked_run_resumes_exactly(tmp_path, capsys):
    make_tiny_policy(tmp_path)
    setup = {
        "hf": str(tmp_path / "hf"),
        "train": write_jsonl(tmp_path / "train.jsonl", make_rows(200, 0)),
        "eval": write_jsonl(tmp_path / "eval.jsonl", make_rows(32, 1)),
    }
    config = tiny_config(setup, steps=12, save_every=6, eval_every=0, log_every=2)
    config.model.scan_layers = True
    reference = str(tmp_path / "reference")
    train(config, reference)
    killed = str(tmp_path / "killed")
    shutil.copytree(reference, killed)
    shutil.rmtree(os.path.join(killed, "checkpoints", "12"))
    with open(os.path.join(killed, "metrics.jsonl")) as f:  # what the killed run had written by step 6
        kept = [line for line in f if json.loads(line)["step"] <= 6]
    with open(os.path.join(killed, "metrics.jsonl"), "w") as f:
        f.writelines(kept)
    capsys.readouterr()
    train(config, killed)
    assert "Resuming from checkpoint at step 6" in capsys.readouterr().out
    params, extra = final_params(killed)
    ref_params, ref_extra = final_params(reference)
    assert extra["step"] == ref_extra["step"] == 12
    assert "layers_stacked" in params["backbone"]  # the checkpoint holds the stacked tree
    assert jax.tree.structure(params) == jax.tree.structure(ref_params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, ref_params)
    ours, ref = _train_losses(killed), _train_losses(reference)
    assert sorted(ref) == [2, 4, 6, 8, 10, 12] and ours == ref, (ours, ref)
