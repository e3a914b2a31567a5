"""Packed training end to end (data.packing): the RM trainer learns, resumes bit-identically and
logs throughput (real tokens counted by hand); the SFT trainer's packed losses equal its padded ones."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs.rm as rm_config
import configs.sft as sft_config
from common import data_io
from common.checkpoint import CheckpointManager
from models.transformer import init_params
from rm import data as rm_data
from rm.train import train as train_rm
from sft import data as sft_data
from sft.train import lm_nll, scratch_model_config
from sft.train import train as train_sft
from tests.fixtures import make_tiny_tokenizer
from tests.rm_data_gen import make_rows, make_tiny_policy, write_jsonl


def qa_rows(n, seed):
    """Prompt-completion rows of a few lengths (as tests/sft_test.py's)."""
    rng = np.random.default_rng(seed)
    animals, colors = ["cat", "dog", "fox", "owl"], ["red", "blue", "green"]
    rows = []
    for _ in range(n):
        animal, color = rng.choice(animals), rng.choice(colors)
        extra = " and nice" * int(rng.integers(0, 3))
        rows.append({"prompt": f"Q: what color is the {animal}?", "completion": f" A: the {animal} is {color}{extra}."})
    return rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("packing")
    make_tiny_policy(d)
    return {
        "dir": d,
        "hf": str(d / "hf"),
        "train": write_jsonl(d / "train.jsonl", make_rows(200, 0)),
        "eval": write_jsonl(d / "eval.jsonl", make_rows(64, 1)),
    }


def rm_tiny(setup, **data):
    c = rm_config.get_config("size=tiny")
    c.model.init_from = setup["hf"]
    c.data.train_files, c.data.eval_files = setup["train"], setup["eval"]
    c.data.packing, c.data.max_length = True, 96  # room for two or three pairs' sequences per row
    c.train.steps, c.train.save_every, c.train.eval_every, c.train.log_every = 20, 10, 0, 5
    c.eval.bootstrap_resamples = 0
    for k, v in data.items():
        setattr(c.data, k, v)
    return c


def final_params(workdir):
    ckpt = CheckpointManager(os.path.join(workdir, "checkpoints"), save_every=1)
    try:
        return ckpt.restore_subtree("params")
    finally:
        ckpt.close()


@pytest.fixture(scope="module")
def packed_run(setup):
    workdir = str(setup["dir"] / "packed")
    summary = train_rm(rm_tiny(setup), workdir)
    return workdir, summary


def read_lines(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def test_packed_rm_learns_and_logs_real_tokens(packed_run, setup):
    workdir, summary = packed_run
    assert summary["eval/accuracy"] >= 0.9
    stats = json.load(open(os.path.join(workdir, "data_stats.json")))["train"]
    assert stats["pack_rows"] < 32 and stats["pack_segments"] >= 2  # 16 pairs = 32 sequences, packed
    # Hand count: the real tokens of the batches of steps 1..5 (rm/data.py's (seed, step) order).
    tokenizer = data_io.load_tokenizer(os.path.join(workdir, "tokenizer"))
    data = rm_data.load_preference_data(setup["train"], tokenizer, max_length=96)
    batches = rm_data.train_batches(data, batch_size=16, seed=0)
    counts = [int(b["chosen_mask"].sum() + b["rejected_mask"].sum()) for _, (_, b) in zip(range(5), batches)]
    line = next(r for r in read_lines(workdir) if r["step"] == 5)
    assert line["train/tokens"] == pytest.approx(np.mean(counts))
    slots = stats["pack_rows"] * 96
    assert line["train/pad_fraction"] == pytest.approx(1 - np.mean(counts) / slots, abs=1e-6)
    assert line["train/pad_fraction_unpacked"] > line["train/pad_fraction"]  # packing removed padding
    for r in read_lines(workdir):
        if "train/loss" in r and r["step"] > 5:  # every train line after the first carries the rates
            assert 0 < r["perf/step_time_s"] < 30 and r["perf/tokens_per_s"] > 100
            assert 0 < r["perf/mfu"] < 2  # against a CPU matmul probe: noisy on a shared machine
            assert r["perf/model_flops_per_s"] > 0


def test_packed_rm_resume_is_bit_identical(packed_run, setup):
    workdir, _ = packed_run
    copy = str(setup["dir"] / "resumed")
    shutil.copytree(workdir, copy)
    shutil.rmtree(os.path.join(copy, "checkpoints", "20"))  # as if killed after the step-10 checkpoint
    train_rm(rm_tiny(setup), copy)
    params, extra = final_params(copy)
    ref_params, ref_extra = final_params(workdir)
    assert extra["step"] == ref_extra["step"] == 20
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, ref_params)
    steps = [r["step"] for r in read_lines(copy) if "train/loss" in r]
    assert steps == [5, 10, 15, 20]


def test_sft_packed_run_matches_padded_loss_and_counts_tokens(setup):
    """One packed SFT run: its first loss equals the padded batch's loss under the same initial
    parameters, its token count the batch's real tokens (hand count), and it logs the rates."""
    d = setup["dir"]
    corpus = [r["prompt"] + r["completion"] for r in qa_rows(100, 9)]
    tok_dir = make_tiny_tokenizer(str(d / "sft_tok"), texts=corpus, vocab_size=200)
    train_file = write_jsonl(d / "sft_train.jsonl", qa_rows(64, 0))
    c = sft_config.get_config("size=tiny")
    c.model.tokenizer, c.data.train_files = tok_dir, train_file
    c.data.packing, c.data.max_length = True, 128  # ~55 tokens an example: two a row
    c.train.steps, c.train.log_every, c.train.save_every, c.train.eval_every = 2, 1, 100, 0
    c.export.hf = False
    workdir = str(d / "sft_packed")
    train_sft(c, workdir)
    lines = [r for r in read_lines(workdir) if "train/loss" in r]
    assert lines[0]["train/pad_fraction"] < lines[0]["train/pad_fraction_unpacked"]
    assert 0 < lines[1]["perf/mfu"] < 2 and lines[1]["perf/tokens_per_s"] > 100  # CPU probe: noisy when shared

    tokenizer = data_io.load_tokenizer(tok_dir)
    data = sft_data.load_sft_data(train_file, tokenizer, max_length=128)
    _, batch = next(sft_data.train_batches(data, batch_size=c.train.batch_size, seed=0))
    assert lines[0]["train/tokens"] == int(batch["attention_mask"].sum())
    model_config = scratch_model_config(c.model, tokenizer)
    params = init_params(model_config, jax.random.fold_in(jax.random.key(0), 1))  # sft/train.py's initial params
    nll, weights, _ = jax.jit(
        lambda p, b: lm_nll(model_config, p, b["input_ids"], b["attention_mask"], b["loss_mask"])
    )(params, batch)
    assert lines[0]["train/loss"] == pytest.approx(float(jnp.sum(nll) / jnp.sum(weights)), abs=1e-5)


def test_packed_rm_row_buckets_resume_bit_identical_and_count_slots(setup):
    """data.pack_row_buckets=2: steps take either bucket (slots = bucket x L, the smallest bucket the
    step's sequences fit in: more rows than the hand-counted tokens need), real tokens counted by
    hand, and a resumed run ends bit-identical."""
    c = rm_tiny(setup, pack_row_buckets=2, eval_files="")  # no eval: keeps the test cheap
    c.train.steps, c.train.save_every, c.train.log_every = 4, 2, 1
    workdir = str(setup["dir"] / "buckets")
    train_rm(c, workdir)
    stats = json.load(open(os.path.join(workdir, "data_stats.json")))["train"]
    buckets = stats["pack_row_buckets"]
    assert len(buckets) == 2 and buckets[-1] == stats["pack_rows"]
    tokenizer = data_io.load_tokenizer(os.path.join(workdir, "tokenizer"))
    data = rm_data.load_preference_data(setup["train"], tokenizer, max_length=96)
    batches = rm_data.train_batches(data, batch_size=16, seed=0)
    counts = [int(b["chosen_mask"].sum() + b["rejected_mask"].sum()) for _, (_, b) in zip(range(4), batches)]
    lines = [r for r in read_lines(workdir) if "train/loss" in r]
    rows_used = []
    for line, tokens in zip(lines, counts):
        assert line["train/tokens"] == tokens
        rows = round(tokens / (1 - line["train/pad_fraction"]) / 96)
        assert rows in buckets and rows * 96 >= tokens
        rows_used.append(rows)
    assert set(rows_used) == set(buckets)  # both shapes used in 4 steps (needs 14, 15, 14, 14 rows)

    copy = str(setup["dir"] / "buckets_resumed")
    shutil.copytree(workdir, copy)
    shutil.rmtree(os.path.join(copy, "checkpoints", "4"))
    train_rm(c, copy)
    params, extra = final_params(copy)
    ref_params, ref_extra = final_params(workdir)
    assert extra["step"] == ref_extra["step"] == 4
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, ref_params)
