"""Shapes, token pairs and the shared random-weight GPT-2 file of `benchmarks/rm_throughput.py`
(every framework's worker reads the same weights and batches from one folder)."""

from __future__ import annotations

import os
import time

import numpy as np

# pairs: preference pairs per optimizer step (2 x pairs sequences); steps: timed steps per run.
SHAPES = {
    "tiny": dict(layers=2, d_model=64, heads=4, seq=64, pairs=16, steps=30),
    "small": dict(layers=4, d_model=256, heads=4, seq=128, pairs=16, steps=5),
    # GPT-2 small (124M with GPT-2's vocabulary; 86M here with the benchmark's 1024-token vocabulary).
    "gpt2-small": dict(layers=12, d_model=768, heads=12, seq=256, pairs=4, steps=2),
    # A released Llama-family shape the issue measured first: SmolLM-135M (30 layers, d 576, 9 query and 3 KV
    # heads, SwiGLU 1536, tied embeddings over its 49,152-token vocabulary; 134.5M parameters).
    "smollm-135m": dict(
        family="llama", layers=30, d_model=576, heads=9, kv_heads=3, ffn=1536, vocab=49152, seq=256, pairs=4, steps=2
    ),
}
VOCAB = 1024
WARMUP_STEPS = 2  # steps run before timing (the first includes jit compilation for ours)
N_DISTINCT_BATCHES = 8  # batches cycled through; enough to defeat any caching, cheap to build
LEARNING_RATE = 1e-5
LENGTHS = ("full", "variable", "longtail")
# longtail: log-normal lengths, median max_length / 4, clipped to [LONGTAIL_MIN, max_length].
# With sigma 0.8 about 4% of sequences reach max_length (log 4 / 0.8 = 1.73 sigmas), close to the
# shape of public preference sets (e.g. Anthropic HH / UltraFeedback pairs cut at 512-1024 tokens:
# a median of a few hundred tokens and a long right tail).
LONGTAIL_SIGMA = 0.8
LONGTAIL_MIN = 8


def sequence_lengths(rng: np.random.Generator, n: int, seq: int, lengths: str) -> np.ndarray:
    """[n] lengths in [1, seq] for the --lengths setting (see the module docstring of rm_throughput)."""
    if lengths == "full":
        return np.full(n, seq)
    if lengths == "variable":
        return rng.integers(seq // 2, seq + 1, size=n)
    if lengths == "longtail":
        drawn = np.exp(rng.normal(np.log(seq / 4), LONGTAIL_SIGMA, size=n))
        return np.clip(np.round(drawn), LONGTAIL_MIN, seq).astype(np.int64)
    raise ValueError(f"--lengths must be one of {LENGTHS}, got {lengths!r}")


def make_pairs(seq: int, *, lengths: str, pairs_per_batch: int, seed: int = 0, vocab: int = VOCAB) -> dict:
    """N_DISTINCT_BATCHES * B right-padded pairs: ids/mask [N, T] int32 for chosen and rejected, ids uniform
    in [1, vocab)."""
    rng = np.random.default_rng(seed)
    n = N_DISTINCT_BATCHES * pairs_per_batch
    out = {}
    for side in ("chosen", "rejected"):
        ids = rng.integers(1, vocab, size=(n, seq)).astype(np.int32)  # [N, T], never the pad id 0
        lens = sequence_lengths(rng, n, seq, lengths)
        if lengths == "variable" and side == "chosen":
            lens[::pairs_per_batch] = seq  # one full row per batch keeps the padded width at T
        mask = (np.arange(seq)[None, :] < lens[:, None]).astype(np.int32)  # [N, T]
        out[f"{side}_ids"], out[f"{side}_mask"] = ids * mask, mask
    return out


def pairs_per_batch(pairs: dict) -> int:
    return pairs["chosen_ids"].shape[0] // N_DISTINCT_BATCHES


def batch_at(pairs: dict, step: int) -> dict:
    """Batch `step` (cycled) with the keys rm.data.train_batches yields."""
    b = pairs_per_batch(pairs)
    start = (step % N_DISTINCT_BATCHES) * b
    batch = {k: v[start : start + b] for k, v in pairs.items()}
    batch["margin"] = np.zeros(b, np.float32)
    return batch


def tokens_in(pairs: dict, first: int, count: int) -> int:
    """Non-pad tokens (chosen + rejected) of batches first .. first+count-1."""
    return sum(
        int(batch_at(pairs, s)["chosen_mask"].sum() + batch_at(pairs, s)["rejected_mask"].sum())
        for s in range(first, first + count)
    )


def now() -> tuple[float, float]:
    """(wall, process CPU) seconds. CPU time of all threads: with one thread it is the work done,
    whatever else runs on the machine; with more it also counts spin-waiting."""
    return time.perf_counter(), time.process_time()


def load_pairs(directory: str) -> dict:
    with np.load(os.path.join(directory, "pairs.npz")) as f:
        return {k: f[k] for k in f.files}


def worker_prepare(shape: dict, directory: str, lengths: str) -> dict:
    """Random-weight GPT2ForSequenceClassification or LlamaForSequenceClassification (shape["family"];
    safetensors) + the token pairs (npz)."""
    import torch
    import transformers

    torch.manual_seed(0)
    if shape.get("family") == "llama":
        return _save_prepared(
            transformers.AutoModelForSequenceClassification.from_config(llama_config(shape)), shape, directory, lengths
        )
    cfg = transformers.GPT2Config(
        vocab_size=shape_vocab(shape),
        n_positions=max(128, shape["seq"]),
        n_embd=shape["d_model"],
        n_layer=shape["layers"],
        n_head=shape["heads"],
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        num_labels=1,
    )
    return _save_prepared(transformers.AutoModelForSequenceClassification.from_config(cfg), shape, directory, lengths)


def llama_config(shape: dict):
    """transformers.LlamaConfig of a family="llama" shape (one scalar head, pad/bos/eos id 0, tied embeddings)."""
    import transformers

    return transformers.LlamaConfig(
        vocab_size=shape_vocab(shape),
        hidden_size=shape["d_model"],
        intermediate_size=shape["ffn"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=max(128, shape["seq"]),
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        num_labels=1,
    )


def shape_vocab(shape: dict) -> int:
    """The shape's vocabulary (token ids are drawn uniformly below it); VOCAB unless the shape names one."""
    return int(shape.get("vocab", VOCAB))


def _save_prepared(model, shape: dict, directory: str, lengths: str) -> dict:
    import torch

    with torch.no_grad():  # non-trivial biases and norms, as tests/hf_fixtures.py does
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln_" in name or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    pairs = make_pairs(shape["seq"], lengths=lengths, pairs_per_batch=shape["pairs"], vocab=shape_vocab(shape))
    np.savez(os.path.join(directory, "pairs.npz"), **pairs)
    return {"params": sum(p.numel() for p in model.parameters())}
