"""Ensemble objectives vs NumPy loops, rm.score over K workdirs, WARM averaging of member weights."""

import json
import os

import jax
import numpy as np
import pytest

from rm.ensemble import average_params, combine_scores, warm_average, write_reward_workdir
from tests.rm_data_gen import make_rows, make_tiny_policy, write_jsonl


def test_objectives_match_loops():
    scores = np.random.default_rng(0).normal(0, 1, (3, 5))  # [K, N]
    for i in range(5):
        column = [scores[k, i] for k in range(3)]
        mean = sum(column) / 3
        variance = sum((x - mean) ** 2 for x in column) / 3
        assert combine_scores(scores, objective="mean")[i] == pytest.approx(mean)
        assert combine_scores(scores, objective="wco")[i] == min(column)
        assert combine_scores(scores, objective="uwo", uwo_lambda=0.5)[i] == pytest.approx(mean - 0.5 * variance)
    np.testing.assert_allclose(combine_scores(scores[:1], objective="uwo"), scores[0])  # one member: no variance
    with pytest.raises(ValueError, match="objective"):
        combine_scores(scores, objective="max")


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Two reward-model workdirs from one tiny GPT-2: different heads and perturbed backbones."""
    from models.hf import load_hf_checkpoint
    from rm.model import rm_params_from_backbone

    d = tmp_path_factory.mktemp("ens")
    hf = make_tiny_policy(d)
    config, backbone = load_hf_checkpoint(hf)
    with open(d / "run_config.json", "w") as f:
        json.dump({"data": {"max_length": 64}}, f)
    workdirs = []
    for k in range(2):
        params = rm_params_from_backbone(config, backbone, jax.random.key(10 + k))
        noise = jax.random.key(20 + k)
        params = jax.tree.map(lambda x, n=noise: x + 0.01 * jax.random.normal(n, x.shape, x.dtype), params)
        workdirs.append(
            write_reward_workdir(
                str(d / f"m{k}"),
                config,
                params,
                tokenizer_dir=str(d / "tok"),
                config_json=str(d / "run_config.json"),
                normalization={"gain": 1.0 + k, "bias": -0.5 * k},
            )
        )
    data = write_jsonl(d / "pairs.jsonl", make_rows(12, 0))
    return d, workdirs, data


def _score(workdirs, data, out, *extra):
    from rm.score import main

    main(["--workdir", ",".join(workdirs), "--data", data, "--out", str(out), *extra])
    with open(out) as f:
        return [json.loads(line) for line in f]


def test_score_ensemble_of_workdirs(members, tmp_path):
    _, workdirs, data = members
    single = [_score([w], data, tmp_path / f"s{k}.jsonl") for k, w in enumerate(workdirs)]
    chosen = np.array([[r["chosen_score"] for r in s] for s in single])  # [K, N] normalised per member
    rejected = np.array([[r["rejected_score"] for r in s] for s in single])
    assert not np.allclose(chosen[0], chosen[1])
    # The command line once (wco); the other objectives through the same record builder on the members' lines.
    from rm.score import ensemble_records

    for objective in ("mean", "wco", "uwo"):
        if objective == "wco":
            out = _score(workdirs, data, tmp_path / "wco.jsonl", "--objective", "wco")
        else:
            out = ensemble_records(single, objective=objective, uwo_lambda=2.0)
        got = np.array([r["chosen_score"] for r in out])
        expected = {"mean": chosen.mean(0), "wco": chosen.min(0), "uwo": chosen.mean(0) - 2 * chosen.var(0)}[objective]
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose([r["rejected_members"] for r in out], rejected.T, rtol=1e-6)
        np.testing.assert_allclose(
            [r["probability"] for r in out], np.mean([[r["probability"] for r in s] for s in single], 0), rtol=1e-6
        )


def test_warm_averages_weights(members, tmp_path):
    from rm.model import load_reward_model

    _, workdirs, data = members
    out = str(tmp_path / "warm")
    normalization = warm_average(workdirs, out, normalize_on=data)
    averaged = load_reward_model(out)
    loaded = [load_reward_model(w) for w in workdirs]
    for a, m0, m1 in zip(
        jax.tree.leaves(averaged.params), jax.tree.leaves(loaded[0].params), jax.tree.leaves(loaded[1].params)
    ):
        np.testing.assert_allclose(np.asarray(a), (np.asarray(m0) + np.asarray(m1)) / 2, rtol=1e-6, atol=1e-7)
    # The averaged model scores like any reward model; its normalisation is its own (mean 0 / std 1 on data).
    scored = _score([out], data, tmp_path / "warm.jsonl")
    both = np.array([r["chosen_score"] for r in scored] + [r["rejected_score"] for r in scored])
    np.testing.assert_allclose([both.mean(), both.std()], [0.0, 1.0], atol=1e-4)
    assert normalization["source"] == data and os.path.exists(os.path.join(out, "tokenizer"))
    tree = {"a": np.ones(2, np.float32)}
    with pytest.raises(ValueError, match="shape"):
        average_params([tree, {"a": np.ones(3, np.float32)}])
