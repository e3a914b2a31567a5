"""The critic-free estimators end to end on the tiny policy and reward model of tests/ppo_train_test.py.

One subprocess (this file as a script, `_worker`) runs `ppo.train.train` for each of rloo, grpo,
dr_grpo, reinforce_pp and reinforce_baseline with K = 4 samples per prompt and prints one JSON
line. The worker compiles with XLA:CPU's cheap-compile flags (as tests/ppo_sharding_test.py does),
which cuts the five compilations, the bulk of the cost, by about a third; the resume test runs the
CLI with the same flags, so its runs and the worker's GRPO run compute the same floats.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

KINDS = ("rloo", "grpo", "dr_grpo", "reinforce_pp", "reinforce_baseline")
K, STEPS, SAVE_EVERY = 4, 16, 4
FLAGS = (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false"
)


def _env():
    return dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
        XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + FLAGS).strip(),
    )


def _overrides(kind):
    return {
        "algo.advantage": kind,
        "rollout.samples_per_prompt": K,
        "train.steps": STEPS,
        "train.save_every": SAVE_EVERY,
    }


if __name__ != "__main__":
    import numpy as np
    import pytest

    from tests.ppo_train_test import read, setup  # noqa: F401  (module fixture: tiny policy + trained RM)

    @pytest.fixture(scope="module")
    def runs(setup):  # noqa: F811
        t0 = time.time()
        arg = json.dumps(
            {"hf": setup["hf"], "rm": setup["rm"], "prompts": setup["prompts"], "out": str(setup["dir"] / "algos")}
        )
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--worker", arg],
            env=_env(),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert proc.returncode == 0, f"worker failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"estimators worker: {time.time() - t0:.1f}s wall, {report['cpu_s']}")
        return report

    def _check_estimator(runs, kind):
        run = runs["runs"][kind]
        m = read(os.path.join(run["workdir"], "metrics.jsonl"))
        assert [x["step"] for x in m] == list(range(1, STEPS + 1))
        first = np.mean([x["objective/scores"] for x in m[:3]])
        last = np.mean([x["objective/scores"] for x in m[-4:]])
        assert last > first + 0.3, (kind, first, last)
        assert max(x["objective/kl"] for x in m) < 15.0, kind
        assert "group/score_std" in m[-1] and not any(k.startswith("val/") for k in m[-1]), sorted(m[-1])
        assert ("policy/kl_loss" in m[-1]) == (kind in ("grpo", "dr_grpo")), kind  # KL placement 'auto'
        # No value model: nothing of it in the checkpoint; the train state is params + Adam's two
        # moments of the policy alone (+ a few scalars: step, rng, counts).
        assert run["checkpoint_params"] == ["policy"], run
        assert run["checkpoint_has_value"] is False and run["checkpoint_has_policy_moments"], run
        with open(os.path.join(run["workdir"], "summary.json")) as f:
            summary = json.load(f)
        assert summary["memory/value_param_bytes"] == 0
        assert 0 <= summary["memory/train_state_bytes"] - 3 * run["policy_bytes"] < 1024, (summary, run)

    def _cli(workdir, setup):  # noqa: F811
        return [
            sys.executable,
            "-m",
            "experiments.run",
            "--config",
            "configs/ppo.py:size=tiny",
            "--workdir",
            workdir,
            f"--config.policy.init_from={setup['hf']}",
            f"--config.reward.workdir={setup['rm']}",
            f"--config.data.prompt_files={setup['prompts']}",
        ] + [f"--config.{k}={v}" for k, v in _overrides("grpo").items()]

    def test_critic_free_estimators_end_to_end(runs, setup):  # noqa: F811
        """Each estimator raises the score with bounded KL and holds no value model; then a GRPO K=4
        run killed after its first checkpoint and resumed ends with the parameters of the worker's
        uninterrupted run, bit for bit. One test (not one per estimator) so that pytest-xdist never
        runs the worker twice, once per process."""
        import jax

        from common.checkpoint import CheckpointManager

        failures = []
        for kind in KINDS:
            try:
                _check_estimator(runs, kind)
            except AssertionError as e:  # report every estimator, not only the first failing one
                failures.append(f"{kind}: {e!r}")
        assert not failures, "\n".join(failures)

        killed = str(setup["dir"] / "grpo_killed")
        proc = subprocess.Popen(
            _cli(killed, setup), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        ckpts = os.path.join(killed, "checkpoints")
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            if os.path.isdir(ckpts) and any(x.isdigit() and int(x) >= SAVE_EVERY for x in os.listdir(ckpts)):
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the run finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        out = subprocess.run(_cli(killed, setup), check=True, cwd=ROOT, env=_env(), capture_output=True, text=True)
        assert "Resuming from checkpoint" in out.stdout
        trees = []
        for w in (runs["runs"]["grpo"]["workdir"], killed):
            ckpt = CheckpointManager(os.path.join(w, "checkpoints"), save_every=1)
            trees.append(ckpt.restore_subtree("params"))
            ckpt.close()
        (a, ea), (b, eb) = trees
        assert ea["step"] == eb["step"] == STEPS and ea["kl"] == eb["kl"]
        jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
        assert [x["step"] for x in read(os.path.join(killed, "metrics.jsonl"))] == list(range(1, STEPS + 1))


def _worker(arg):
    import jax

    import configs.ppo as ppo_config
    from common.checkpoint import CheckpointManager
    from models.hf import load_hf_checkpoint
    from ppo.algorithms import tree_bytes
    from ppo.train import train

    paths = json.loads(arg)
    _, policy = load_hf_checkpoint(paths["hf"])
    report, cpu = {"runs": {}}, {}
    for kind in KINDS:
        t = time.process_time()
        c = ppo_config.get_config("size=tiny")
        c.policy.init_from, c.reward.workdir, c.data.prompt_files = paths["hf"], paths["rm"], paths["prompts"]
        for key, value in _overrides(kind).items():
            section, name = key.split(".")
            setattr(getattr(c, section), name, value)
        workdir = os.path.join(paths["out"], kind)
        train(c, workdir)
        ckpt = CheckpointManager(os.path.join(workdir, "checkpoints"), save_every=1)
        params, _ = ckpt.restore_subtree("params")
        ckpt.close()
        with open(os.path.join(workdir, "checkpoints", str(STEPS), "state", "_METADATA")) as f:
            stored = list(
                json.load(f)["tree_metadata"]
            )  # every stored leaf's key path, e.g. "('params', 'policy', ...)"
        report["runs"][kind] = {
            "workdir": workdir,
            "checkpoint_params": sorted(params),
            "checkpoint_has_value": any("'value" in path for path in stored),
            "checkpoint_has_policy_moments": any("'mu', 'policy'" in path for path in stored),
            "policy_bytes": tree_bytes(policy),
        }
        cpu[kind] = round(time.process_time() - t, 1)
    report["cpu_s"] = cpu
    del jax
    print(json.dumps(report))


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker(sys.argv[sys.argv.index("--worker") + 1])
