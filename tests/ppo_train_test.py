"""PPO end to end: the score rises with bounded KL, a high fixed beta holds the policy, EOS
penalties and per-token rewards are right, resume after SIGKILL is exact, export matches PyTorch."""

import json
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs.ppo as ppo_config
import configs.rm as rm_config
from common.checkpoint import CheckpointManager
from models.transformer import Transformer, TransformerConfig, init_params
from ppo import losses as L
from ppo.rollout import ModelSpecs, make_rollout_fn
from ppo.train import train as ppo_train
from rm.model import RewardModel, compute_rewards
from rm.train import train as rm_train
from tests.rm_data_gen import NEUTRAL, make_rows, make_tiny_policy, write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Tiny GPT-2 policy, and a reward model trained to like 'good' words."""
    d = tmp_path_factory.mktemp("ppo")
    make_tiny_policy(d)
    c = rm_config.get_config("size=tiny")
    c.model.init_from = str(d / "hf")
    c.data.train_files = write_jsonl(d / "train.jsonl", make_rows(300, 0))
    c.data.eval_files = write_jsonl(d / "eval.jsonl", make_rows(50, 1))
    c.train.steps, c.train.eval_every = 30, 0
    rm_train(c, str(d / "rm"))
    rng = np.random.default_rng(0)
    prompts = [{"prompt": "Review: " + " ".join(rng.choice(NEUTRAL, size=int(rng.integers(2, 5))))} for _ in range(64)]
    prompts[3] = {"prompt": [{"role": "user", "content": "Review: the film"}]}  # message-list prompt
    return {"dir": d, "hf": str(d / "hf"), "rm": str(d / "rm"), "prompts": write_jsonl(d / "prompts.jsonl", prompts)}


def tiny(setup, **kw):
    c = ppo_config.get_config("size=tiny")
    c.policy.init_from, c.reward.workdir, c.data.prompt_files = setup["hf"], setup["rm"], setup["prompts"]
    for key, value in kw.items():
        section, name = key.split("__")
        setattr(getattr(c, section), name, value)
    return c


def read(path):
    return [json.loads(l) for l in open(path)]


@pytest.fixture(scope="module")
def ppo_run(setup):
    workdir = str(setup["dir"] / "ppo")
    start = time.process_time()  # CPU seconds: robust to other jobs sharing the machine
    ppo_train(tiny(setup, train__steps=24), workdir)
    return workdir, time.process_time() - start


def test_score_rises_with_bounded_kl(ppo_run):
    workdir, seconds = ppo_run
    assert seconds < 90
    m = read(os.path.join(workdir, "metrics.jsonl"))
    for key in (
        "objective/scores",
        "objective/kl",
        "objective/rlhf_reward",
        "objective/entropy",
        "policy/approxkl",
        "policy/clipfrac",
        "val/vf_loss",
        "kl/beta",
        "rollout/eos_fraction",
        "rollout/response_length",
    ):
        assert key in m[-1], key
    first = np.mean([x["objective/scores"] for x in m[:3]])
    last = np.mean([x["objective/scores"] for x in m[-4:]])
    assert last > first + 0.4, (first, last)
    assert max(x["objective/kl"] for x in m) < 15.0
    samples = read(os.path.join(workdir, "samples.jsonl"))
    assert samples and {"step", "prompt", "response", "score"} <= set(samples[0])


def test_metrics_carry_throughput_and_time_split(ppo_run):
    """Each line splits the iteration into generation, scoring and update, and counts real tokens."""
    workdir, _ = ppo_run
    batch_size = ppo_config.get_config("size=tiny").train.batch_size
    for line in read(os.path.join(workdir, "metrics.jsonl")):
        assert line["time/generation_s"] + line["time/scoring_s"] == pytest.approx(line["time/rollout_s"])
        # response tokens: rollout/response_length is their mean per row
        assert line["perf/response_tokens"] == pytest.approx(line["rollout/response_length"] * batch_size)
        query_tokens = line["perf/tokens"] - line["perf/response_tokens"]
        assert query_tokens >= 2 * batch_size and query_tokens == int(query_tokens)  # 'Review: ' + words
        step_s = line["time/rollout_s"] + line["time/update_s"]
        assert line["perf/step_time_s"] == pytest.approx(step_s, rel=1e-6)
        assert line["perf/tokens_per_s"] == pytest.approx(line["perf/tokens"] / step_s, rel=1e-6)
        assert line["perf/model_flops_per_s"] > 0 and 0 < line["perf/mfu"] < 2  # CPU probe: noisy when shared


def test_high_fixed_beta_barely_moves(setup, ppo_run):
    workdir = str(setup["dir"] / "ppo_beta")
    ppo_train(tiny(setup, train__steps=24, kl__kind="fixed", kl__init_beta=5.0), workdir)
    held = read(os.path.join(workdir, "metrics.jsonl"))
    free = read(os.path.join(ppo_run[0], "metrics.jsonl"))
    assert all(x["kl/beta"] == 5.0 for x in held)
    assert np.mean([x["objective/kl"] for x in held[-4:]]) < 0.25 * np.mean([x["objective/kl"] for x in free[-4:]])
    gain_held = np.mean([x["objective/scores"] for x in held[-4:]]) - np.mean([x["objective/scores"] for x in held[:3]])
    gain_free = np.mean([x["objective/scores"] for x in free[-4:]]) - np.mean([x["objective/scores"] for x in free[:3]])
    assert gain_held < 0.5 * gain_free


def test_export_matches_pytorch(setup, ppo_run, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    workdir, _ = ppo_run
    out = str(tmp_path / "policy")
    subprocess.run(
        [sys.executable, "-m", "ppo.export", "--workdir", workdir, "--out", out],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    from models.hf import load_hf_checkpoint

    ckpt = CheckpointManager(os.path.join(workdir, "checkpoints"), save_every=1)
    params, _ = ckpt.restore_subtree("params")
    ckpt.close()
    config, _ = load_hf_checkpoint(out)
    ids = np.random.default_rng(0).integers(1, 200, (2, 12))
    ours = (
        Transformer(config).apply({"params": params["policy"]}, jnp.asarray(ids), jnp.ones((2, 12), jnp.int32)).logits
    )
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4)
    # The exported policy is the trained one, not the initial checkpoint.
    init_cfg, init_params_ = load_hf_checkpoint(setup["hf"])
    assert not np.allclose(
        np.asarray(params["policy"]["embed"]["embedding"]), np.asarray(init_params_["embed"]["embedding"])
    )


def test_rollout_rewards_eos_penalty_and_masking():
    """Per-token rewards, scores, EOS penalty and masks against an independent numpy computation."""
    pcfg = TransformerConfig(
        family="llama",
        vocab_size=16,
        d_model=32,
        n_layers=1,
        n_heads=4,
        n_kv_heads=2,
        head_dim=8,
        d_ff=64,
        pad_token_id=0,
        eos_token_id=3,
    )
    policy = init_params(pcfg, jax.random.key(0))
    ref = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), policy)
    rcfg = pcfg.replace(n_layers=1)
    rparams = RewardModel(rcfg).init(jax.random.key(2), jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))[
        "params"
    ]
    specs = ModelSpecs(policy=pcfg, reward=rcfg, value=rcfg)
    settings = dict(
        max_new_tokens=12,
        temperature=1.3,
        top_k=0,
        top_p=1.0,
        eos_token_id=3,
        stop_token_ids=(),
        missing_eos_penalty=2.5,
        kl_estimator="k1",
        gamma=1.0,
        lam=0.95,
        whiten_rewards=False,
        length_penalty=0.05,
    )
    q = jnp.asarray([[0, 0, 5, 6], [7, 8, 9, 10], [0, 11, 12, 13], [0, 0, 0, 14]], jnp.int32)
    qm = (q > 0).astype(jnp.int32)
    beta, gain, bias = 0.1, 2.0, -0.5
    r = jax.jit(make_rollout_fn(specs, settings))(
        {"policy": policy, "value": rparams}, ref, rparams, jnp.asarray([gain, bias]), beta, q, qm, jax.random.key(7)
    )
    resp, rmask = np.asarray(r.response_ids), np.asarray(r.response_mask)
    eos_rows = np.asarray(r.ended_with_eos)
    assert 0 < eos_rows.sum() < 4, "need rows with and without EOS; change the key"
    for i in range(4):
        n = int(rmask[i].sum())
        hit = np.where(resp[i] == 3)[0]
        if eos_rows[i]:
            assert n == hit[0] + 1 and np.all(rmask[i, n:] == 0) and np.all(resp[i, n:] == 0)
        else:
            assert n == 12 and len(hit) == 0
        # Score: RM on prompt + response truncated at EOS, normalised, penalised without EOS and
        # by 0.05 per response token.
        seq = np.concatenate([np.asarray(q[i])[np.asarray(qm[i]) > 0], resp[i, :n]])
        raw = float(compute_rewards(rcfg, rparams, jnp.asarray(seq[None]), jnp.ones((1, len(seq)), jnp.int32))[0])
        expected = gain * raw + bias - (0 if eos_rows[i] else 2.5) - 0.05 * n
        np.testing.assert_allclose(float(r.scores[i]), expected, atol=1e-4)
        # Per-token reward: -beta * (logp - ref_logp), plus the score on the last token.
        kl = (np.asarray(r.logprobs[i]) - np.asarray(r.ref_logprobs[i])) * rmask[i]
        want = -beta * kl
        want[n - 1] += expected
        np.testing.assert_allclose(np.asarray(r.rewards[i]), want, atol=1e-4)
    # Log-probs are of the tempered distribution, computed independently here for the policy.
    full = jnp.concatenate([q, r.response_ids], 1)
    logits = Transformer(pcfg).apply({"params": policy}, full, jnp.concatenate([qm, r.response_mask], 1)).logits
    lp = jax.nn.log_softmax(np.asarray(logits[:, 3:15]) / 1.3)
    picked = np.take_along_axis(np.asarray(lp), resp[..., None], -1)[..., 0] * rmask
    np.testing.assert_allclose(np.asarray(r.logprobs), picked, atol=1e-4)
    adv, ret = L.gae(r.rewards, r.values, r.response_mask.astype(jnp.float32), gamma=1.0, lam=0.95)
    np.testing.assert_allclose(np.asarray(r.returns), np.asarray(ret), atol=1e-5)


def test_resume_after_lost_tail_is_exact(setup, capsys):
    """A run that lost everything after its step-6 checkpoint (as if killed there) resumes and ends with
    the uninterrupted run's params, KL controller and metrics, bit for bit. In process, to stay cheap: the
    SIGKILL mechanics of the same trainer are covered by tests/ppo_algorithms_test.py (a GRPO run killed
    after its first checkpoint) and tests/rm_train_test.py."""
    import shutil

    ref_dir, killed = str(setup["dir"] / "ppo_ref"), str(setup["dir"] / "ppo_killed")
    config = tiny(setup, train__steps=8, train__save_every=2)
    ppo_train(config, ref_dir)
    shutil.copytree(ref_dir, killed)
    shutil.rmtree(os.path.join(killed, "checkpoints", "8"))
    metrics_path = os.path.join(killed, "metrics.jsonl")
    with open(metrics_path) as f:  # what the killed run had written by its step-6 checkpoint
        kept = [line for line in f if json.loads(line)["step"] <= 6]
    with open(metrics_path, "w") as f:
        f.writelines(kept)
    capsys.readouterr()
    ppo_train(config, killed)
    assert "Resuming from checkpoint at step 6" in capsys.readouterr().out
    trees = []
    for w in (ref_dir, killed):
        ckpt = CheckpointManager(os.path.join(w, "checkpoints"), save_every=1)
        trees.append(ckpt.restore_subtree("params"))
        ckpt.close()
    (a, ea), (b, eb) = trees
    assert ea["step"] == eb["step"] == 8 and ea["kl"] == eb["kl"]
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
    ours, ref = read(metrics_path), read(os.path.join(ref_dir, "metrics.jsonl"))
    assert [m["step"] for m in ours] == list(range(1, 9))
    clock = ("time/", "perf/mfu", "perf/model_flops_per_s", "perf/step_time_s")  # wall-clock fields differ

    def no_clock(rows):
        return [{k: v for k, v in m.items() if not k.startswith(clock) and not k.endswith("_per_s")} for m in rows]

    assert no_clock(ours[6:]) == no_clock(ref[6:])
