"""`rm.export --peft_adapter`: a LoRA reward model's adapters alone, in PEFT's SEQ_CLS format.

PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(init_from,
num_labels=1, pad_token_id=P), DIR) + reward_model.json's reward_offset must give rm.score's
normalised scores (tolerance 1e-4), for gpt2 (constant folded into ln_f, carried in
modules_to_save) and llama (constant as reward_offset), with a tokenizer that pads with EOS (the
export adds a distinct pad into a spare embedding row; without a spare row it refuses).
"""

import json
import os

import numpy as np
import pytest

import configs.rm as rm_config
from common import data_io
from rm import export as rm_export
from rm import score as rm_score
from rm.train import train as rm_train
from tests.fixtures import make_tiny_tokenizer
from tests.hf_fixtures import make_tiny_hf_model
from tests.rm_data_gen import corpus, make_rows, write_jsonl


def _lora_rm(tmp_path, family):
    from transformers import AutoTokenizer

    tok_dir = make_tiny_tokenizer(str(tmp_path / "tok"), texts=corpus(), vocab_size=300)  # pad == eos
    tok = AutoTokenizer.from_pretrained(tok_dir)
    hf = str(tmp_path / "hf")
    # 4 spare embedding rows (as real vocabularies padded to a multiple of 64/128 have)
    make_tiny_hf_model(
        family,
        hf,
        seed=3,
        tokenizer_dir=tok_dir,
        vocab_size=len(tok) + 4,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    c = rm_config.get_config("size=tiny")
    c.model.init_from = hf
    c.data.train_files = write_jsonl(tmp_path / "train.jsonl", make_rows(32, 0))
    c.data.eval_files = write_jsonl(tmp_path / "eval.jsonl", make_rows(8, 1))
    c.model.lora_rank, c.model.lora_alpha = 4, 8.0
    c.model.lora_targets = ("q_proj", "v_proj", "o_proj") if family == "gpt2" else ("q_proj", "k_proj", "down_proj")
    c.train.steps, c.train.eval_every, c.train.learning_rate, c.train.warmup_steps = 4, 0, 2e-2, 1
    workdir = str(tmp_path / "rm")
    rm_train(c, workdir)
    return workdir, hf


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_rm_peft_adapter_matches_rm_score(tmp_path, family):
    import peft
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    workdir, hf = _lora_rm(tmp_path, family)
    out = str(tmp_path / "adapter")
    rm_export.main(["--workdir", workdir, "--out", out, "--peft_adapter"])
    assert {
        "adapter_config.json",
        "adapter_model.safetensors",
        "reward_model.json",
        "README.md",
        "tokenizer.json",
    } <= set(os.listdir(out))
    info = json.load(open(os.path.join(out, "reward_model.json")))
    assert info["base_model"] == os.path.abspath(hf) and info["reward_normalization"]["applied"]
    from safetensors import safe_open

    with safe_open(os.path.join(out, "adapter_model.safetensors"), "np") as f:
        keys = set(f.keys())
    assert "base_model.model.score.weight" in keys
    assert ("base_model.model.transformer.ln_f.bias" in keys) == (family == "gpt2")
    assert (info["reward_offset"] == 0.0) == (family == "gpt2")

    texts = [r["prompt"] + r["chosen"] for r in make_rows(6, 5)]
    texts[1] = texts[1] + " the film the film was"  # different lengths: padding is exercised
    data = write_jsonl(tmp_path / "texts.jsonl", [{"text": t} for t in texts])
    rm_score.main(["--workdir", workdir, "--data", data, "--out", str(tmp_path / "s.jsonl")])
    ours = np.array([json.loads(line)["score"] for line in open(tmp_path / "s.jsonl")])

    base = AutoModelForSequenceClassification.from_pretrained(
        hf, num_labels=1, pad_token_id=info["pad_token_id"], dtype=torch.float32
    )
    model = peft.PeftModel.from_pretrained(base, out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.pad_token_id == info["pad_token_id"] != tokenizer.eos_token_id
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        theirs = model(**batch).logits[:, 0].numpy() + info["reward_offset"]
        for module in model.modules():  # the adapters matter: the same head without them differs
            if isinstance(getattr(module, "scaling", None), dict):
                module.scaling["default"] = 0.0
        no_lora = model(**batch).logits[:, 0].numpy() + info["reward_offset"]
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)
    assert np.ptp(ours) > 1e-2 and np.abs(no_lora - ours).max() > 1e-3
    print(
        family,
        "max |peft - rm.score|",
        float(np.abs(theirs - ours).max()),
        "score range",
        float(np.ptp(ours)),
        "without adapters max diff",
        float(np.abs(no_lora - ours).max()),
    )
    if family == "gpt2":  # no spare row left once the tokenizer is one token longer: refused, by name
        real = data_io.load_tokenizer

        def longer(path):
            tok = real(path)
            tok.add_tokens([f"extra{i}" for i in range(4)])
            return tok

        data_io.load_tokenizer = longer
        try:
            with pytest.raises(SystemExit) as exc:
                rm_export.main(["--workdir", workdir, "--out", str(tmp_path / "refused"), "--peft_adapter"])
            assert exc.value.code == 2
        finally:
            data_io.load_tokenizer = real
        assert not os.path.exists(tmp_path / "refused")
