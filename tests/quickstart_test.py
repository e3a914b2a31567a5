"""The quickstart's tiny variant runs the whole loop and writes summary.json and plots."""

import json
import os

import numpy as np

import configs.quickstart as qs_config
from experiments.fits import bon_kl
from experiments.quickstart import train


def test_quickstart_tiny_end_to_end(tmp_path):
    workdir = str(tmp_path / "qs")
    summary = train(qs_config.get_config("size=tiny"), workdir)
    on_disk = json.load(open(os.path.join(workdir, "summary.json")))
    assert on_disk["rm"] == summary["rm"]
    assert 0.0 <= summary["rm"]["accuracy"] <= 1.0 and summary["rm"]["ece"] >= 0.0
    assert summary["before"]["kl"] == 0.0 and np.isfinite(summary["after_ppo"]["gold"])
    ns = [b["n"] for b in summary["best_of_n"]]
    assert ns == [1, 2, 4]
    np.testing.assert_allclose([b["kl"] for b in summary["best_of_n"]], [np.log(n) - (n - 1) / n for n in ns])
    assert [b["kl"] for b in summary["best_of_n"]] == [float(bon_kl(n)) for n in ns]
    # Best-of-n never lowers the proxy it selects on.
    proxies = [b["proxy"] for b in summary["best_of_n"]]
    assert proxies == sorted(proxies)
    assert len(summary["ppo_curve"]) == 4  # one gold point per PPO step
    for name in ("training_curves.png", "reward_vs_kl.png", "rm/reliability.png"):
        with open(os.path.join(workdir, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
    # Re-running resumes: every stage is skipped, the summary is rebuilt identically.
    again = train(qs_config.get_config("size=tiny"), workdir)
    assert again["best_of_n"] == summary["best_of_n"] and again["ppo_curve"] == summary["ppo_curve"]
