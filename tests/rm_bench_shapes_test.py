"""benchmarks/rm_throughput.py's model preparation: the Llama-family shape (SmolLM-135M's layout, tiny here)
gives our reward model and PyTorch's LlamaForSequenceClassification the same rewards, so the benchmark times
the same computation on both sides; and token ids stay below the shape's own vocabulary."""

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from benchmarks._rm_bench import SHAPES, batch_at, llama_config, load_pairs, shape_vocab, worker_prepare
from models.hf import load_hf_checkpoint
from rm.model import compute_rewards, rm_params_from_backbone

TINY_LLAMA = dict(
    family="llama", layers=2, d_model=64, heads=4, kv_heads=2, ffn=96, vocab=300, seq=16, pairs=2, steps=1
)


def test_released_llama_shape_has_smollm_135m_parameter_count():
    """The benchmark's smollm-135m config, built on the meta device, has SmolLM-135M's parameters, counted by
    hand: embeddings 49,152 x 576; per layer q/o 576 x 576, k/v 576 x 192, gate/up/down 576 x 1536, two norms;
    a final norm; plus the scalar head (576)."""
    per_layer = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576
    want = 49152 * 576 + 30 * per_layer + 576 + 576
    assert want - 576 == 134_515_008  # the causal LM's published count (tied embeddings)
    with torch.device("meta"):
        model = transformers.AutoModelForSequenceClassification.from_config(llama_config(SHAPES["smollm-135m"]))
    assert sum(p.numel() for p in model.parameters()) == want
    assert shape_vocab(SHAPES["small"]) == 1024  # the GPT-2 shapes keep the benchmark's vocabulary


def test_llama_shape_rewards_match_pytorch(tmp_path):
    info = worker_prepare(TINY_LLAMA, str(tmp_path), "longtail")
    torch_model = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path)).eval()
    assert info["params"] == sum(p.numel() for p in torch_model.parameters())
    assert isinstance(torch_model, transformers.LlamaForSequenceClassification)
    assert torch_model.config.tie_word_embeddings and torch_model.config.num_key_value_heads == 2

    pairs = load_pairs(str(tmp_path))
    assert pairs["chosen_ids"].max() < TINY_LLAMA["vocab"] and pairs["chosen_ids"].max() >= 100
    batch = batch_at(pairs, 0)
    ids = np.concatenate([batch["chosen_ids"], batch["rejected_ids"]])  # [2B, T], right-padded with 0
    mask = np.concatenate([batch["chosen_mask"], batch["rejected_mask"]])
    assert (mask.sum(1) < ids.shape[1]).any()  # long-tailed lengths: some rows are padded

    config, backbone, leftovers = load_hf_checkpoint(str(tmp_path), with_leftovers=True)
    params = rm_params_from_backbone(config, backbone, jax.random.key(0))
    # The benchmark's head: HF's score weight, no bias.
    params["head"] = {"kernel": jnp.asarray(leftovers["score.weight"], jnp.float32).T, "bias": jnp.zeros((1,))}
    ours = np.asarray(compute_rewards(config, params, jnp.asarray(ids), jnp.asarray(mask)))
    with torch.no_grad():
        want = torch_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits[:, 0].numpy()
    np.testing.assert_allclose(ours, want, rtol=1e-4, atol=1e-4)
    assert np.ptp(want) > 1e-3  # the rewards differ between rows, so the comparison is not trivial
