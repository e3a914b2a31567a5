"""The algorithm comparison's tiny variant (configs/algorithms.py:size=tiny), end to end through the CLI:
table, plot, fits and points are written; gold is the world's scorer on each iteration's rollouts;
the critic-free run's train state is smaller by exactly the value model and its Adam moments."""

import json
import os
import subprocess
import sys

import numpy as np

from tasks.gold import SentimentFluencyGold
from tasks.reviews import ReviewWorld


def load_json(path):
    with open(path) as f:
        return json.load(f)


def read_text(path):
    with open(path) as f:
        return f.read()


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Cheap XLA:CPU compilation (as tests/ppo_sharding_test.py): compiling is most of a tiny run's cost.
FLAGS = (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false"
)


def test_algorithms_tiny(tmp_path):
    workdir = str(tmp_path / "algos")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + FLAGS).strip())
    cmd = [
        sys.executable,
        "-m",
        "experiments.run",
        "--config",
        "configs/algorithms.py:size=tiny",
        "--workdir",
        workdir,
        "--config.algos.names=('ppo', 'grpo')",
        "--config.rl.steps=3",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = load_json(os.path.join(workdir, "summary.json"))
    rows = {r["name"]: r for r in summary["rows"]}
    assert sorted(rows) == ["grpo", "ppo"] and rows["grpo"]["k"] == 4 and rows["ppo"]["k"] == 1
    table = read_text(os.path.join(workdir, "table.md"))
    assert table.count("\n| ppo |") == 1 and table.count("\n| grpo |") == 1
    with open(os.path.join(workdir, "reward_vs_kl.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    fitted = load_json(os.path.join(workdir, "fits.json"))
    assert sorted(fitted) == ["grpo", "ppo"] and {"gold", "proxy", "gold_peak_d"} <= set(fitted["ppo"])

    # Same budget: 3 iterations x 8 rollouts each; gold of iteration 1 = the scorer on its 8 samples.
    points = load_json(os.path.join(workdir, "points.json"))
    scorer = SentimentFluencyGold(ReviewWorld(seed=0))
    for name in ("ppo", "grpo"):
        assert points[name]["step"] == [1, 2, 3]
        samples = [json.loads(line) for line in read_text(os.path.join(workdir, name, "samples.jsonl")).splitlines()]
        first = [s for s in samples if s["step"] == 1]
        assert len(first) == 8
        gold = np.mean(scorer([s["prompt"] + s["response"] for s in first]))
        np.testing.assert_allclose(points[name]["gold"][0], gold, atol=1e-6)
        np.testing.assert_allclose(points[name]["proxy"][0], np.mean([s["score"] for s in first]), atol=1e-6)
    # GRPO holds no value model: its train state lacks the value params and their two Adam moments.
    ppo_state, grpo_state = rows["ppo"]["state_mib"], rows["grpo"]["state_mib"]
    np.testing.assert_allclose(ppo_state - grpo_state, 3 * rows["ppo"]["value_mib"], rtol=1e-3)
    assert rows["grpo"]["value_mib"] == 0 and rows["ppo"]["value_mib"] > 0
