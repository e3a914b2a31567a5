"""The command line of issue 15: one-line errors with exit codes, typo suggestions,
--print_config, --dry_run, and the sweep treating a preempted point as unfinished."""

import csv
import os
import subprocess
import sys
import textwrap

from tests.rm_data_gen import make_rows, make_tiny_policy, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, env=None, module="experiments.run"):
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env
    )


def test_config_typo_names_the_closest_keys_in_one_line():
    res = _run("--config", "configs/rm.py:size=tiny", "--workdir", "/tmp/unused", "--config.train.step=5")
    assert res.returncode == 2
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "unknown config key train.step in ['--config.train.step']" in res.stderr
    assert "'train.steps'" in res.stderr


def test_print_config_shows_overrides_and_exits():
    res = _run("--config", "configs/rm.py:size=tiny", "--config.train.learning_rate=0.5", "--print_config")
    assert res.returncode == 0, res.stderr
    assert "learning_rate: 0.5" in res.stdout and "trainer: rm" in res.stdout


def test_user_error_is_one_line_with_exit_code_2(tmp_path):
    workdir = tmp_path / "w"
    res = _run(
        "--config",
        "configs/rm.py:size=tiny",
        "--workdir",
        str(workdir),
        "--config.model.init_from=/no/such/model",
        f"--config.data.train_files={tmp_path}/x.jsonl",
    )
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    first = res.stderr.strip().splitlines()[0]
    assert first == ("experiments.run: error: config.model.init_from='/no/such/model': /no/such/model does not exist")
    assert not workdir.exists()
    debug = _run(
        "--config",
        "configs/rm.py:size=tiny",
        "--workdir",
        str(workdir),
        "--debug",
        "--config.model.init_from=/no/such/model",
    )
    assert "Traceback" in debug.stderr and debug.returncode == 1


def test_dry_run_prints_sizes_and_leaves_the_workdir_alone(tmp_path):
    hf = make_tiny_policy(tmp_path)
    data = write_jsonl(tmp_path / "train.jsonl", make_rows(40, 0))
    workdir = tmp_path / "w"
    res = _run(
        "--config",
        "configs/rm.py:size=tiny",
        "--workdir",
        str(workdir),
        f"--config.model.init_from={hf}",
        f"--config.data.train_files={data}",
        "--dry_run",
    )
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    assert "trainable" in out and "parameters" in out and "memory (resident state" in out
    assert "data train: rows 40, pairs 40" in out and "dry run: done" in out
    assert not workdir.exists()


TRAINER = """
import os

def train(config, workdir):
    os.makedirs(workdir, exist_ok=True)
    if os.path.exists(config.flag):  # the first attempt is "preempted" after saving
        os.remove(config.flag)
        return {"preempted_at": 3}
    open(os.path.join(workdir, "eval_final.json"), "w").write('{"done": 1}')
"""

CONFIG = """
import ml_collections

def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.trainer = "preempttrainer.trainer"
    c.x = 0
    c.flag = {flag!r}
    return c
"""


def test_sweep_treats_a_preempted_point_as_unfinished(tmp_path):
    pkg = tmp_path / "preempttrainer"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "trainer.py").write_text(textwrap.dedent(TRAINER))
    flag = tmp_path / "flag"
    flag.write_text("")
    config = tmp_path / "cfg.py"
    config.write_text(CONFIG.format(flag=str(flag)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]))
    root = tmp_path / "root"
    args = ["--config", str(config), "--workdir", str(root), "--sweep", "x=1", "--quiet"]
    first = _run(*args, env=env, module="experiments.sweep")
    assert first.returncode != 0 and "preempted (exit 75)" in first.stderr
    rows = list(csv.DictReader(open(root / "summary.csv")))
    assert rows[0]["status"] == "preempted" and not (root / "x=1" / "SWEEP_DONE").exists()
    second = _run(*args, env=env, module="experiments.sweep")
    assert second.returncode == 0, second.stderr
    assert list(csv.DictReader(open(root / "summary.csv")))[0]["status"] == "ok"
