"""Tests of experiments/sweep.py on a tiny trainer (no JAX in the runs): grid, table, skip, errors."""

import csv
import json
import os
import subprocess
import sys
import textwrap

import pytest

from experiments import sweep

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TRAINER = """
import json, os, sys

def train(config, workdir):
  os.makedirs(workdir, exist_ok=True)
  with open(config.count_file, 'a') as f:  # one line per invocation
    f.write(os.path.basename(workdir) + '\\n')
  print('training x =', config.x, 'lr =', config.optim.lr, flush=True)
  if config.x == config.fail_x and os.path.exists(config.fail_flag):
    sys.exit(3)
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
    f.write(json.dumps({'step': 0, 'train/loss': 100.0, 'first_only': 1.0}) + '\\n')
    f.write(json.dumps({'step': 5, 'train/loss': config.x * config.optim.lr}) + '\\n')
    if config.x == 1:
      f.write(json.dumps({'step': 5, 'only_x1': 'yes'}) + '\\n')
  with open(os.path.join(workdir, 'eval_final.json'), 'w') as f:
    json.dump({'eval': {'accuracy': config.x / 10, 'name': config.name}}, f)
"""

CONFIG = """
import ml_collections

def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.trainer = 'sweeptrainer.trainer'
  c.x = 0  # swept int
  c.name = 'a'  # str
  c.flag = False  # bool
  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 0.1  # float
  c.count_file = {count!r}
  c.fail_x = -1  # this x exits 3 while fail_flag exists
  c.fail_flag = {flag!r}
  if arg == 'big':
    c.optim.lr = 10.0
  return c
"""


@pytest.fixture
def setup(tmp_path):
    pkg = tmp_path / "sweeptrainer"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "trainer.py").write_text(textwrap.dedent(TRAINER))
    config = tmp_path / "cfg.py"
    config.write_text(CONFIG.format(count=str(tmp_path / "count.txt"), flag=str(tmp_path / "fail.flag")))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), REPO]))
    return tmp_path, str(config), env


def _invocations(tmp_path):
    path = tmp_path / "count.txt"
    return path.read_text().split() if path.exists() else []


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _sweep(env, *args):
    return subprocess.run(
        [sys.executable, "-m", "experiments.sweep", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_grid_summary_and_skip(setup, capsys, monkeypatch):
    tmp_path, config, env = setup
    root = tmp_path / "root"
    args = ["--config", config + ":big", "--workdir", str(root), "--sweep", "x=1,2", "--set", "name=b", "--quiet"]
    result = _sweep(env, *args)
    assert result.returncode == 0, result.stderr + result.stdout
    assert sorted(_invocations(tmp_path)) == ["x=1", "x=2"]
    for x in (1, 2):
        sub = root / f"x={x}"
        assert (sub / "SWEEP_DONE").read_text().strip() == "0"
        assert f"training x = {x} lr = 10.0" in (sub / "sweep.log").read_text()
        record = json.loads((sub / "sweep_point.json").read_text())
        assert record["overrides"] == [f"--config.x={x}", "--config.name=b"]

    rows = _read_csv(root / "summary.csv")
    header = list(rows[0])
    assert header[:3] == ["x", "status", "run"]
    assert header[3:] == sorted(["step", "train/loss", "first_only", "only_x1", "eval/accuracy", "eval/name"])
    assert [r["x"] for r in rows] == ["1", "2"]
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert [float(r["train/loss"]) for r in rows] == [10.0, 20.0]  # last value, x * lr
    assert [float(r["eval/accuracy"]) for r in rows] == [0.1, 0.2]
    assert [r["eval/name"] for r in rows] == ["b", "b"]
    assert [r["step"] for r in rows] == ["5", "5"]
    assert [r["first_only"] for r in rows] == ["1.0", "1.0"]  # last value, even from early lines
    assert [r["only_x1"] for r in rows] == ["yes", ""]  # missing -> blank
    md = (root / "summary.md").read_text().splitlines()
    table = [line for line in md if line.startswith("|")]
    assert table[0] == "| " + " | ".join(header) + " |"
    cells = [line.strip("|").split("|") for line in table[2:]]
    assert [c[0].strip() for c in cells] == ["1", "2"]
    assert [c[header.index("train/loss")].strip() for c in cells] == ["10", "20"]
    assert [c[header.index("only_x1")].strip() for c in cells] == ["yes", ""]
    assert "with name=b" in md[0]

    # Re-running skips finished points: no new invocations, same table. (In-process from here on:
    # each CLI start pays for importing JAX, which reading metrics needs.)
    monkeypatch.setenv("PYTHONPATH", env["PYTHONPATH"])
    capsys.readouterr()
    assert sweep.main(args) == 0
    assert capsys.readouterr().out.count("done, skipped") == 2
    assert len(_invocations(tmp_path)) == 2
    assert _read_csv(root / "summary.csv") == rows

    # A changed fixed override for existing points is refused before anything runs.
    assert sweep.main([a if a != "name=b" else "name=c" for a in args]) == 2
    assert "different command" in capsys.readouterr().err
    assert len(_invocations(tmp_path)) == 2


def test_failed_point_reported_and_retried(setup, capsys, monkeypatch):
    tmp_path, config, _ = setup
    (tmp_path / "fail.flag").write_text("")
    root = tmp_path / "root"
    argv = ["--config", config, "--workdir", str(root), "--sweep", "x=1,2", "--sweep", "flag=true", "--set", "fail_x=2"]
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the sweep adds the repo for its runs
    assert sweep.main(argv) == 1
    assert [r["status"] for r in _read_csv(root / "summary.csv")] == ["ok", "failed (exit 3)"]
    assert not (root / "x=2,flag=true" / "SWEEP_DONE").exists()
    assert "failed with exit code 3" in capsys.readouterr().err
    # Re-run: x=1 is skipped, x=2 is retried (fails again), then succeeds once the flag is gone.
    assert sweep.main(argv) == 1
    assert _invocations(tmp_path) == ["x=1,flag=true", "x=2,flag=true", "x=2,flag=true"]
    os.remove(tmp_path / "fail.flag")
    assert sweep.main(argv) == 0
    assert _invocations(tmp_path) == ["x=1,flag=true"] + ["x=2,flag=true"] * 3
    rows = _read_csv(root / "summary.csv")
    assert [(r["x"], r["flag"], r["status"], r["train/loss"]) for r in rows] == [
        ("1", "True", "ok", "0.1"),
        ("2", "True", "ok", "0.2"),
    ]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sweep", "nope=1,2"], "Unknown config key 'nope'"),
        (["--sweep", "optim.lrr=1,2"], "Did you mean ['optim.lr']"),
        (["--sweep", "optim=1,2"], "is a section"),
        (["--sweep", "x=1,abc"], "cannot parse 'abc' as a int"),
        (["--sweep", "flag=true,maybe"], "'maybe'"),
        (["--sweep", "x=1,2", "--set", "missing=3"], "Unknown config key 'missing'"),
        (["--sweep", "x=1,2", "--set", "x=3"], "both swept"),
        (["--sweep", "x=1,1"], "repeated"),
        (["--sweep", "x"], "expected KEY=VALUES"),
        ([], "at least one --sweep"),
    ],
)
def test_bad_arguments_fail_before_running(setup, capsys, args, message):
    tmp_path, config, _ = setup
    root = tmp_path / "root"
    assert sweep.main(["--config", config, "--workdir", str(root), *args]) == 2
    assert message in capsys.readouterr().err
    assert not root.exists() and _invocations(tmp_path) == []


def test_unknown_key_cli_and_dry_run(setup):
    tmp_path, config, env = setup
    root = tmp_path / "root"
    result = _sweep(env, "--config", config, "--workdir", str(root), "--sweep", "nope=1,2")
    assert result.returncode == 2 and "Unknown config key 'nope'" in result.stderr
    result = _sweep(
        env, "--config", config, "--workdir", str(root), "--sweep", "config.x=1,2", "--sweep", "name=a/b,c", "--dry_run"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("[new]") == 4 and "--config.x=2 --config.name=a/b" in result.stdout
    assert not root.exists() and _invocations(tmp_path) == []


def test_helpers():
    assert sweep.split_values('1, (2, 3),"a,b",[4,5]') == ["1", "(2, 3)", '"a,b"', "[4,5]"]
    with pytest.raises(sweep.SweepError, match="Unbalanced"):
        sweep.split_values("(1,2")
    assert sweep.point_name([("a.b", "1e-3"), ("c", "x")]) == "a.b=1e-3,c=x"
    unsafe = sweep.point_name([("name", "a/b c")])
    assert unsafe.startswith("name=a_b_c-") and "/" not in unsafe
    assert unsafe != sweep.point_name([("name", "a_b_c")])  # the hash keeps them apart
    assert len(sweep.point_name([("k", "v" * 500)])) < 140
    assert sweep.parse_value("t", "(2, 1)", (-1, 1)) == (2, 1)
    assert sweep.parse_value("f", "1e-3", 0.5) == 0.001
    assert sweep.parse_value("b", "false", True) is False
