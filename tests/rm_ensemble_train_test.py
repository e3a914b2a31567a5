"""K reward models in one run (model.ensemble_size): equal to K single runs with seeds seed + k."""

import json
import os

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
        c.train.save_every, c.eval.bootstrap_resamples = 100, 0
        # With center_coef = 0 the head bias has an exactly-zero gradient (it cancels in r_c - r_r), and
        # Adam turns round-off there into +-lr steps of either sign: centring gives it a real gradient.
        c.train.center_coef = 0.01
        c.train.adam_eps = 1e-6  # (and eps 1e-8 amplifies vmap-vs-plain round-off on near-zero gradients)
        return c

    ensemble = train(config(3, 2), str(d / "ens"))
    singles = [train(config(3 + k, 1), str(d / f"single{k}")) for k in range(2)]
    return d, ensemble, singles


def _lines(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def test_members_equal_single_runs(runs):
    d, ensemble, singles = runs
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
