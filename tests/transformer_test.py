"""Parity of our transformer with Hugging Face PyTorch models, and checkpoint round trips."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from models import hf
from models.transformer import Transformer, init_cache
from tests.hf_fixtures import make_tiny_hf_model

FAMILIES = ["gpt2", "llama", "qwen2", "mistral"]


def padded_batch(padding_side, vocab=128, seed=0):
    rng = np.random.default_rng(seed)
    lengths = [10, 7, 4]
    t = 10
    ids = np.zeros((3, t), np.int64)
    mask = np.zeros((3, t), np.int64)
    for b, n in enumerate(lengths):
        sl = slice(0, n) if padding_side == "right" else slice(t - n, t)
        ids[b, sl] = rng.integers(1, vocab, n)
        mask[b, sl] = 1
    return ids, mask


def torch_logits(model, ids, mask):
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(pos),
            output_hidden_states=True,
        )
    return out.logits.numpy(), out.hidden_states[-1].numpy()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_logits_match_pytorch(tmp_path, family, padding_side):
    model = make_tiny_hf_model(family, str(tmp_path))
    config, params = hf.load_hf_checkpoint(str(tmp_path))
    assert config.family == family
    ids, mask = padded_batch(padding_side)
    ref_logits, ref_hidden = torch_logits(model, ids, mask)
    out = Transformer(config).apply({"params": params}, jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32))
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(out.logits)[real], ref_logits[real], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(np.asarray(out.hidden_states)[real], ref_hidden[real], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_save_roundtrip_loads_in_transformers(tmp_path, family):
    src = tmp_path / "src"
    model = make_tiny_hf_model(family, str(src), seed=3)
    config, params = hf.load_hf_checkpoint(str(src))
    dst = tmp_path / "dst"
    hf.save_hf_checkpoint(config, params, str(dst))
    import transformers

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(dst)).eval()
    ids, mask = padded_batch("right")
    a, _ = torch_logits(model, ids, mask)
    b, _ = torch_logits(reloaded, ids, mask)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_kv_cache_decode_matches_full_forward(tmp_path):
    make_tiny_hf_model("llama", str(tmp_path))
    config, params = hf.load_hf_checkpoint(str(tmp_path))
    model = Transformer(config)
    ids, mask = padded_batch("left")
    ids, mask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)
    full = model.apply({"params": params}, ids, mask).logits
    # Prefill the first 6 slots, then decode the remaining tokens one at a time.
    cache = init_cache(config, 3, 10)
    pos = jnp.maximum(jnp.cumsum(mask, -1) - 1, 0)
    out = model.apply({"params": params}, ids[:, :6], mask, positions=pos[:, :6], cache=cache, cache_index=0)
    cache, logits = out.cache, [out.logits]
    for t in range(6, 10):
        out = model.apply(
            {"params": params}, ids[:, t : t + 1], mask, positions=pos[:, t : t + 1], cache=cache, cache_index=t
        )
        cache = out.cache
        logits.append(out.logits)
    stepped = jnp.concatenate(logits, axis=1)
    real = np.asarray(mask).astype(bool)
    np.testing.assert_allclose(np.asarray(stepped)[real], np.asarray(full)[real], atol=1e-5)


def test_bf16_close_to_fp32(tmp_path):
    make_tiny_hf_model("llama", str(tmp_path))
    c32, p32 = hf.load_hf_checkpoint(str(tmp_path))
    c16, p16 = hf.load_hf_checkpoint(str(tmp_path), dtype="bfloat16", param_dtype="bfloat16")
    assert jax.tree.leaves(p16)[0].dtype == jnp.bfloat16
    ids, mask = padded_batch("right")
    a = Transformer(c32).apply({"params": p32}, ids, mask).logits
    b = Transformer(c16).apply({"params": p16}, ids, mask).logits
    real = mask.astype(bool)
    assert np.max(np.abs(np.asarray(a)[real] - np.asarray(b)[real])) < 0.1


def test_pickle_only_folder_is_refused(tmp_path):
    model = make_tiny_hf_model("gpt2", str(tmp_path / "m"))
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((tmp_path / "m" / "config.json").read_text())
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickle"):
        hf.load_hf_checkpoint(str(folder))


def test_unsupported_model_type(tmp_path):
    make_tiny_hf_model("gpt2", str(tmp_path))
    import json

    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "bert"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported model_type 'bert'.*gpt2, llama, qwen2, mistral"):
        hf.load_hf_checkpoint(str(tmp_path))


def test_sharded_checkpoint(tmp_path):
    model = make_tiny_hf_model("llama", str(tmp_path / "full"))
    model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="20KB")
    assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
    c1, p1 = hf.load_hf_checkpoint(str(tmp_path / "full"))
    c2, p2 = hf.load_hf_checkpoint(str(tmp_path / "sharded"))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), p1, p2)
