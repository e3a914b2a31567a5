"""The families qwen3, gemma2, gemma3_text, gpt_neox (Pythia) and phi3 against transformers'
PyTorch models: logits (fp32, left and right padding) with each family's distinctive features
switched on, save -> transformers load round trips with HF's exact tensor names, greedy
generation token for token, LoRA / int8 / remat / sharding rules, and the reward-model export.
Tiny shapes (2 layers, d 64, vocab 128-300)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

from models import hf
from models.heads import ScalarHead, gather_last
from models.lora import add_lora_params
from models.quant import quantize_params
from models.sampling import generate
from models.sharding import logical_axes
from models.transformer import Transformer
from tests.hf_fixtures import make_tiny_hf_model
from tests.transformer_test import padded_batch, torch_logits

NEW = ["qwen3", "gemma2", "gemma3_text", "gpt_neox", "phi3"]
VARIANTS = {f: (f, {}) for f in NEW}
VARIANTS["gpt_neox_sequential"] = ("gpt_neox", dict(use_parallel_residual=False))
# Config changes that switch a distinctive feature off: each must move the logits, so the
# parity check above them would catch the feature being ignored.
FEATURES = {
    "qwen3": dict(qk_norm=False, sliding_window=None),
    "gemma2": dict(attn_softcap=None, final_softcap=None, query_pre_attn_scalar=None, sliding_window=None),
    "gemma3_text": dict(rope_local_theta=None, rope_scaling=None, qk_norm=False, sliding_window=None),
    "gpt_neox": dict(parallel_residual=False, rotary_pct=1.0),
    "gpt_neox_sequential": dict(parallel_residual=True),
    "phi3": dict(rope_scaling=None, sliding_window=None),
}


def ours(config, params, ids, mask, **kw):
    return Transformer(config).apply(
        {"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32), **kw
    )


def tensor_names(folder):
    with safe_open(os.path.join(folder, "model.safetensors"), framework="numpy") as f:
        return set(f.keys())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_pytorch_and_save_roundtrips(tmp_path, variant):
    family, overrides = VARIANTS[variant]
    src = str(tmp_path / "src")
    model = make_tiny_hf_model(family, src, **overrides)
    config, params = hf.load_hf_checkpoint(src)
    assert config.family == family
    for side in ("left", "right"):
        ids, mask = padded_batch(side)
        ref_logits, ref_hidden = torch_logits(model, ids, mask)
        out = ours(config, params, ids, mask)
        real = mask.astype(bool)
        np.testing.assert_allclose(np.asarray(out.logits)[real], ref_logits[real], atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(np.asarray(out.hidden_states)[real], ref_hidden[real], atol=1e-4, rtol=1e-4)
        # The blockwise attention core gets the same per-layer window, scale and soft-cap.
        chunked = ours(config.replace(attention="chunked"), params, ids, mask)
        np.testing.assert_allclose(np.asarray(chunked.logits)[real], ref_logits[real], atol=1e-4, rtol=1e-4)
    if family == "phi3":  # 6 tokens stay within original_max_position_embeddings=8: longrope's short factors
        ids, mask = ids[:, :6], mask[:, :6]
        ref_logits, _ = torch_logits(model, ids, mask)
        real = mask.astype(bool)
        np.testing.assert_allclose(
            np.asarray(ours(config, params, ids, mask).logits)[real], ref_logits[real], atol=1e-4, rtol=1e-4
        )
    ids, mask = padded_batch("left")
    base = np.asarray(ours(config, params, ids, mask).logits)[mask.astype(bool)]
    for key, value in FEATURES[variant].items():
        off = np.asarray(ours(config.replace(**{key: value}), params, ids, mask).logits)[mask.astype(bool)]
        assert np.abs(off - base).max() > 3e-4, f"{variant}: {key}={value} leaves the logits unchanged"

    dst = str(tmp_path / "dst")
    hf.save_hf_checkpoint(config, params, dst)
    names = {n.replace("embed_out.", "lm_head.") for n in tensor_names(dst)}
    assert names == {n.replace("embed_out.", "lm_head.") for n in tensor_names(src)}  # fused layouts included
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(dst).eval()
    assert type(reloaded) is type(model)
    for side in ("left", "right"):
        ids, mask = padded_batch(side)
        np.testing.assert_allclose(torch_logits(reloaded, ids, mask)[0], torch_logits(model, ids, mask)[0], atol=1e-6)
    assert hf.config_from_hf(json.load(open(os.path.join(dst, "config.json")))) == config


@pytest.mark.parametrize("family", ["qwen3", "gemma2", "gemma3_text", "gpt_neox"])
def test_greedy_generation_matches_hf_generate(tmp_path, family):
    p, n, vocab = 8, 8, 128
    # Larger weights give peaked, varied logits, except for Gemma, whose tied embeddings scaled by
    # sqrt(d) then make every row repeat its last prompt token.
    init = dict(initializer_range=0.2) if family in ("qwen3", "gpt_neox") else {}
    model = make_tiny_hf_model(family, str(tmp_path), vocab_size=vocab, **init)
    config, params = hf.load_hf_checkpoint(str(tmp_path))
    rng = np.random.default_rng(1)
    ids, mask = np.zeros((3, p), np.int64), np.zeros((3, p), np.int64)
    for row, length in enumerate((8, 5, 2)):
        ids[row, p - length :] = rng.integers(1, vocab, length)
        mask[row, p - length :] = 1
    out = generate(params, config, ids, mask, None, max_new_tokens=n, greedy=True, eos_token_id=-1)
    tokens = np.asarray(out.response_ids)
    eos = next(i for i in range(1, vocab) if i not in set(tokens.ravel().tolist()))  # never emitted by us
    with torch.no_grad():
        ref = model.generate(
            torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            do_sample=False,
            max_new_tokens=n,
            pad_token_id=0,
            eos_token_id=eos,
        ).numpy()
    np.testing.assert_array_equal(tokens, ref[:, p:], err_msg=family)
    assert len(set(tokens.ravel().tolist())) > 4  # not trivially constant


@pytest.mark.parametrize("family", NEW)
def test_lora_int8_remat_and_sharding_rules(tmp_path, family):
    make_tiny_hf_model(family, str(tmp_path))
    config, params = hf.load_hf_checkpoint(str(tmp_path))
    ids, mask = padded_batch("left")
    base = ours(config, params, ids, mask).logits
    # LoRA targets may use the family's HF names (fused GPT-NeoX / Phi-3 projections).
    targets = {"gpt_neox": ("query_key_value", "dense_4h_to_h"), "phi3": ("qkv_proj", "gate_up_proj")}.get(
        family, ("q_proj", "v_proj", "down_proj")
    )
    lcfg = config.replace(lora_rank=2, lora_targets=targets)
    assert set(lcfg.lora_targets) <= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    lparams = add_lora_params(params, lcfg, jax.random.key(0))
    np.testing.assert_allclose(ours(lcfg, lparams, ids, mask).logits, base, atol=1e-6)  # B = 0: a no-op
    n_adapted = sum(1 for path, _ in jax.tree_util.tree_leaves_with_path(lparams) if "lora_a" in str(path))
    assert n_adapted == 2 * len(lcfg.lora_targets)
    qparams, qcfg = quantize_params(params, config)
    qlogits = np.asarray(ours(qcfg, qparams, ids, mask).logits)
    err = np.abs(qlogits - np.asarray(base))[mask.astype(bool)].max()
    assert 0 < err < 0.05 * np.abs(np.asarray(base)).max(), err
    # remat wraps whole blocks: checked on the two block layouts that differ most from llama's
    # (Gemma 3's sandwich norms, q/k norms and local RoPE; NeoX's parallel residual), since
    # eager gradients cost ~10 s of CPU per family.
    if family in ("gemma3_text", "gpt_neox"):

        def loss(p, cfg):
            return jnp.mean(ours(cfg, p, ids, mask).logits ** 2)

        g, g_remat = jax.grad(loss)(params, config), jax.grad(loss)(params, config.replace(remat=True))
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_remat)):
            np.testing.assert_allclose(a, b, atol=1e-6)
    # Sharding: every projection matrix gets (in, out) axes; norms (q/k norms, Gemma's post norms)
    # are replicated.
    for path, leaf in jax.tree_util.tree_leaves_with_path(lparams):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        axes = logical_axes(name, leaf.shape)
        if "_proj/kernel" in name:
            assert None not in axes, (name, axes)
        if "norm" in name:
            assert axes == (None,) * leaf.ndim, (name, axes)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from tests.fixtures import make_tiny_tokenizer

    return make_tiny_tokenizer(str(tmp_path_factory.mktemp("tok")), vocab_size=300)


@pytest.mark.parametrize("family", NEW)
def test_rm_export_scores_match_pytorch(tmp_path, tokenizer_dir, family):
    from common import data_io
    from rm.export import write_sequence_classifier
    from rm.model import load_reward_model
    from rm.train import pair_rewards

    tok = data_io.load_tokenizer(tokenizer_dir)
    make_tiny_hf_model(
        family, str(tmp_path / "src"), vocab_size=len(tok), eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    config, backbone = hf.load_hf_checkpoint(str(tmp_path / "src"))
    backbone = {k: v for k, v in backbone.items() if k != "lm_head"}
    head = ScalarHead().init(jax.random.key(1), jnp.zeros((1, config.d_model)))["params"]
    head = {"kernel": head["kernel"], "bias": jnp.asarray([0.7])}
    gain, bias = 1.7, -0.4
    out = write_sequence_classifier(
        config,
        {"backbone": backbone, "head": head},
        tok,
        str(tmp_path / "rm"),
        gain=gain,
        bias=bias,
        normalize=True,
        source=str(tmp_path),
    )
    texts = ["The cat sat on the mat.", "A reward model scores a response", "Good morning!"]
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    offset = json.load(open(os.path.join(out, "config.json")))["reward_offset"]
    if config.uses_layernorm:
        assert offset == 0.0  # folded into the final LayerNorm's bias
    for side in ("left", "right"):
        hf_tok.padding_side = side
        enc = hf_tok(texts, padding=True, return_tensors="np")
        with torch.no_grad():
            theirs = (
                model(input_ids=torch.tensor(enc["input_ids"]), attention_mask=torch.tensor(enc["attention_mask"]))
                .logits[:, 0]
                .numpy()
                + offset
            )
        ids = np.where(enc["attention_mask"] > 0, enc["input_ids"], 0)  # the export's new pad id is beyond our vocab
        hidden = ours(config, backbone, ids, enc["attention_mask"], return_logits=False).hidden_states
        raw = ScalarHead().apply({"params": head}, gather_last(hidden, jnp.asarray(enc["attention_mask"])))
        np.testing.assert_allclose(theirs, gain * np.asarray(raw) + bias, atol=1e-4, err_msg=f"{family} {side}")
        # The exported folder is itself a reward model for PPO (reward.init_from): same scores.
        ids, m = jnp.asarray(enc["input_ids"], jnp.int32), jnp.asarray(enc["attention_mask"], jnp.int32)
        batch = {"chosen_ids": ids, "chosen_mask": m, "rejected_ids": ids, "rejected_mask": m}
        reloaded = load_reward_model(out)
        np.testing.assert_allclose(
            np.asarray(pair_rewards(reloaded.config, reloaded.params, batch)[0]), theirs, atol=1e-4
        )
