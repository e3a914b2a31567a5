"""SFT: next-token loss (NumPy loop, HF PyTorch), data masks and bad rows, end-to-end from scratch
(held-out loss falls, HF export parity, re-running resumes)."""

import json
import os
import random
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import configs.sft as sft_config
from common.checkpoint import CheckpointManager
from common.data_io import BadRowError
from common.workdir import load_model_config
from models.hf import load_hf_checkpoint
from models.transformer import Transformer, TransformerConfig, init_params
from sft import data as sft_data
from sft.train import lm_logits, next_token_loss, train, train_step
from tests.fixtures import EOS_TOKEN, make_tiny_tokenizer
from tests.hf_fixtures import make_tiny_hf_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANIMALS = ["cat", "dog", "fox", "owl", "bee", "cow"]
COLORS = ["red", "blue", "green", "black"]


def qa_rows(n, seed):
    """Repetitive prompt-completion rows: the completion repeats the prompt's animal, then a colour."""
    r = random.Random(seed)
    rows = []
    for _ in range(n):
        animal, color = r.choice(ANIMALS), r.choice(COLORS)
        rows.append({"prompt": f"Q: what color is the {animal}?", "completion": f" A: the {animal} is {color}."})
    return rows


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    corpus = [r["prompt"] + r["completion"] for r in qa_rows(200, 9)] + ["Hello there, how are you today?"] * 3
    tok_dir = make_tiny_tokenizer(str(d / "tok"), texts=corpus, vocab_size=300)
    from transformers import AutoTokenizer

    return {
        "dir": d,
        "tok_dir": tok_dir,
        "tok": AutoTokenizer.from_pretrained(tok_dir),
        "train": write_jsonl(d / "train.jsonl", qa_rows(256, 0)),
        "eval": write_jsonl(d / "eval.jsonl", qa_rows(64, 1)),
    }


# ----------------------------------------------------------------------------- loss


def numpy_loss(logits, ids, mask):
    """Mean over targets t (mask[b, t] = 1, t >= 1) of -log softmax(logits[b, t-1])[ids[b, t]]."""
    total, count = 0.0, 0
    for b in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            if mask[b, t]:
                row = logits[b, t - 1].astype(np.float64)
                log_softmax = row - (row.max() + np.log(np.sum(np.exp(row - row.max()))))
                total -= log_softmax[ids[b, t]]
                count += 1
    return total / count


def test_loss_matches_numpy_loop():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (3, 7, 11)).astype(np.float32)
    ids = rng.integers(0, 11, (3, 7))
    mask = (rng.random((3, 7)) < 0.6).astype(np.int32)
    mask[:, 0] = 1  # column 0 must be ignored even when marked
    ours = next_token_loss(logits=jnp.asarray(logits), input_ids=jnp.asarray(ids), loss_mask=jnp.asarray(mask))
    np.testing.assert_allclose(float(ours), numpy_loss(logits, ids, mask), rtol=1e-6)
    # bfloat16 logits are upcast: same value as the float32 computation on the rounded logits.
    low = jnp.asarray(logits, jnp.bfloat16)
    ours_low = next_token_loss(logits=low, input_ids=jnp.asarray(ids), loss_mask=jnp.asarray(mask))
    np.testing.assert_allclose(float(ours_low), numpy_loss(np.asarray(low, np.float32), ids, mask), rtol=1e-6)
    # No targets: 0, not NaN.
    assert (
        float(
            next_token_loss(
                logits=jnp.asarray(logits), input_ids=jnp.asarray(ids), loss_mask=jnp.zeros_like(jnp.asarray(mask))
            )
        )
        == 0.0
    )


def test_loss_matches_pytorch(tmp_path):
    import torch

    model = make_tiny_hf_model("gpt2", str(tmp_path / "hf"), vocab_size=96, d=32, layers=2, heads=4)
    config, params = load_hf_checkpoint(str(tmp_path / "hf"))
    rng = np.random.default_rng(1)
    lengths = np.array([12, 9, 5])
    ids = rng.integers(1, 96, (3, 12))
    attention = (np.arange(12)[None] < lengths[:, None]).astype(np.int32)  # right padding
    ids = np.where(attention > 0, ids, 0)
    loss_mask = attention * (np.arange(12)[None] >= np.array([[4], [2], [1]]))  # prompt tokens masked
    logits = jax.jit(lm_logits, static_argnums=0)(config, params, ids, attention)  # eager flax is slow
    ours = next_token_loss(logits=logits, input_ids=jnp.asarray(ids), loss_mask=jnp.asarray(loss_mask))
    labels = torch.tensor(np.where(loss_mask > 0, ids, -100))
    with torch.no_grad():
        out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(attention), labels=labels)
        by_hand = torch.nn.functional.cross_entropy(
            out.logits[:, :-1].reshape(-1, 96), labels[:, 1:].reshape(-1), ignore_index=-100
        )
    np.testing.assert_allclose(float(ours), float(out.loss), atol=1e-4)
    np.testing.assert_allclose(float(ours), float(by_hand), atol=1e-4)


def test_grad_accumulation_is_exact_token_mean():
    """accum_steps=2 with uneven target counts per half == one full batch (loss and update)."""
    cfg = TransformerConfig(
        family="llama",
        vocab_size=32,
        d_model=16,
        n_layers=1,
        n_heads=2,
        n_kv_heads=2,
        head_dim=8,
        d_ff=32,
        max_position_embeddings=16,
    )
    params = jax.jit(init_params, static_argnums=0)(cfg, jax.random.key(0))
    rng = np.random.default_rng(2)
    ids = rng.integers(0, 32, (4, 8)).astype(np.int32)
    attention = np.ones((4, 8), np.int32)
    loss_mask = np.zeros((4, 8), np.int32)
    loss_mask[0, 1:] = 1  # first half: 7 + 1 targets, second half: 2 + 3
    loss_mask[1, 7] = 1
    loss_mask[2, 5:7] = 1
    loss_mask[3, 2:5] = 1
    batch = {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask}
    tx = optax.sgd(0.1)
    results = []
    for accum in (1, 2):
        state = {
            "params": params,
            "opt_state": tx.init(params),
            "step": jnp.asarray(0, jnp.int32),
            "rng": jax.random.key_data(jax.random.key(1)),
        }
        results.append(
            jax.jit(
                lambda s, b, a=accum: train_step(
                    s, b, model_config=cfg, tx=tx, schedule=lambda _: 0.1, accum_steps=a, nan_step=-1
                )
            )(state, batch)
        )
    logits = jax.jit(lm_logits, static_argnums=0)(cfg, params, ids, attention)
    expected = numpy_loss(np.asarray(logits), ids, loss_mask)
    for _, metrics in results:
        np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
        assert float(metrics["target_tokens"]) == 13
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6),
        results[0][0]["params"],
        results[1][0]["params"],
    )


# ----------------------------------------------------------------------------- data


def test_prompt_completion_masks_completion_and_eos(setup, tmp_path):
    tok = setup["tok"]
    rows = [
        {"prompt": "Q: what color is the cat?", "completion": " A: the cat is red."},
        {"prompt": "Q: what color is the owl?", "completion": " A: the owl is blue." + EOS_TOKEN},
    ]
    data = sft_data.load_sft_data(write_jsonl(tmp_path / "pc.jsonl", rows), tok, max_length=24)
    eos = tok.eos_token_id
    for i, row in enumerate(rows):
        prompt = tok(row["prompt"], add_special_tokens=False)["input_ids"]
        completion = tok(row["completion"], add_special_tokens=False)["input_ids"]
        completion = completion if completion[-1] == eos else completion + [eos]  # EOS exactly once
        n = len(prompt) + len(completion)
        np.testing.assert_array_equal(data.input_ids[i], prompt + completion + [tok.pad_token_id] * (24 - n))
        np.testing.assert_array_equal(data.attention_mask[i], [1] * n + [0] * (24 - n))
        np.testing.assert_array_equal(data.loss_mask[i], [0] * len(prompt) + [1] * len(completion) + [0] * (24 - n))
    assert tok.decode(data.input_ids[0][data.loss_mask[0] > 0]) == " A: the cat is red." + EOS_TOKEN
    assert data.stats["target_tokens"] == int(data.loss_mask.sum()) and data.stats["truncated"] == 0

    # Truncation keeps the start; an example whose prompt fills max_length has no target and is dropped.
    short = sft_data.load_sft_data(
        write_jsonl(tmp_path / "pc2.jsonl", rows + [{"prompt": "x " * 30, "completion": "y"}]), tok, max_length=10
    )
    assert len(short) == 2 and short.stats["truncated"] == 2
    assert short.stats["skipped/no_targets_after_truncation"] == 1
    np.testing.assert_array_equal(short.input_ids[0], data.input_ids[0][:10])
    np.testing.assert_array_equal(short.loss_mask[0], data.loss_mask[0][:10])


def test_text_and_conversation_masks(setup, tmp_path):
    tok = setup["tok"]
    text = sft_data.load_sft_data(write_jsonl(tmp_path / "t.jsonl", [{"text": "the cat is red."}]), tok, max_length=16)
    n = int(text.attention_mask[0].sum())
    ids = tok("the cat is red.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    np.testing.assert_array_equal(text.input_ids[0, :n], ids)
    np.testing.assert_array_equal(text.loss_mask[0, :n], [0] + [1] * (n - 1))  # all but the unpredictable first

    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye!"},
    ]
    conv = sft_data.load_sft_data(write_jsonl(tmp_path / "m.jsonl", [{"messages": messages}]), tok, max_length=96)
    # tests/fixtures.CHAT_TEMPLATE renders "<|role|>\n{content}\n" per turn: by hand, the targets are
    # the assistant contents with their newline, then EOS.
    context1 = "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"
    context2 = "<|user|>\nBye\n<|assistant|>\n"
    pieces = [(context1, 0), ("Hello\n", 1), (context2, 0), ("Bye!\n", 1)]
    expected_ids, expected_mask = [], []
    for piece, target in pieces:
        piece_ids = tok(piece, add_special_tokens=False)["input_ids"]
        expected_ids += piece_ids
        expected_mask += [target] * len(piece_ids)
    expected_ids.append(tok.eos_token_id)
    expected_mask.append(1)
    n = len(expected_ids)
    np.testing.assert_array_equal(conv.input_ids[0, :n], expected_ids)
    np.testing.assert_array_equal(conv.loss_mask[0], expected_mask + [0] * (96 - n))
    assert tok.decode(conv.input_ids[0][conv.loss_mask[0] > 0]) == "Hello\nBye!\n" + EOS_TOKEN


def test_bad_rows_error_and_skip(setup, tmp_path):
    tok = setup["tok"]
    rows = qa_rows(6, 3)
    rows[3] = {"prompt": "Q: what color is the cat?", "completion": None}
    rows[4] = {"prompt": "Q: what color is the dog?", "completion": "   "}
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(BadRowError, match=rf"{path}: row 3 \(0-based\): key 'completion': expected a non-empty"):
        sft_data.load_sft_data(path, tok, max_length=32)
    data = sft_data.load_sft_data(path, tok, max_length=32, on_bad_row="skip")
    assert len(data) == 4 and data.stats["skipped"] == 2
    assert data.stats["skipped/missing"] == 1 and data.stats["skipped/empty"] == 1

    no_assistant = write_jsonl(tmp_path / "conv.jsonl", [{"messages": [{"role": "user", "content": "Hi"}]}])
    with pytest.raises(
        BadRowError,
        match=r"row 0 \(0-based\): key 'messages': expected at least one message with "
        r"role 'assistant'",
    ):
        sft_data.load_sft_data(no_assistant, tok, max_length=32)
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(ValueError, match=r"columns \['answer', 'question'\] are not a known SFT layout"):
        sft_data.load_sft_data(unknown, tok, max_length=32)


def test_batches_deterministic_and_eval_padding(setup, tmp_path):
    data = sft_data.load_sft_data(write_jsonl(tmp_path / "five.jsonl", qa_rows(5, 4)), setup["tok"], max_length=24)
    stream = sft_data.train_batches(data, batch_size=2, seed=7)
    batches = [next(stream)[1] for _ in range(4)]
    _, resumed = next(sft_data.train_batches(data, batch_size=2, seed=7, start_step=3))
    for k in sft_data.ARRAY_KEYS:
        np.testing.assert_array_equal(resumed[k], batches[3][k])
    first_epoch = np.concatenate([b["input_ids"] for b in batches])[:5]  # a permutation of the 5 rows
    assert sorted(map(tuple, first_epoch)) == sorted(map(tuple, data.input_ids))
    evals = list(sft_data.eval_batches(data, batch_size=4))
    np.testing.assert_array_equal(evals[1]["valid"], [1, 0, 0, 0])
    np.testing.assert_array_equal(evals[1]["index"], [4, -1, -1, -1])
    assert evals[1]["loss_mask"][1:].sum() == 0 and evals[1]["loss_mask"][0].sum() == data.loss_mask[4].sum()


# ----------------------------------------------------------------------------- end to end


def overrides(setup, workdir):
    return {
        "workdir": workdir,
        "model.tokenizer": setup["tok_dir"],
        "data.train_files": setup["train"],
        "data.eval_files": setup["eval"],
        "data.max_length": 32,
        "train.steps": 40,
        "train.eval_every": 0,
        "train.save_every": 20,
    }


@pytest.fixture(scope="module")
def trained(setup):
    workdir = str(setup["dir"] / "scratch")
    c = sft_config.get_config("size=tiny")
    for key, value in overrides(setup, workdir).items():
        if key != "workdir":
            section, field = key.split(".")
            setattr(c[section], field, value)
    start, cpu = time.time(), time.process_time()
    summary = train(c, workdir)
    return workdir, summary, (time.time() - start, time.process_time() - cpu)


def test_from_scratch_lowers_heldout_loss(trained):
    workdir, summary, (seconds, cpu_seconds) = trained
    lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
    evals = {l["step"]: l["eval/loss"] for l in lines if "eval/loss" in l}
    assert sorted(evals) == [0, 40]
    assert evals[40] < 0.7 * evals[0], evals
    assert evals[0] > 4.0  # a random init is near log(vocab) = log(300) = 5.7
    np.testing.assert_allclose(summary["eval/perplexity"], np.exp(evals[40]), rtol=1e-6)
    assert any("train/loss" in l for l in lines)
    print(
        f"\nSFT from scratch: 40 steps in {seconds:.1f}s wall ({cpu_seconds:.1f}s CPU), "
        f"eval loss {evals[0]:.3f} -> {evals[40]:.3f}"
    )
    # CPU time (compiles included) is what this run costs; wall time also counts other jobs on a shared machine.
    assert cpu_seconds < 40 and seconds < 150
    for name in (
        "config.json",
        "model_config.json",
        "data_stats.json",
        "eval_final.json",
        "tokenizer/tokenizer.json",
        "hf/config.json",
        "hf/model.safetensors",
        "hf/tokenizer.json",
    ):
        assert os.path.exists(os.path.join(workdir, name)), name


def test_export_matches_transformers(trained, setup):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    workdir, _, _ = trained
    config = load_model_config(workdir)
    ckpt = CheckpointManager(os.path.join(workdir, "checkpoints"), save_every=1)
    params, extra = ckpt.restore_subtree("params")
    ckpt.close()
    assert extra["step"] == 40
    data = sft_data.load_sft_data(setup["eval"], setup["tok"], max_length=32)
    ids, mask = data.input_ids[:8], data.attention_mask[:8]
    ours = np.asarray(Transformer(config).apply({"params": params}, ids, mask).logits)
    model = AutoModelForCausalLM.from_pretrained(os.path.join(workdir, "hf")).eval()
    with torch.no_grad():
        theirs = model(
            input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask, dtype=torch.long)
        ).logits.numpy()
    real = mask > 0
    np.testing.assert_allclose(theirs[real], ours[real], atol=1e-4)
    hf_tok = AutoTokenizer.from_pretrained(os.path.join(workdir, "hf"))
    assert hf_tok("the cat")["input_ids"] == setup["tok"]("the cat")["input_ids"]
    # The exported folder is an `init_from` for the other trainers: our loader reads it back.
    hf_config, hf_params = load_hf_checkpoint(os.path.join(workdir, "hf"))
    assert hf_config.vocab_size == len(setup["tok"]) and hf_config.eos_token_id == setup["tok"].eos_token_id
    np.testing.assert_array_equal(np.asarray(hf_params["embed"]["embedding"]), np.asarray(params["embed"]["embedding"]))


def test_rerun_resumes_without_retraining(trained, setup):
    workdir, summary, _ = trained
    before = open(os.path.join(workdir, "metrics.jsonl")).read()
    args = overrides(setup, workdir)
    cmd = [
        sys.executable,
        "-m",
        "experiments.run",
        "--config",
        "configs/sft.py:size=tiny",
        f"--workdir={args.pop('workdir')}",
    ] + [f"--config.{k}={v}" for k, v in args.items()]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Resuming from checkpoint at step 40" in res.stdout
    assert "done: step 40" in res.stdout
    final = json.load(open(os.path.join(workdir, "eval_final.json")))
    assert final["step"] == 40
    np.testing.assert_allclose(final["eval/loss"], summary["eval/loss"], rtol=1e-5)
    assert open(os.path.join(workdir, "metrics.jsonl")).read() == before  # nothing re-trained or re-logged
    assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit()) == [20, 40]


def test_nan_stops_and_keeps_last_good_checkpoint(setup):
    workdir = str(setup["dir"] / "nan")
    c = sft_config.get_config("size=tiny")
    c.model.tokenizer = setup["tok_dir"]
    c.data.train_files, c.data.max_length = setup["train"], 32
    c.train.steps, c.train.save_every, c.train.eval_every = 8, 2, 0
    c.debug.inject_nan_at_step = 3  # the 4th update
    with pytest.raises(FloatingPointError, match=r"train/loss is nan at step 4.*last good checkpoint \(step 2\)"):
        train(c, workdir)
    ckpt = CheckpointManager(os.path.join(workdir, "checkpoints"), save_every=1)
    params, extra = ckpt.restore_subtree("params")
    ckpt.close()
    assert extra["step"] == 2 and all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
    assert not os.path.exists(os.path.join(workdir, "hf"))
