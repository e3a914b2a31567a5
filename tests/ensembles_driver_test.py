"""The Coste et al. driver's tiny variant end to end: one K = 2 ensemble run, best-of-n and PPO per variant."""

import json
import os

import numpy as np

import configs.ensembles as ens_config
from experiments.ensembles import train


def test_ensembles_tiny(tmp_path):
    c = ens_config.get_config("size=tiny")
    c.coste.noise_levels, c.coste.variants, c.rl.steps = (0.25,), ("single", "wco"), 2
    c.workers = 1  # the (seed, noise level) run in a worker process, as the documented run does it
    workdir = str(tmp_path / "coste")
    results = train(c, workdir)
    table = results["table"]
    assert [(r["noise"], r["method"], r["variant"]) for r in table] == [
        ("0.25", m, v) for m in ("bon", "ppo") for v in ("single", "wco")
    ]
    for row in table:
        for at in ("peak", "end"):
            r = row[at]
            assert np.isfinite(r["mean"]) and r["low"] <= r["mean"] <= r["high"], row
    run = results["per_seed"][0]["0.25"]
    assert len(run["rm"]["member_accuracy"]) == 2
    bon = run["bon"]["single"]
    assert bon["n"] == [1, 2, 4] and abs(bon["gold"][0]) < 1e-6  # gains over the SFT policy (best-of-1)
    # The PPO runs read the single RM (member 0) and the ensemble run under wco.
    for variant, reward in (("single", "members/0"), ("wco", "")):
        config = json.load(open(os.path.join(workdir, "noise_0.25", f"ppo_{variant}", "config.json")))
        assert config["reward"]["workdir"] == os.path.join(workdir, "noise_0.25", "rm", reward).rstrip("/")
        assert config["reward"]["objective"] == ("mean" if variant == "single" else "wco")
        assert len(run["ppo"][variant]["gold"]) == 2
    assert "PPO against wco" in open(os.path.join(workdir, "noise_0.25", "stages.log")).read()
    for name in ("results.json", "table.md", "bon.png", "ppo.png"):
        assert os.path.exists(os.path.join(workdir, name)), name
