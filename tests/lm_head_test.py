"""Chunked log-probs, entropies and SFT loss (models/lm_head.py) equal the full-logits ones
(values and gradients), and the PPO loss's gradient holds no [B, T, V] float32 buffer."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.lm_head import chunked_token_stats, next_token_nll_from_hidden
from models.transformer import Transformer, TransformerConfig, init_params
from ppo import losses as L
from sft.train import next_token_nll

B, T, D, V = 2, 13, 16, 50


def _full_logits(hidden, kernel, temperature, softcap):
    logits = hidden @ kernel
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    return logits / temperature


@pytest.mark.parametrize("chunk,temperature,softcap", [(4, 1.0, None), (5, 0.7, None), (13, 1.3, 3.0), (1, 1.0, 2.0)])
def test_chunked_stats_equal_full_logits(chunk, temperature, softcap):
    kh, kk, kt = jax.random.split(jax.random.key(0), 3)
    hidden = jax.random.normal(kh, (B, T, D))
    kernel = jax.random.normal(kk, (D, V)) * 0.5
    tokens = jax.random.randint(kt, (B, T), 0, V)

    def chunked(hidden, kernel):
        s = chunked_token_stats(
            hidden=hidden,
            kernel=kernel,
            tokens=tokens,
            temperature=temperature,
            final_softcap=softcap,
            chunk=chunk,
            with_entropy=True,
        )
        return s["logprobs"], s["entropy"]

    def full(hidden, kernel):
        logits = _full_logits(hidden, kernel, temperature, softcap)
        return L.logprobs_from_logits(logits, tokens), L.entropy_from_logits(logits)

    for a, b in zip(chunked(hidden, kernel), full(hidden, kernel)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    # An independent reference: log_softmax in float64 NumPy.
    logits64 = np.asarray(_full_logits(hidden, kernel, temperature, softcap), np.float64)
    logp64 = (
        logits64
        - np.log(np.exp(logits64 - logits64.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits64.max(-1, keepdims=True)
    )
    np.testing.assert_allclose(
        chunked(hidden, kernel)[0], np.take_along_axis(logp64, np.asarray(tokens)[..., None], -1)[..., 0], atol=1e-5
    )

    w1, w2 = jax.random.normal(jax.random.key(1), (2, B, T))

    def scalar(fn):
        return lambda h, k: jnp.sum(fn(h, k)[0] * w1) + jnp.sum(fn(h, k)[1] * w2)

    grads_chunked = jax.jit(jax.grad(scalar(chunked), argnums=(0, 1)))(hidden, kernel)
    grads_full = jax.jit(jax.grad(scalar(full), argnums=(0, 1)))(hidden, kernel)
    for a, b in zip(grads_chunked, grads_full):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_sft_nll_from_hidden_equals_next_token_nll(tied):
    config = TransformerConfig(
        family="llama",
        vocab_size=V,
        d_model=D,
        n_layers=1,
        n_heads=2,
        n_kv_heads=1,
        head_dim=8,
        d_ff=32,
        tie_embeddings=tied,
        logits_chunk=4,
    )
    params = init_params(config, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (B, T), 0, V)
    mask = jnp.ones((B, T), jnp.int32).at[0, :3].set(0)  # left padding in row 0
    loss_mask = mask.at[:, :5].set(0)

    def chunked(params):
        hidden = Transformer(config).apply({"params": params}, ids, mask, return_logits=False).hidden_states
        return next_token_nll_from_hidden(config, params, hidden, ids, loss_mask)

    def full(params):
        logits = Transformer(config).apply({"params": params}, ids, mask).logits
        return next_token_nll(logits=logits, input_ids=ids, loss_mask=loss_mask)

    for a, b in zip(jax.jit(chunked)(params), jax.jit(full)(params)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    g_chunked = jax.jit(jax.grad(lambda p: jnp.sum(chunked(p)[0] * jnp.arange(T - 1))))(params)
    g_full = jax.jit(jax.grad(lambda p: jnp.sum(full(p)[0] * jnp.arange(T - 1))))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), g_chunked, g_full)


def _ppo_setup(vocab, chunk, n_layers=1, d=16):
    from ppo.rollout import ModelSpecs
    from ppo.update import ppo_loss
    from rm.model import init_head

    config = TransformerConfig(
        family="llama",
        vocab_size=vocab,
        d_model=d,
        n_layers=n_layers,
        n_heads=2,
        n_kv_heads=1,
        head_dim=8,
        d_ff=32,
        logits_chunk=chunk,
    )
    specs = ModelSpecs(policy=config, reward=config, value=config)
    loss = functools.partial(ppo_loss, specs=specs, temperature=0.7, clip_eps=0.2, vf_clip_eps=0.2, vf_coef=0.1)
    return config, loss, init_head


def _ppo_batch(b, p, n, vocab, seed=0):
    ks = jax.random.split(jax.random.key(seed), 5)
    query_mask = jnp.ones((b, p), jnp.int32).at[0, :2].set(0)
    response_mask = jnp.ones((b, n), jnp.int32).at[1, n - 3 :].set(0)
    return {
        "query_ids": jax.random.randint(ks[0], (b, p), 0, vocab),
        "query_mask": query_mask,
        "response_ids": jax.random.randint(ks[1], (b, n), 0, vocab),
        "response_mask": response_mask,
        "logprobs": -jax.random.uniform(ks[2], (b, n)) * 3,
        "values": jax.random.normal(ks[3], (b, n)),
        "advantages": jax.random.normal(ks[4], (b, n)),
        "returns": jax.random.normal(ks[4], (b, n)) + 1,
    }


def test_ppo_loss_chunked_equals_full():
    config, loss_chunked, init_head = _ppo_setup(V, chunk=3)
    _, loss_full, _ = _ppo_setup(V, chunk=0)
    params = {
        "policy": init_params(config, jax.random.key(0)),
        "value": {"backbone": init_params(config, jax.random.key(1)), "head": init_head(config, jax.random.key(2))},
    }
    batch = _ppo_batch(B, 5, 7, V)
    (lc, mc), gc = jax.jit(jax.value_and_grad(loss_chunked, has_aux=True))(params, batch, None)
    (lf, mf), gf = jax.jit(jax.value_and_grad(loss_full, has_aux=True))(params, batch, None)
    np.testing.assert_allclose(lc, lf, atol=1e-5, rtol=1e-5)
    for key in mf:
        np.testing.assert_allclose(mc[key], mf[key], atol=1e-5, rtol=1e-5, err_msg=key)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), gc, gf)


def test_ppo_loss_grad_holds_no_full_logits():
    """Compiled gradient of the PPO loss at V = 32768: temp memory below one [B, N, V] float32."""
    vocab, b, p, n = 32768, 4, 8, 64

    def temp_bytes(chunk):
        config, loss, init_head = _ppo_setup(vocab, chunk=chunk)
        params = jax.eval_shape(
            lambda: {
                "policy": init_params(config, jax.random.key(0)),
                "value": {
                    "backbone": init_params(config, jax.random.key(1)),
                    "head": init_head(config, jax.random.key(2)),
                },
            }
        )
        batch = jax.eval_shape(lambda: _ppo_batch(b, p, n, vocab))
        grad = jax.jit(jax.grad(lambda prm, bt: loss(prm, bt, None)[0]))
        return grad.lower(params, batch).compile().memory_analysis().temp_size_in_bytes

    logits_bytes = b * n * vocab * 4
    chunked, full = temp_bytes(8), temp_bytes(0)
    assert chunked < logits_bytes / 2, (chunked, logits_bytes)
    assert full > logits_bytes, (full, logits_bytes)  # the check can fail: the full path is caught
