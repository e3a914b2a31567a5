"""SFT -> reward model -> PPO end to end on tiny qwen3 (Qwen3 chat format, conversational rows)
and gpt_neox (Pythia-style: plain text, pad = EOS) checkpoints, each run a few steps through the
trainers `experiments.run` dispatches to, with every export loaded back by transformers and
compared with our forward pass."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import configs.ppo as ppo_config
import configs.rm as rm_config
import configs.sft as sft_config
from experiments.cli import trainer_module
from models.hf import load_hf_checkpoint
from models.transformer import Transformer
from tests.chat_templates import make_chat_tokenizer
from tests.fixtures import make_tiny_tokenizer
from tests.hf_fixtures import make_tiny_hf_model
from tests.rm_data_gen import NEUTRAL, corpus, make_rows, write_jsonl


def run(config, workdir):
    import importlib

    importlib.import_module(trainer_module(config.trainer)).train(config, workdir)
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def finite(metrics):
    return all(np.isfinite(v) for m in metrics for v in m.values() if isinstance(v, float))


@pytest.mark.parametrize("family", ["qwen3", "gpt_neox"])
def test_sft_rm_ppo_end_to_end(tmp_path, family):
    chat = family == "qwen3"
    tok_dir = (
        make_chat_tokenizer(tmp_path / "tok", "qwen3", texts=corpus())
        if chat
        else make_tiny_tokenizer(tmp_path / "tok", texts=corpus(), vocab_size=300)
    )
    tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    base = str(tmp_path / "base")
    make_tiny_hf_model(
        family,
        base,
        tokenizer_dir=tok_dir,
        vocab_size=len(tok),
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        d=32,
        heads=2,
    )
    rows = make_rows(48, 0, fmt="conversational" if chat else "explicit")
    prefs = write_jsonl(tmp_path / "prefs.jsonl", rows)
    if chat:
        sft_rows = [{"messages": r["prompt"] + r["chosen"]} for r in rows]
        prompts = [{"prompt": r["prompt"]} for r in rows[:16]]
    else:
        sft_rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows]
        prompts = [{"prompt": "Review: " + " ".join(NEUTRAL[i : i + 3])} for i in range(8)]
    sft_file = write_jsonl(tmp_path / "sft.jsonl", sft_rows)
    prompt_file = write_jsonl(tmp_path / "prompts.jsonl", prompts)

    # SFT from the HF checkpoint; its workdir/hf export is what the RM and PPO start from.
    c = sft_config.get_config("size=tiny")
    c.model.init_from, c.data.train_files = base, sft_file
    c.train.steps, c.train.batch_size, c.train.eval_every, c.train.log_every = 3, 8, 0, 1
    c.data.max_length, c.eval.at_start = 48, False
    sft_dir = str(tmp_path / "sft")
    metrics = run(c, sft_dir)
    assert finite(metrics) and metrics[-1]["step"] == 3
    cfg, params = load_hf_checkpoint(os.path.join(sft_dir, "hf"))
    assert cfg.family == family
    ids = np.asarray(tok(["the film was great", "a story"], padding=True)["input_ids"])
    mask = np.asarray(tok(["the film was great", "a story"], padding=True)["attention_mask"])
    model = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(sft_dir, "hf")).eval()
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    ours = np.asarray(Transformer(cfg).apply({"params": params}, jnp.asarray(ids), jnp.asarray(mask)).logits)
    np.testing.assert_allclose(theirs[mask > 0], ours[mask > 0], atol=1e-4)
    _, base_params = load_hf_checkpoint(base)
    assert np.abs(np.asarray(params["embed"]["embedding"]) - np.asarray(base_params["embed"]["embedding"])).max() > 0

    # Reward model from the SFT model, then its sequence-classification export.
    c = rm_config.get_config("size=tiny")
    c.model.init_from, c.data.train_files, c.data.eval_files = os.path.join(sft_dir, "hf"), prefs, prefs
    c.train.steps, c.train.batch_size, c.train.eval_every, c.train.log_every = 3, 8, 0, 1
    rm_dir = str(tmp_path / "rm")
    metrics = run(c, rm_dir)
    assert finite(metrics)
    from rm.export import export as rm_export
    from rm.model import load_reward_model
    from rm.train import pair_rewards

    out = rm_export(rm_dir, str(tmp_path / "rm_export"))
    reward = load_reward_model(rm_dir)
    cls = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    texts = [
        tok.apply_chat_template(r["prompt"] + r["chosen"], tokenize=False) if chat else r["prompt"] + r["chosen"]
        for r in rows[:4]
    ]
    enc = hf_tok(texts, padding=True, return_tensors="np")
    offset = json.load(open(os.path.join(out, "config.json")))["reward_offset"]
    with torch.no_grad():
        scores = (
            cls(input_ids=torch.tensor(enc["input_ids"]), attention_mask=torch.tensor(enc["attention_mask"]))
            .logits[:, 0]
            .numpy()
            + offset
        )
    batch_ids = np.where(enc["attention_mask"] > 0, enc["input_ids"], 0)
    seqs = (
        ("chosen_ids", batch_ids),
        ("chosen_mask", enc["attention_mask"]),
        ("rejected_ids", batch_ids),
        ("rejected_mask", enc["attention_mask"]),
    )
    batch = {k: jnp.asarray(v, jnp.int32) for k, v in seqs}
    raw, _ = pair_rewards(reward.config, reward.params, batch)
    np.testing.assert_allclose(scores, reward.normalize(np.asarray(raw)), atol=1e-4)

    # PPO: policy from the SFT model, reward (and value) from the RM; the export loads back.
    c = ppo_config.get_config("size=tiny")
    c.policy.init_from, c.reward.workdir, c.data.prompt_files = os.path.join(sft_dir, "hf"), rm_dir, prompt_file
    c.train.steps, c.train.batch_size, c.train.num_minibatches, c.train.ppo_epochs = 2, 8, 2, 1
    c.train.samples_every, c.train.save_every = 0, 10
    c.sampling.max_new_tokens = 8
    c.value.init = "policy_head"  # value head on the policy: one model less to compile
    ppo_dir = str(tmp_path / "ppo")
    metrics = run(c, ppo_dir)
    assert [m["step"] for m in metrics] == [1, 2] and finite(metrics)
    from ppo.export import export as ppo_export

    policy_dir = ppo_export(ppo_dir, str(tmp_path / "ppo_export"))
    pcfg, pparams = load_hf_checkpoint(policy_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    ours = np.asarray(Transformer(pcfg).apply({"params": pparams}, jnp.asarray(ids), jnp.asarray(mask)).logits)
    np.testing.assert_allclose(theirs[mask > 0], ours[mask > 0], atol=1e-4)
