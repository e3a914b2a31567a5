"""K reward models in one run (model.ensemble_size): equal to K single runs with seeds seed + k."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

import configs.rm as rm_config
from rm.ensemble import member_workdirs
from rm.model import load_reward_model
from rm.train import train
from tests.rm_data_gen import make_rows, make_tiny_policy, write_jsonl


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("ens_train")
    make_tiny_policy(d)
    train_file = write_jsonl(d / "train.jsonl", make_rows(64, 0))
    eval_file = write_jsonl(d / "eval.jsonl", make_rows(32, 1))

    def config(seed, k):
        c = rm_config.get_config("size=tiny")
        c.model.init_from = str(d / "hf")
        c.data.train_files, c.data.eval_files = train_file, eval_file
        c.seed, c.model.ensemble_size = seed, k
        c.train.steps, c.train.batch_size, c.train.log_every, c.train.eval_every = 8, 8, 2, 4
        c.train.save_every, c.eval.bootstrap_resamples = 4, 0  # a step-4 checkpoint: the resume test's
        # With center_coef = 0 the head bias has an exactly-zero gradient (it cancels in r_c - r_r), and
        # Adam turns round-off there into +-lr steps of either sign: centring gives it a real gradient.
        c.train.center_coef = 0.01
        c.train.adam_eps = 1e-6  # (and eps 1e-8 amplifies vmap-vs-plain round-off on near-zero gradients)
        return c

    ensemble = train(config(3, 2), str(d / "ens"))
    singles = [train(config(3 + k, 1), str(d / f"single{k}")) for k in range(2)]
    return d, ensemble, singles, config


def _lines(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def test_members_equal_single_runs(runs):
    d, ensemble, singles, _ = runs
    members = member_workdirs(str(d / "ens"))
    assert members == [str(d / "ens" / "members" / "0"), str(d / "ens" / "members" / "1")]
    ens_lines = [line for line in _lines(d / "ens") if "train/m0/loss" in line]
    for k, single in enumerate(singles):
        # Params after 8 steps, every leaf (head and full backbone).
        a = load_reward_model(members[k])
        b = load_reward_model(str(d / f"single{k}"))
        leaves = list(zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)))
        for x, y in leaves:
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=1e-5)
        print(
            "member",
            k,
            "max |param diff|",
            max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in leaves),
        )
        assert a.gain == pytest.approx(b.gain, rel=1e-5) and a.bias == pytest.approx(b.bias, rel=1e-5, abs=1e-5)
        assert a.temperature == pytest.approx(b.temperature, rel=1e-4)
        # Train metrics at every logged step, and the final eval metrics.
        single_lines = [line for line in _lines(d / f"single{k}") if "train/loss" in line]
        assert [line["step"] for line in single_lines] == [line["step"] for line in ens_lines]
        for e, s in zip(ens_lines, single_lines):
            for key in ("loss", "accuracy", "grad_norm"):
                assert e[f"train/m{k}/{key}"] == pytest.approx(s[f"train/{key}"], rel=1e-5, abs=1e-5), key
        member = ensemble["members"][k]
        for key in ("eval/accuracy", "eval/margin", "eval/ece", "eval/calibrated/ece"):
            assert member[key] == pytest.approx(single[key], rel=1e-5, abs=1e-5), key
    # The two members differ (different heads and data orders): not one model twice.
    assert abs(ens_lines[-1]["train/m0/loss"] - ens_lines[-1]["train/m1/loss"]) > 1e-4
    assert json.load(open(d / "ens" / "ensemble.json"))["seeds"] == [3, 4]
    assert ensemble["eval/ensemble/mean/accuracy"] >= 0.0


def test_bootstrap_resample_is_seeded():
    from rm.ensemble_train import member_train_data

    class Rows:
        def __len__(self):
            return 10

        def select(self, rows):
            return list(rows)

    a = member_train_data(Rows(), seed=1, bootstrap=True)
    assert a == member_train_data(Rows(), seed=1, bootstrap=True) != member_train_data(Rows(), seed=2, bootstrap=True)
    assert len(a) == 10 and len(set(a)) < 10  # drawn with replacement


def test_score_ensemble_run_with_each_objective(runs, tmp_path):
    """rm.score --workdir ENSEMBLE_RUN: the members' normalised scores combined, against NumPy."""
    from rm.score import main

    d, _, _, _ = runs
    data = str(d / "eval.jsonl")
    singles = []
    for k in range(2):
        main(["--workdir", str(d / "ens" / "members" / str(k)), "--data", data, "--out", str(tmp_path / f"{k}.jsonl")])
        singles.append([json.loads(line) for line in open(tmp_path / f"{k}.jsonl")])
    chosen = np.array([[row["chosen_score"] for row in rows] for rows in singles])  # [K, N]
    expected = {"mean": chosen.mean(0), "wco": chosen.min(0), "uwo": chosen.mean(0) - 0.5 * chosen.var(0)}
    for objective, want in expected.items():
        out = tmp_path / f"ens_{objective}.jsonl"
        main(["--workdir", str(d / "ens"), "--data", data, "--out", str(out), "--objective", objective]
             + ["--uwo_lambda", "0.5"])  # fmt: skip
        got = np.array([json.loads(line)["chosen_score"] for line in open(out)])
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_ppo_refuses_an_unknown_objective(runs):
    """(PPO against an ensemble run end to end: tests/ensembles_driver_test.py; its scores: ensemble_objective_test.)"""
    import configs.ppo as ppo_config
    from ppo.train import train as ppo_train

    d, _, _, _ = runs
    prompts = write_jsonl(d / "prompts.jsonl", [{"prompt": "Review: the film"}] * 8)
    c = ppo_config.get_config("size=tiny")
    c.policy.init_from, c.reward.workdir, c.data.prompt_files = str(d / "hf"), str(d / "ens"), prompts
    c.reward.objective = "max"
    with pytest.raises(ValueError, match="reward.objective"):
        ppo_train(c, str(d / "ppo_bad"))


def test_driver_proxy_scorer_on_an_ensemble_run(runs):
    """experiments.pipeline.ProxyScorer (the drivers' best-of-n scorer) on an ensemble run = the objective
    over each member's own normalised scores."""
    from experiments.pipeline import ProxyScorer

    d, _, _, _ = runs
    prompts, responses = ["Review: the film", "Review: a story"] * 2, [" great lovely", " dull", " superb", ""]
    members = [ProxyScorer(str(d / "ens" / "members" / str(k)), max_length=64)(prompts, responses) for k in range(2)]
    for objective, want in (("wco", np.minimum(*members)), ("mean", (members[0] + members[1]) / 2)):
        got = ProxyScorer(str(d / "ens"), max_length=64, objective=objective)(prompts, responses)
        np.testing.assert_allclose(got, want, atol=1e-6)


def test_killed_ensemble_run_resumes_bit_identically(runs, capsys):
    """The stacked [K] train state goes through the ordinary checkpoint path: a K = 2 run that lost
    everything after its step-4 checkpoint (as if killed there) resumes and ends with the same member
    parameters and train metrics, bit for bit, as the uninterrupted run."""
    d, _, _, config = runs
    resumed = str(d / "ens_resumed")
    shutil.copytree(d / "ens", resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "8"))
    shutil.rmtree(os.path.join(resumed, "members"))
    with open(os.path.join(resumed, "metrics.jsonl")) as f:  # the lines the killed run had written by step 4
        kept = [line for line in f if json.loads(line)["step"] <= 4]
    with open(os.path.join(resumed, "metrics.jsonl"), "w") as f:
        f.writelines(kept)
    train(config(3, 2), resumed)
    assert "Resuming from checkpoint at step 4" in capsys.readouterr().out
    for k, member in enumerate(member_workdirs(resumed)):
        a = load_reward_model(member).params
        b = load_reward_model(os.path.join(d / "ens", "members", str(k))).params
        jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
    train_lines = lambda w: [line for line in _lines(w) if "train/m0/loss" in line]  # noqa: E731
    assert [line["step"] for line in train_lines(resumed)] == [2, 4, 6, 8]
    for a, b in zip(train_lines(resumed), train_lines(d / "ens")):  # per-member loss, accuracy, grad norm
        assert {k: v for k, v in a.items() if k.startswith("train/m")} == {
            k: v for k, v in b.items() if k.startswith("train/m")
        }
