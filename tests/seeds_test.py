"""Multi-seed helpers (experiments/seeds.py), the sweep's seed table, and the Coste driver's pure parts."""

import numpy as np
import pytest

import configs.quickstart as qs_config
from experiments.ensembles import best_of_n_per_prompt, bon_result, variant_scores
from experiments.fits import best_of_n_estimate
from experiments.seeds import format_interval, interval, mean_curve, seed_configs
from experiments.sweep_summary import seed_rows

T_975_2 = 4.302652729911275  # Student t quantile (0.975, 2 dof)


def test_seed_configs_layout():
    c = qs_config.get_config("size=tiny")
    assert [(s, d) for s, _, d in seed_configs(c, "W")] == [(0, "W")]  # one seed: the layout is unchanged
    c.seeds = (0, 1, 2)
    runs = seed_configs(c, "W")
    assert [(s, cfg.seed, tuple(cfg.seeds), d) for s, cfg, d in runs] == [
        (0, 0, (), "W/seed_0"),
        (1, 1, (), "W/seed_1"),
        (2, 2, (), "W/seed_2"),
    ]
    c.seeds = (1, 1)
    with pytest.raises(ValueError, match="repeats"):
        seed_configs(c, "W")


def test_interval_hand_case():
    ci = interval([0.6, 0.7, 0.8])
    half = T_975_2 * 0.1 / np.sqrt(3)
    assert ci["mean"] == pytest.approx(0.7) and ci["low"] == pytest.approx(0.7 - half, rel=1e-9)
    assert ci["high"] == pytest.approx(0.7 + half, rel=1e-9) and ci["n"] == 3
    one = interval([0.5])
    assert np.isnan(one["low"]) and format_interval(one) == "0.500"
    assert format_interval(ci) == f"0.700 ({0.7 - half:.3f}, {0.7 + half:.3f})"
    assert mean_curve([{"d": [0, 1, 2], "g": [1, 2, 3]}, {"d": [0, 1], "g": [3, 4]}], ["d", "g"]) == {
        "d": [0.0, 1.0],
        "g": [2.0, 3.0],
    }


def test_sweep_seed_rows():
    rows = [
        {"lr": 1, "seed": s, "status": "ok", "run": f"r{s}", "eval/accuracy": a, "name": "x"}
        for s, a in zip((0, 1, 2), (0.6, 0.7, 0.8))
    ]
    rows += [{"lr": 2, "seed": 0, "status": "ok", "run": "q", "eval/accuracy": 0.9}]
    rows += [{"lr": 2, "seed": 1, "status": "failed (exit 1)", "run": "q1", "eval/accuracy": 0.1}]
    table = seed_rows(rows, ["lr", "seed"])
    assert [(r["lr"], r["seeds"]) for r in table] == [(1, "0,1,2"), (2, "0")]  # failed seeds are left out
    half = T_975_2 * 0.1 / np.sqrt(3)
    assert table[0]["eval/accuracy"] == pytest.approx(0.7)
    assert table[0]["eval/accuracy/high"] == pytest.approx(0.7 + half)
    assert table[1]["eval/accuracy"] == 0.9 and np.isnan(table[1]["eval/accuracy/low"])
    assert "name" not in table[0]  # not numeric


def test_variant_scores_and_best_of_n():
    rng = np.random.default_rng(0)
    members = rng.normal(size=(3, 20))  # [K, N]
    np.testing.assert_array_equal(variant_scores(members, "single", uwo_lambda=1.0), members[0])
    np.testing.assert_allclose(variant_scores(members, "wco", uwo_lambda=1.0), members.min(0))
    np.testing.assert_allclose(
        variant_scores(members, "uwo", uwo_lambda=0.5), members.mean(0) - 0.5 * members.var(0), rtol=1e-12
    )
    with pytest.raises(ValueError, match="coste.variants"):
        variant_scores(members, "max", uwo_lambda=1.0)
    proxy, gold = rng.normal(size=(5, 8)), rng.normal(size=(5, 8))
    # The per-prompt estimates average to the pooled unbiased estimator.
    for n in (1, 3, 8):
        assert best_of_n_per_prompt(proxy, gold, n).mean() == pytest.approx(best_of_n_estimate(proxy, gold, n)[1])
    result = bon_result(proxy, gold, [1, 2, 4, 8], resamples=200, seed=0)
    assert result["gold"][0] == pytest.approx(0.0, abs=1e-12)  # best-of-1 is the SFT policy: gain 0
    assert result["end"]["n"] == 8 and result["end"]["mean"] == pytest.approx(result["gold"][-1])
    assert result["peak"]["mean"] == pytest.approx(max(result["gold"]))
    assert result["end"]["low"] <= result["end"]["mean"] <= result["end"]["high"]
