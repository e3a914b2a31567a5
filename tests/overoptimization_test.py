"""The over-optimisation driver's tiny variant, with a gold reward model (gold.kind='rm') that labels the proxies'
pairs (gold.labels='gold'), end to end: points, fits and plots are written, the best-of-n points follow the KL
formula and the unbiased estimator, gold is the gold RM's score and every label its preference (both checked
through `rm.score`, not the driver's scorer)."""

import json
import os

import numpy as np
import pytest

import configs.overoptimization as oo_config
from experiments import fits
from experiments.overoptimization import train
from rm.score import main as score_main
from tasks.gold import SentimentFluencyGold
from tasks.reviews import ReviewWorld


def test_overoptimization_tiny_with_gold_rm(tmp_path):
    c = oo_config.get_config("size=tiny")
    # Gao et al.'s setup: the gold RM, trained first on the scorer's labels of its own pairs, labels every proxy's
    # pairs (gold.labels='gold'); at annotator temperature 0, so that the labels can be checked against it below.
    c.gold.kind, c.gold.labels = "rm", "gold"
    c.labels.temperature = 0.0
    c.label_counts = (16, 64)  # two proxies test every per-proxy path; a third costs ~25 s of CPU
    # The seed's stages in a worker process, as the documented 3-seed run does them; the gold RM is trained in
    # this process first (tests/parallel_test.py checks the annotator state a worker continues from when the
    # scorer labels).
    c.workers = 1
    workdir = str(tmp_path / "oo")
    summary = train(c, workdir)
    labels = [f"{n} labels" for n in c.label_counts]
    assert summary["gold"] == "rm" and summary["label_counts"] == list(c.label_counts)
    assert os.path.exists(os.path.join(workdir, "gold_rm", "STAGE_DONE"))
    assert "PPO against the 64-label proxy" in open(os.path.join(workdir, "stages.log")).read()
    points = json.load(open(os.path.join(workdir, "points.json")))
    fitted = json.load(open(os.path.join(workdir, "fits.json")))
    for method in ("bon", "rl"):
        assert sorted(points[method]) == sorted(labels) and sorted(fitted[method]) == sorted(labels)
        for label in labels:
            for which in ("gold", "proxy"):
                f = fitted[method][label][which]
                assert all(np.isfinite(f[k]) for k in ("alpha", "beta", "r2")), (method, label, f)
        with open(os.path.join(workdir, f"{method}.png"), "rb") as fh:
            assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    ns = [1, 2, 4]
    for label in labels:
        pts = points["bon"][label]
        assert pts["n"] == ns
        np.testing.assert_allclose(pts["kl"], [np.log(n) - (n - 1) / n for n in ns], atol=1e-12)
        np.testing.assert_allclose(pts["d"], np.sqrt(pts["kl"]), atol=1e-12)
        assert len(points["rl"][label]["step"]) == c.rl.steps

    # Gold of best-of-1 is the mean gold-RM score of all best-of-n samples: score them with the
    # rm.score CLI on the gold RM's workdir and compare; the VADER scorer gives something else.
    bon = json.load(open(os.path.join(workdir, "bon_samples.json")))
    rows = [{"prompt": p, "response": r} for p, g in zip(bon["prompts"], bon["responses"]) for r in g]
    data, out = tmp_path / "bon.jsonl", tmp_path / "bon_scores.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    max_length = str(c.sampling.max_prompt_length + c.sampling.max_new_tokens)  # the driver's RM max_length
    score_main(
        [
            "--workdir",
            os.path.join(workdir, "gold_rm"),
            "--data",
            str(data),
            "--out",
            str(out),
            "--max_length",
            max_length,
        ]
    )
    gold = np.array([json.loads(l)["score"] for l in open(out)]).reshape(len(bon["prompts"]), -1)
    for label in labels:
        assert abs(points["bon"][label]["gold"][0] - gold.mean()) < 1e-4
    # Best-of-2 by an independent loop over all pairs of the n_max samples of each prompt (ties
    # in the proxy are measure-zero here): the unbiased estimator must agree.
    proxy_rows = [{"prompt": r["prompt"], "response": r["response"]} for r in rows]
    data.write_text("".join(json.dumps(r) + "\n" for r in proxy_rows))
    score_main(
        [
            "--workdir",
            os.path.join(workdir, f"proxy_{c.label_counts[-1]}"),
            "--data",
            str(data),
            "--out",
            str(out),
            "--max_length",
            max_length,
        ]
    )
    proxy = np.array([json.loads(l)["score"] for l in open(out)]).reshape(gold.shape)
    pairs_gold, pairs_proxy = [], []
    for p in range(gold.shape[0]):
        for i in range(gold.shape[1]):
            for j in range(i + 1, gold.shape[1]):
                k = i if proxy[p, i] > proxy[p, j] else j
                pairs_gold.append(gold[p, k])
                pairs_proxy.append(proxy[p, k])
    last = points["bon"][labels[-1]]
    assert abs(last["gold"][1] - np.mean(pairs_gold)) < 1e-4
    assert abs(last["proxy"][1] - np.mean(pairs_proxy)) < 1e-4
    scorer = SentimentFluencyGold(ReviewWorld(seed=c.world.seed))
    vader = np.asarray(scorer([p + r for p, g in zip(bon["prompts"], bon["responses"]) for r in g]))
    assert abs(vader.mean() - gold.mean()) > 1e-3
    # Every labelled pair (training and held-out): chosen has the higher gold-RM score; the scorer disagrees on some.
    rows = [json.loads(line) for line in open(os.path.join(workdir, "labels", "train_64.jsonl"))]
    rows += [json.loads(line) for line in open(os.path.join(workdir, "labels", "eval.jsonl"))]
    flat = [{"prompt": r["prompt"], "response": r[k]} for r in rows for k in ("chosen", "rejected")]
    data.write_text("".join(json.dumps(r) + "\n" for r in flat))
    score_main(["--workdir", os.path.join(workdir, "gold_rm"), "--data", str(data), "--out", str(out),
                "--max_length", max_length])  # fmt: skip
    pair_scores = np.array([json.loads(line)["score"] for line in open(out)]).reshape(-1, 2)
    assert (pair_scores[:, 0] >= pair_scores[:, 1] - 1e-5).all(), pair_scores
    pair_vader = np.asarray(scorer([r["prompt"] + r[k] for r in rows for k in ("chosen", "rejected")])).reshape(-1, 2)
    assert (pair_vader[:, 0] < pair_vader[:, 1]).any()
    assert os.path.exists(os.path.join(workdir, "labels", "gold_eval.jsonl"))  # the gold RM's own held-out pairs
    # The fitted gold peak is where the fitted form says it is.
    f = fitted["bon"][labels[-1]]
    assert abs(f["gold_peak_d"] - fits.peak_d_bon(f["gold"]["alpha"], f["gold"]["beta"])) < 1e-9


def test_unfittable_points_give_nan_and_reason_not_a_crash():
    from experiments.overoptimization import _fit

    out = _fit(fits.fit_rl, np.array([0.0, 0.0, 0.3]), np.array([0.0, 0.1, 0.2]), "rl test gold")
    assert np.isnan(out["alpha"]) and np.isnan(out["beta"]) and "two distinct d > 0" in out["error"]
    ok = _fit(fits.fit_bon, np.array([0.0, 0.5, 1.0, 1.5]), np.array([0.0, 0.5, 0.8, 0.9]), "bon test gold")
    assert "error" not in ok and np.isfinite(ok["alpha"])


def test_proxy_steps_scale_with_labels_at_fixed_epochs():
    """proxy.epochs > 0: ceil(epochs * labels / batch), at least proxy.min_steps, warmup and checkpoint
    cadence shrunk to fit; proxy.epochs = 0 keeps the trainer's own steps (hand-computed values)."""
    from experiments.overoptimization import _proxy_config, proxy_steps

    c = oo_config.get_config()
    assert (c.proxy.epochs, c.proxy.min_steps) == (2.0, 50)
    assert [proxy_steps(c, n, 32, 300) for n in (100, 1000, 10000)] == [50, 63, 625]
    c.proxy.min_steps = 0  # no floor: 2 epochs for every budget
    assert [proxy_steps(c, n, 32, 300) for n in (100, 1000, 10000)] == [7, 63, 625]
    r = _proxy_config(c, c.rm, "train.jsonl", "eval.jsonl", 100)
    assert (r.train.steps, r.train.warmup_steps, r.train.save_every, r.train.eval_every) == (7, 0, 7, 7)
    c.proxy.min_steps = 50
    r = _proxy_config(c, c.rm, "train.jsonl", "eval.jsonl", 1000)
    assert (r.train.steps, r.train.warmup_steps, r.train.save_every, r.train.eval_every) == (63, 6, 63, 63)
    assert r.data.train_files == "train.jsonl" and c.rm.train.steps == 300  # the base config is not changed
    c.proxy.epochs = 0.0
    assert proxy_steps(c, 10000, 32, 300) == 300
    assert (r.model.lora_rank, r.train.learning_rate) == (c.rm.model.lora_rank, c.rm.train.learning_rate) == (0, 3e-4)
    c.proxy.lora_rank, c.proxy.learning_rate = 8, 1e-3  # LoRA proxies; the base (the gold RM's) stays full
    r = _proxy_config(c, c.rm, "train.jsonl", "eval.jsonl", 1000)
    assert (r.model.lora_rank, r.train.learning_rate, c.rm.model.lora_rank) == (8, 1e-3, 0)


def test_bon_score_cache_is_keyed_on_the_samples(tmp_path):
    """The cached proxy scores are reused only for the same best-of-n samples; other samples re-score."""
    from experiments.overoptimization import _cached_bon_scores

    calls = []

    def score(values):
        calls.append(values)
        return np.asarray(values, np.float64)

    path = str(tmp_path / "bon_scores.npz")
    first = _cached_bon_scores(path, "sha-a", lambda: score([0.5, -1.25]))
    again = _cached_bon_scores(path, "sha-a", lambda: score([9.0, 9.0]))
    other = _cached_bon_scores(path, "sha-b", lambda: score([2.0, 3.0]))
    np.testing.assert_array_equal(first, [0.5, -1.25])
    np.testing.assert_array_equal(again, first)
    np.testing.assert_array_equal(other, [2.0, 3.0])
    assert calls == [[0.5, -1.25], [2.0, 3.0]] and again.dtype == np.float64


def test_resumed_held_out_labels_leave_the_annotator_where_a_fresh_run_would(tmp_path):
    """A workdir whose labels/eval.jsonl exists: _eval_pairs takes the annotator's held-out draws (one uniform per
    pair, as labelling them does) once, however often it is called, so the training labels drawn next are a fresh
    run's (before, 5-6% of them differed on resume)."""
    from experiments.overoptimization import _eval_pairs
    from tasks.gold import SimulatedAnnotator

    c = oo_config.get_config("size=tiny")
    n_eval = c.labels.n_eval_pairs
    gold_a, gold_b = np.random.default_rng(1).normal(size=(2, 200))
    fresh = SimulatedAnnotator(len, temperature=0.3, seed=4)
    fresh.label_scores(np.zeros(n_eval), np.ones(n_eval))  # a fresh run labels the held-out pairs first
    expected = fresh.label_scores(gold_a, gold_b)
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "eval.jsonl").write_text("")
    resumed = SimulatedAnnotator(len, temperature=0.3, seed=4)
    for _ in range(2):  # the worker and _seed_points both call it
        assert _eval_pairs(c, str(tmp_path), resumed, world=None, tokenizer=None, sft_hf=None).endswith("eval.jsonl")
    np.testing.assert_array_equal(resumed.label_scores(gold_a, gold_b), expected)
    not_forwarded = SimulatedAnnotator(len, temperature=0.3, seed=4).label_scores(gold_a, gold_b)
    assert not np.array_equal(not_forwarded, expected)  # the draws matter: the test can fail


def test_seed_peak_cell_shows_the_seeds_when_a_peak_is_far_beyond_the_range():
    """The across-seeds peak column: mean (t-interval) for finite peaks (hand values), the seeds' own values when
    one is inf or beyond 1e3 (a beta-near-0 fit's exp(alpha / beta - 1) printed a mean of 1e80 before)."""
    from experiments.overoptimization import _seed_peaks_cell
    from experiments.seeds import interval

    # mean 2, sample sd 1, t(0.975, 2) = 4.303: half-width 4.303 / sqrt(3) = 2.484
    assert _seed_peaks_cell(interval([1.0, 2.0, 3.0])) == "2.00 (-0.48, 4.48)"
    assert _seed_peaks_cell(interval([1.5, 1e80, 2.25])) == "per seed 1.50 / > 1000 / 2.25"
    assert _seed_peaks_cell(interval([1.5, float("inf"), 0.0])) == "per seed 1.50 / > 1000 / 0.00"


def test_gold_rm_variant_is_gao_et_al_s_setup_and_leaves_the_default_alone():
    """configs/overoptimization.py:gold=rm sets the documented gold-RM design; the default stays the scorer world."""
    default, gao = oo_config.get_config(), oo_config.get_config("gold=rm")
    assert (default.gold.kind, default.gold.labels, default.proxy.lora_rank, default.rl.fit_block) == (
        "scorer",
        "scorer",
        0,
        1,
    )
    assert (gao.gold.kind, gao.gold.labels, gao.labels.temperature) == ("rm", "gold", 0.065)
    assert (gao.proxy.lora_rank, gao.proxy.learning_rate) == (8, 1e-3)
    assert (gao.ppo.train.warmup_steps, gao.rl.steps, gao.rl.fit_block) == (80, 200, 5)
    assert gao.label_counts == default.label_counts == (100, 1000, 10000)
    with pytest.raises(ValueError, match="gold='human'"):
        oo_config.get_config("gold=human")
