"""End-to-end reward-model training: accuracy, resume (SIGKILL/SIGTERM), NaN guard, bad rows, export."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import configs.rm as rm_config
from common.checkpoint import CheckpointManager
from rm.train import train
from tests.rm_data_gen import make_rows, make_tiny_policy, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("rm")
    make_tiny_policy(d)
    return {
        "dir": d,
        "hf": str(d / "hf"),
        "train": write_jsonl(d / "train.jsonl", make_rows(400, 0)),
        "eval": write_jsonl(d / "eval.jsonl", make_rows(100, 1)),
    }


def tiny_config(setup, **train_overrides):
    c = rm_config.get_config("size=tiny")
    c.model.init_from = setup["hf"]
    c.data.train_files = setup["train"]
    c.data.eval_files = setup["eval"]
    for k, v in train_overrides.items():
        setattr(c.train, k, v)
    return c


@pytest.fixture(scope="module")
def trained(setup):
    workdir = str(setup["dir"] / "trained")
    # CPU seconds of this process (robust to other jobs sharing the machine, e.g. pytest -n 2).
    start = time.process_time()
    summary = train(tiny_config(setup), workdir)
    return workdir, summary, time.process_time() - start


def test_learns_rule_quickly(trained):
    workdir, summary, seconds = trained
    assert summary["eval/accuracy"] >= 0.95
    assert seconds < 60
    lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
    assert any("train/loss" in l for l in lines) and any("eval/accuracy" in l for l in lines)
    first_loss = next(l["train/loss"] for l in lines if "train/loss" in l)
    assert first_loss > 0.3 > lines[-2].get("train/loss", lines[-1].get("train/loss", 0))
    for name in ("config.json", "reliability.png", "normalization.json", "model_config.json"):
        assert os.path.exists(os.path.join(workdir, name)), name


def test_normalization_and_score(trained, setup, tmp_path):
    workdir, summary, _ = trained
    out = tmp_path / "scores.jsonl"
    subprocess.run(
        [sys.executable, "-m", "rm.score", "--workdir", workdir, "--data", setup["eval"], "--out", str(out)],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    scores = [json.loads(l) for l in open(out)]
    assert len(scores) == 100
    both = np.array([s["chosen_score"] for s in scores] + [s["rejected_score"] for s in scores])
    # normalize_on='eval': the eval responses' scores have mean 0 and std 1 after normalisation.
    np.testing.assert_allclose([both.mean(), both.std()], [0.0, 1.0], atol=1e-4)
    acc = np.mean([s["chosen_raw"] > s["rejected_raw"] for s in scores])
    assert abs(acc - summary["eval/accuracy"]) < 1e-9


def test_export_matches_pytorch(trained, setup, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    workdir, _, _ = trained
    out = str(tmp_path / "export")
    subprocess.run(
        [sys.executable, "-m", "rm.export", "--workdir", workdir, "--out", out],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    scored = tmp_path / "scores.jsonl"
    subprocess.run(
        [sys.executable, "-m", "rm.score", "--workdir", workdir, "--data", setup["eval"], "--out", str(scored)],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    ours = [json.loads(l) for l in open(scored)]
    rows = [json.loads(l) for l in open(setup["eval"])]
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    offset = json.load(open(os.path.join(out, "config.json")))["reward_offset"]
    for side in ("chosen", "rejected"):
        texts = [r["prompt"] + r[side] for r in rows[:16]]
        enc = tok(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            theirs = model(**enc).logits[:, 0].numpy() + offset
        np.testing.assert_allclose(theirs, [o[f"{side}_score"] for o in ours[:16]], atol=1e-4)


def run_cli(workdir, setup, *extra):
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
        f"--config.data.eval_files={setup['eval']}",
        "--config.train.steps=20",
        "--config.train.save_every=5",
        "--config.train.eval_every=0",
        *extra,
    ]


def final_params(workdir):
    ckpt = CheckpointManager(os.path.join(workdir, "checkpoints"), save_every=1)
    params, extra = ckpt.restore_subtree("params")
    ckpt.close()
    return params, extra


def wait_for(pred, timeout=120):
    start = time.time()
    while time.time() - start < timeout:
        if pred():
            return True
        time.sleep(0.2)
    return False


def _steps(workdir):
    d = os.path.join(workdir, "checkpoints")
    return [int(x) for x in os.listdir(d) if x.isdigit()] if os.path.isdir(d) else []


@pytest.fixture(scope="module")
def reference_run(setup):
    workdir = str(setup["dir"] / "reference")
    subprocess.run(run_cli(workdir, setup), check=True, cwd=ROOT, capture_output=True)
    return final_params(workdir)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_interrupt_and_resume_is_exact(setup, reference_run, sig):
    workdir = str(setup["dir"] / f"interrupted_{int(sig)}")
    proc = subprocess.Popen(run_cli(workdir, setup), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert wait_for(lambda: any(s >= 5 for s in _steps(workdir)) or proc.poll() is not None)
    proc.send_signal(sig)
    out = proc.communicate(timeout=120)[0].decode()
    if sig == signal.SIGTERM:
        # Saved but unfinished: the documented preemption exit code (issue 15; it was 0 before).
        assert proc.returncode == 75 and "SIGTERM" in out, out[-2000:]
        assert max(_steps(workdir)) < 20  # stopped early, with a checkpoint
    else:
        assert proc.returncode == -signal.SIGKILL
    resumed = subprocess.run(run_cli(workdir, setup), check=True, cwd=ROOT, capture_output=True, text=True)
    assert "Resuming from checkpoint" in resumed.stdout
    params, extra = final_params(workdir)
    ref_params, ref_extra = reference_run
    assert extra["step"] == ref_extra["step"] == 20
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, ref_params)
    steps = [json.loads(l)["step"] for l in open(os.path.join(workdir, "metrics.jsonl"))]
    train_steps = [s for s in steps if s > 0]
    assert train_steps == sorted(train_steps)  # no duplicated steps after resume


def test_nan_stops_and_keeps_last_good_checkpoint(setup):
    workdir = str(setup["dir"] / "nan")
    c = tiny_config(setup, steps=40, save_every=10, eval_every=0)
    c.debug.inject_nan_at_step = 24  # the 25th update
    with pytest.raises(FloatingPointError, match=r"train/loss is nan at step 25.*last good checkpoint \(step 20\)"):
        train(c, workdir)
    params, extra = final_params(workdir)
    assert extra["step"] == 20
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_bad_row_error_and_skip(setup):
    bad = setup["dir"] / "bad.jsonl"
    rows = make_rows(40, 5)
    rows[7] = {"prompt": "x", "chosen": None, "rejected": "y"}
    rows[9] = {"prompt": "x", "chosen": " same", "rejected": " same"}
    write_jsonl(bad, rows)
    workdir = str(setup["dir"] / "bad_error")
    cmd = run_cli(workdir, setup)
    cmd = [a if not a.startswith("--config.data.train_files") else f"--config.data.train_files={bad}" for a in cmd]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert res.returncode != 0
    assert f"{bad}: row 7 (0-based): key 'chosen'" in res.stderr
    skip = str(setup["dir"] / "bad_skip")
    cmd = [a.replace(workdir, skip) for a in cmd] + ["--config.data.on_bad_row=skip", "--config.train.steps=2"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    stats = json.load(open(os.path.join(skip, "data_stats.json")))["train"]
    assert stats["pairs"] == 38 and stats["skipped"] == 2
    first = json.loads(open(os.path.join(skip, "metrics.jsonl")).readline())
    assert first["data/train/skipped"] == 2
    assert "skipped" in res.stdout


def test_final_eval_calibration_length_bias_and_interval(trained, setup, tmp_path):
    """eval_final.json carries T, calibrated ECE/Brier, accuracy's bootstrap interval and length bias,
    recomputed here from rm.score's raw rewards; T is in calibration.json, the checkpoint and rm.score."""
    from rm.calibration import calibration_metrics, fit_temperature
    from rm.model import load_reward_model

    workdir, summary, _ = trained
    with open(os.path.join(workdir, "calibration.json")) as f:
        calibration = json.load(f)
    temperature = summary["eval/temperature"]
    assert calibration["temperature"] == temperature and calibration["source"] == "eval"
    assert load_reward_model(workdir).temperature == temperature
    out = tmp_path / "scores.jsonl"
    subprocess.run(
        [sys.executable, "-m", "rm.score", "--workdir", workdir, "--data", setup["eval"], "--out", str(out)],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    scores = [json.loads(l) for l in open(out)]
    chosen = np.array([s["chosen_raw"] for s in scores])
    rejected = np.array([s["rejected_raw"] for s in scores])
    np.testing.assert_allclose(fit_temperature(chosen, rejected), temperature, rtol=1e-4)
    after = calibration_metrics(chosen, rejected, temperature=temperature)
    assert summary["eval/calibrated/ece"] == pytest.approx(after["ece"], abs=1e-5)
    assert summary["eval/calibrated/ece"] <= summary["eval/ece"] + 1e-9
    np.testing.assert_allclose(
        [s["probability"] for s in scores], 1 / (1 + np.exp(-(chosen - rejected) / temperature)), rtol=1e-5, atol=1e-12
    )
    assert summary["eval/accuracy_ci_low"] <= summary["eval/accuracy"] <= summary["eval/accuracy_ci_high"]
    assert -1 <= summary["eval/length/spearman"] <= 1
    assert sum(v for k, v in summary.items() if k.startswith("eval/length/bin/") and k.endswith("/n")) == 100


def test_exported_folder_keeps_calibrated_probabilities(trained, setup, tmp_path):
    """The export records the temperature in the exported score's units (gain * T): the folder's
    probabilities equal the workdir's."""
    from rm.export import export
    from rm.model import load_reward_model

    workdir, summary, _ = trained
    out = export(workdir, str(tmp_path / "hf_rm"))
    source, exported = load_reward_model(workdir), load_reward_model(out)
    assert exported.temperature == pytest.approx(source.gain * summary["eval/temperature"], rel=1e-6)
    raw_a, raw_b = np.array([0.3, -1.2]), np.array([0.1, 0.4])
    np.testing.assert_allclose(
        exported.preference_probability(source.normalize(raw_a), source.normalize(raw_b)),
        source.preference_probability(raw_a, raw_b),
        rtol=1e-6,
    )


def test_mlp_chunk_trains_like_the_whole_sequence(trained, setup, tmp_path):
    """model.mlp_chunk reaches the model (model_config.json) and changes no number beyond float
    rounding: the chunked run's logged losses and final accuracy follow the reference run's."""
    workdir = str(tmp_path / "chunked")
    c = tiny_config(setup)
    c.model.mlp_chunk = 16  # max_length 64: up to 4 chunks per row
    summary = train(c, workdir)
    with open(os.path.join(workdir, "model_config.json")) as f:
        assert json.load(f)["mlp_chunk"] == 16
    ref, got = (
        {
            line["step"]: line["train/loss"]
            for line in map(json.loads, open(os.path.join(w, "metrics.jsonl")))
            if "train/loss" in line
        }
        for w in (trained[0], workdir)
    )
    assert sorted(got) == sorted(ref) and len(got) >= 10, (sorted(got), sorted(ref))
    for step, loss in got.items():
        assert abs(loss - ref[step]) < 1e-4 * max(1.0, abs(ref[step])), (step, loss, ref[step])
    assert summary["eval/accuracy"] == trained[1]["eval/accuracy"]
