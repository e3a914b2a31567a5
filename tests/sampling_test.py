"""Generation: greedy parity with Hugging Face `generate`, EOS/stop handling, log-probs against a
PyTorch forward pass, reproducibility, and the top-k / top-p filters against NumPy references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from models import hf
from models.sampling import generate, sample_logits, top_k_filter, top_p_filter
from tests.hf_fixtures import make_tiny_hf_model

VOCAB = 128
P, N = 8, 10
NO_EOS = -1  # token ids are never negative, so this never stops a row


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny(request, tmp_path_factory):
    """(family, torch model, config, params). initializer_range 0.2 gives peaked, varied logits."""
    path = str(tmp_path_factory.mktemp(request.param))
    model = make_tiny_hf_model(request.param, path, vocab_size=VOCAB, initializer_range=0.2)
    config, params = hf.load_hf_checkpoint(path)
    return request.param, model, config, params


def left_padded_prompts(lengths=(8, 5, 3), seed=0):
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), P), np.int64)
    mask = np.zeros((len(lengths), P), np.int64)
    for row, n in enumerate(lengths):
        ids[row, P - n :] = rng.integers(1, VOCAB, n)
        mask[row, P - n :] = 1
    return ids, mask


def torch_logprobs(model, sequences, mask, temperature=1.0):
    """log_softmax(logits / T) of the full sequences from the PyTorch model. [B, L, V]."""
    pos = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        logits = model(
            input_ids=torch.tensor(sequences, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            position_ids=torch.tensor(pos, dtype=torch.long),
        ).logits
    return torch.log_softmax(logits / temperature, -1).numpy()


def test_greedy_matches_hf_generate(tiny):
    family, model, config, params = tiny
    ids, mask = left_padded_prompts()
    out = generate(params, config, ids, mask, jax.random.key(0), max_new_tokens=N, greedy=True, eos_token_id=NO_EOS)
    ours = np.asarray(out.response_ids)
    # An EOS id that our run never emits; if HF emitted it anyway the comparison below fails.
    eos = next(i for i in range(1, VOCAB) if i not in set(ours.ravel().tolist()))
    with torch.no_grad():
        ref = model.generate(
            torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            do_sample=False,
            max_new_tokens=N,
            pad_token_id=0,
            eos_token_id=eos,
        ).numpy()
    np.testing.assert_array_equal(ref[:, :P], ids)
    np.testing.assert_array_equal(ours, ref[:, P:], err_msg=family)
    assert len(set(ours.ravel().tolist())) > 5  # the comparison is not trivially constant
    np.testing.assert_array_equal(np.asarray(out.sequences), ref)
    np.testing.assert_array_equal(np.asarray(out.response_mask), np.ones((3, N)))
    np.testing.assert_array_equal(np.asarray(out.response_lengths), [N] * 3)
    assert not np.asarray(out.ended_with_eos).any()
    # Greedy log-probs (temperature 1) are the model's log-probs of the chosen tokens.
    full_mask = np.concatenate([mask, np.ones((3, N), np.int64)], 1)
    ref_lp = torch_logprobs(model, ref, full_mask)[:, P - 1 : -1]  # position P-1+t predicts token t
    np.testing.assert_allclose(
        np.asarray(out.logprobs), np.take_along_axis(ref_lp, ours[..., None], -1)[..., 0], atol=1e-4
    )


def expected_after_stop(tokens, stop_ids, pad):
    """NumPy reference: cut each row of a no-EOS greedy run after its first stop token."""
    ids, lengths, ended = tokens.copy(), [], []
    for row in range(len(tokens)):
        hits = np.flatnonzero(np.isin(tokens[row], stop_ids))
        n = hits[0] + 1 if len(hits) else tokens.shape[1]
        ids[row, n:] = pad
        lengths.append(n)
        ended.append(bool(len(hits)))
    mask = (np.arange(tokens.shape[1])[None] < np.asarray(lengths)[:, None]).astype(int)
    return ids, mask, np.asarray(lengths), np.asarray(ended)


def test_eos_and_stop_tokens(tiny):
    family, _, config, params = tiny
    ids, mask = left_padded_prompts()
    free = generate(params, config, ids, mask, None, max_new_tokens=N, greedy=True, eos_token_id=NO_EOS)
    tokens = np.asarray(free.response_ids)
    eos = int(tokens[0, 3])  # row 0 stops at step 3 at the latest
    pad = config.pad_token_id
    for kwargs in (dict(eos_token_id=eos), dict(eos_token_id=NO_EOS, stop_token_ids=[eos])):
        out = generate(params, config, ids, mask, None, max_new_tokens=N, greedy=True, **kwargs)
        want_ids, want_mask, want_len, want_ended = expected_after_stop(tokens, [eos], pad)
        assert want_len[0] <= 4 and want_ended[0]
        np.testing.assert_array_equal(np.asarray(out.response_ids), want_ids, err_msg=f"{family} {kwargs}")
        np.testing.assert_array_equal(np.asarray(out.response_mask), want_mask)
        np.testing.assert_array_equal(np.asarray(out.response_lengths), want_len)
        np.testing.assert_array_equal(np.asarray(out.ended_with_eos), want_ended)
        lp = np.asarray(out.logprobs)
        np.testing.assert_array_equal(lp[want_mask == 0], 0.0)
        np.testing.assert_allclose(lp[want_mask == 1], np.asarray(free.logprobs)[want_mask == 1], atol=1e-5)
        np.testing.assert_array_equal(np.asarray(out.sequences)[:, P:], want_ids)
    # Every row stops (row 0's prompt thrice): the loop exits early and the tail is still padding.
    out = generate(
        params,
        config,
        ids[:1].repeat(3, 0),
        mask[:1].repeat(3, 0),
        None,
        max_new_tokens=N,
        greedy=True,
        eos_token_id=eos,
    )
    want_ids, _, want_len, _ = expected_after_stop(tokens[:1].repeat(3, 0), [eos], pad)
    np.testing.assert_array_equal(np.asarray(out.response_ids), want_ids)
    np.testing.assert_array_equal(np.asarray(out.response_lengths), want_len)


def test_sampling_logprobs_and_reproducibility(tiny):
    family, model, config, params = tiny
    ids, mask = left_padded_prompts()
    kw = dict(max_new_tokens=N, temperature=0.7, top_k=5, eos_token_id=NO_EOS)
    a = generate(params, config, ids, mask, jax.random.key(1), **kw)
    b = generate(params, config, ids, mask, jax.random.key(1), **kw)
    c = generate(params, config, ids, mask, jax.random.key(2), **kw)
    np.testing.assert_array_equal(np.asarray(a.response_ids), np.asarray(b.response_ids))
    assert (np.asarray(a.response_ids) != np.asarray(c.response_ids)).any()
    # Log-probs: tempered, unfiltered distribution of a PyTorch forward over the sampled sequence.
    seq = np.asarray(a.sequences)
    full_mask = np.concatenate([mask, np.ones((3, N), np.int64)], 1)
    ref_lp = torch_logprobs(model, seq, full_mask, temperature=0.7)[:, P - 1 : -1]  # [B, N, V]
    tokens = seq[:, P:]
    np.testing.assert_allclose(
        np.asarray(a.logprobs), np.take_along_axis(ref_lp, tokens[..., None], -1)[..., 0], atol=1e-4
    )
    # Every sampled token is inside the top 5 of its step.
    rank = (ref_lp > np.take_along_axis(ref_lp, tokens[..., None], -1)).sum(-1)
    assert rank.max() < 5
    # top_k=1 sampling is greedy.
    g = generate(params, config, ids, mask, None, max_new_tokens=N, greedy=True, eos_token_id=NO_EOS)
    k1 = generate(params, config, ids, mask, jax.random.key(3), max_new_tokens=N, top_k=1, eos_token_id=NO_EOS)
    np.testing.assert_array_equal(np.asarray(k1.response_ids), np.asarray(g.response_ids))


def test_bfloat16_generation(tmp_path):
    model = make_tiny_hf_model("llama", str(tmp_path), vocab_size=VOCAB, initializer_range=0.2)
    config, params = hf.load_hf_checkpoint(str(tmp_path), dtype="bfloat16", param_dtype="bfloat16")
    ids, mask = left_padded_prompts()
    out = generate(params, config, ids, mask, None, max_new_tokens=N, greedy=True, eos_token_id=NO_EOS)
    # Each bf16 greedy token is (near-)argmax of the fp32 PyTorch model given the same prefix.
    seq = np.asarray(out.sequences)
    ref_lp = torch_logprobs(model, seq, np.concatenate([mask, np.ones((3, N), np.int64)], 1))[:, P - 1 : -1]
    chosen = np.take_along_axis(ref_lp, seq[:, P:, None], -1)[..., 0]
    assert (ref_lp.max(-1) - chosen).max() < 0.15
    np.testing.assert_allclose(np.asarray(out.logprobs), chosen, atol=0.15)


def test_one_token_prompts_match_padded(tiny):
    """P = 1 skips the prefill pass; it must match the same token left-padded to P = 3."""
    _, _, config, params = tiny
    ids = np.array([[0, 0, 5], [0, 0, 77]])
    mask = np.array([[0, 0, 1], [0, 0, 1]])
    kw = dict(max_new_tokens=4, greedy=True, eos_token_id=NO_EOS)
    padded = generate(params, config, ids, mask, None, **kw)
    single = generate(params, config, ids[:, -1:], mask[:, -1:], None, **kw)
    np.testing.assert_array_equal(np.asarray(single.response_ids), np.asarray(padded.response_ids))
    np.testing.assert_allclose(np.asarray(single.logprobs), np.asarray(padded.logprobs), atol=1e-5)


def test_rejects_right_padding(tiny):
    _, _, config, params = tiny
    ids, mask = left_padded_prompts()
    with pytest.raises(ValueError, match="row 1 is not left-padded"):
        generate(params, config, ids, mask[:, ::-1], None, max_new_tokens=2, greedy=True)


# ----------------------------------------------------------------------------- filters (no model)


def np_top_p_keep(logits, p):
    """Reference nucleus: sort descending, add tokens until the kept mass reaches p."""
    keep = np.zeros(logits.shape, bool)
    for row, x in enumerate(logits):
        probs = np.exp(x - x.max())
        probs /= probs.sum()
        mass = 0.0
        for i in np.argsort(-x):
            keep[row, i] = True
            mass += probs[i]
            if mass >= p:
                break
    return keep


def test_top_p_and_top_k_filters_match_numpy():
    logits = np.random.default_rng(0).normal(size=(6, 12)).astype(np.float32) * 2
    for p in (0.05, 0.3, 0.5, 0.9, 0.999):
        got = np.isfinite(np.asarray(top_p_filter(jnp.asarray(logits), p=p)))
        np.testing.assert_array_equal(got, np_top_p_keep(logits, p), err_msg=f"p={p}")
    assert np.isfinite(np.asarray(top_p_filter(jnp.asarray(logits), p=1.0))).all()
    for k in (1, 3, 11):
        got = np.isfinite(np.asarray(top_k_filter(jnp.asarray(logits), k=k)))
        want = logits >= np.sort(logits, -1)[:, -k][:, None]
        np.testing.assert_array_equal(got, want)
        np.testing.assert_array_equal(got.sum(-1), k)
    kept = np.asarray(top_p_filter(jnp.asarray(logits), p=0.5))
    np.testing.assert_array_equal(kept[np.isfinite(kept)], logits[np.isfinite(kept)])  # values untouched


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 0.7), (0.5, 0, 1.0), (1.0, 3, 1.0), (2.0, 3, 0.9)])
def test_sampled_frequencies(temperature, top_k, top_p):
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    draws = 40000
    logits = jnp.log(jnp.asarray(np.tile(probs, (draws, 1)), jnp.float32))
    draw = jax.jit(functools.partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p))
    tokens, logprobs = draw(logits, jax.random.key(0))
    # Reference: temper, keep top-k, then the nucleus of the renormalised top-k, renormalise.
    want = probs ** (1 / temperature)
    want /= want.sum()
    if top_k:
        want[np.argsort(-want)[top_k:]] = 0
        want /= want.sum()
    want *= np_top_p_keep(np.log(want + 1e-30)[None], top_p)[0]
    want /= want.sum()
    freq = np.bincount(np.asarray(tokens), minlength=4) / draws
    np.testing.assert_allclose(freq, want, atol=0.01)
    # Log-probs are those of the tempered distribution before filtering.
    tempered = probs ** (1 / temperature) / (probs ** (1 / temperature)).sum()
    np.testing.assert_allclose(np.asarray(logprobs), np.log(tempered)[np.asarray(tokens)], rtol=1e-5)


def test_draws_follow_a_many_block_distribution():
    """Inverse-CDF draws over V=300 (several blocks, zero-weight tokens) match the probabilities."""
    rng = np.random.default_rng(1)
    logits = rng.normal(size=300).astype(np.float32) * 1.5
    logits[rng.choice(300, 60, replace=False)] = -np.inf  # filtered tokens: never drawn
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    draws = 60000
    tokens, _ = jax.jit(sample_logits)(jnp.asarray(np.tile(logits, (draws, 1))), jax.random.key(5))
    freq = np.bincount(np.asarray(tokens), minlength=300) / draws
    assert freq[probs == 0].sum() == 0
    assert (np.abs(freq - probs) <= 5 * np.sqrt(probs * (1 - probs) / draws) + 2e-4).all()


def test_tied_head_unlaid_path_matches(tiny, monkeypatch):
    """Off XLA:CPU a tied head is not copied to [d, V] before decoding: that path (forced here) gives the
    CPU path's greedy tokens and log-probs."""
    from models import sampling

    family, model, config, params = tiny
    ids, mask = left_padded_prompts()
    kw = dict(max_new_tokens=N, temperature=0.7, eos_token_id=NO_EOS)
    laid_out = generate(params, config, ids, mask, jax.random.key(4), **kw)
    monkeypatch.setattr(sampling, "_lay_out_tied_head", lambda: False)
    sampling._build_generate_fn.cache_clear()
    try:
        unlaid = generate(params, config, ids, mask, jax.random.key(4), **kw)
    finally:
        sampling._build_generate_fn.cache_clear()
    np.testing.assert_array_equal(np.asarray(unlaid.response_ids), np.asarray(laid_out.response_ids))
    np.testing.assert_allclose(np.asarray(unlaid.logprobs), np.asarray(laid_out.logprobs), atol=1e-5)
