"""Runs researchers can trust (issue 15): resume safety, damaged checkpoints, TensorBoard,
provenance, normalisation source and the bf16 reward export, on one tiny RM run."""

import glob
import json
import os
import shutil
import struct
import subprocess

import jax
import numpy as np
import pytest

import configs.rm as rm_config
from common.checkpoint import CheckpointManager
from common.resume import ConfigChanged
from rm.train import train
from tests.rm_data_gen import make_rows, make_tiny_policy, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("trust")
    make_tiny_policy(d)
    return {"dir": d, "hf": str(d / "hf"), "train": write_jsonl(d / "train.jsonl", make_rows(200, 0))}


def tiny(setup, **train_overrides):
    c = rm_config.get_config("size=tiny")
    c.model.init_from = setup["hf"]
    c.data.train_files = setup["train"]
    c.data.eval_files = ""  # normalisation falls back to the train set (and must say so)
    c.train.steps, c.train.save_every, c.train.eval_every, c.train.keep_checkpoints = 30, 10, 0, 3
    for k, v in train_overrides.items():
        setattr(c.train, k, v)
    return c


def final_params(workdir, step=None):
    ckpt = CheckpointManager(os.path.join(workdir, "checkpoints"), save_every=1)
    try:
        return ckpt.restore_subtree("params", step=step)
    finally:
        ckpt.close()


@pytest.fixture(scope="module")
def run(setup):
    workdir = str(setup["dir"] / "run")
    summary = train(tiny(setup), workdir)
    params, extra = final_params(workdir)
    return workdir, summary, params, extra


def _assert_equal_trees(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def read_tensorboard_scalars(logdir):
    """{(tag, step): value} from TensorBoard event files, read with our own TFRecord parser and the
    Event proto (no TensorFlow); a SessionLog START at step s (tensorboardX's purge_step) drops
    earlier events at steps >= s, as TensorBoard does."""
    from tensorboardX.proto import event_pb2

    scalars = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        data = open(path, "rb").read()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                scalars = {k: v for k, v in scalars.items() if k[1] < event.step}
            for value in event.summary.value:
                scalars[(value.tag, event.step)] = value.simple_value
    return scalars


def test_tensorboard_provenance_normalization_and_curves(run):
    workdir, summary, _, extra = run
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    expected = {
        (k, r["step"]): v
        for r in records
        for k, v in r.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
    }
    events = read_tensorboard_scalars(os.path.join(workdir, "tensorboard"))
    assert set(events) == set(expected) and len(expected) > 20
    for key, value in expected.items():
        np.testing.assert_allclose(events[key], value, rtol=1e-6, err_msg=str(key))  # float32 on disk

    prov = json.load(open(os.path.join(workdir, "provenance.json")))
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert prov["git"]["commit"] == head and isinstance(prov["git"]["dirty"], bool)
    assert prov["packages"]["jax"] == jax.__version__ and prov["devices"]["kinds"]
    assert prov["command"] and prov["host"] and prov["start_time"].endswith("+00:00")

    norm = json.load(open(os.path.join(workdir, "normalization.json")))
    assert norm["source"] == "train" and norm["requested"] == "eval"  # no eval files: computed on train
    assert os.path.exists(os.path.join(workdir, "training_curves.png"))
    assert extra["data"]["rows"] == 200 and len(extra["data"]["files"][0]["sha256"]) == 64


def test_truncated_array_file_falls_back_to_previous_checkpoint(run, setup, capsys):
    workdir, _, params30, _ = run
    copy = str(setup["dir"] / "truncated")
    shutil.copytree(workdir, copy)
    data_files = glob.glob(os.path.join(copy, "checkpoints", "30", "state", "ocdbt.process_0", "d", "*"))
    victim = max(data_files, key=os.path.getsize)
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) // 2)
    capsys.readouterr()
    train(tiny(setup), copy)
    out = capsys.readouterr().out
    name = os.path.relpath(victim, os.path.join(copy, "checkpoints", "30"))
    assert f"Checkpoint step 30 in {copy}/checkpoints is damaged ({name} has" in out
    assert "falling back to step 20" in out and "Resuming from checkpoint at step 20" in out
    params, extra = final_params(copy)
    assert extra["step"] == 30
    _assert_equal_trees(params, params30)  # = the uninterrupted run's, continued from step 20
    assert glob.glob(os.path.join(copy, "checkpoints_damaged", "30-*", "DAMAGED.txt"))


def test_changed_config_and_data_stop_the_resume(run, setup):
    workdir, _, _, _ = run
    copy = str(setup["dir"] / "changed")
    shutil.copytree(workdir, copy)
    changed = tiny(setup, learning_rate=0.5)
    with pytest.raises(ConfigChanged, match=r"train\.learning_rate: 0\.001 -> 0\.5") as info:
        train(changed, copy)
    assert "\n" not in str(info.value) and "--allow_config_change" in str(info.value)
    assert json.load(open(os.path.join(copy, "config.json")))["train"]["learning_rate"] == 0.001  # untouched

    allowed = tiny(setup, learning_rate=0.5, steps=32)
    allowed.runtime.allow_config_change = True
    summary = train(allowed, copy)
    assert summary["step"] == 32
    history = [json.loads(line) for line in open(os.path.join(copy, "config_history.jsonl"))]
    assert history[0]["step"] == 30 and history[0]["forced"] == ["train.learning_rate"]
    assert history[0]["changes"]["train.learning_rate"] == {"old": 0.001, "new": 0.5}
    assert history[0]["changes"]["train.steps"] == {"old": 30, "new": 32}
    assert history[0]["changes"]["runtime.allow_config_change"] == {"old": False, "new": True}

    original = open(setup["train"]).read()
    try:  # same path, same number of rows, one row rewritten: the content hash tells
        lines = original.splitlines()
        lines[3] = json.dumps({"prompt": "Review: the film", "chosen": " great", "rejected": " dull"})
        open(setup["train"], "w").write("\n".join(lines) + "\n")
        with pytest.raises(ConfigChanged, match=r"data\.identity\.files\[0\]\.sha256: \"[0-9a-f]{64}\" -> "):
            train(_same(allowed), copy)
    finally:
        open(setup["train"], "w").write(original)


def _same(config):
    c = config
    c.runtime.allow_config_change = False
    return c


def test_bf16_reward_export_loads_in_transformers(run, tmp_path):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rm.export import export

    workdir = run[0]
    full, half = export(workdir, str(tmp_path / "f32")), export(workdir, str(tmp_path / "bf16"), dtype="bfloat16")
    tok = AutoTokenizer.from_pretrained(full)
    rows = make_rows(8, 3)
    enc = tok([r["prompt"] + r["chosen"] for r in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = AutoModelForSequenceClassification.from_pretrained(full).eval()(**enc).logits[:, 0]
        model = AutoModelForSequenceClassification.from_pretrained(half).eval()
        assert model.dtype == torch.bfloat16
        got = model(**enc).logits[:, 0].float()
    err = (got - ref).abs().max().item()
    assert 0 < err < 0.05 * max(ref.abs().max().item(), 1.0), (err, ref)
