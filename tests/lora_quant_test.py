"""LoRA adapters and int8 weight-only quantisation (models/lora.py, models/quant.py).

References: the base model itself (zero adapters, adapters switched off), a forward with
merged kernels computed in NumPy, NumPy quantisation, a random perturbation of the size
int8 rounding makes, and Hugging Face PyTorch for exported merged weights.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from common.optim import make_optimizer
from models import hf
from models.lora import add_lora_params, combine_params, lora_trainable, merge_lora, partition_params, strip_lora
from models.projections import dequantize, quantize_kernel
from models.quant import dequantize_params, param_bytes, quantize_params
from models.sharding import param_path
from models.transformer import Transformer, TransformerConfig, init_params
from rm.model import RewardModel, init_head
from tests.hf_fixtures import make_tiny_hf_model

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_config(family="llama", **kw):
    base = dict(
        family=family,
        vocab_size=96,
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2 if family != "gpt2" else 4,
        head_dim=8,
        d_ff=64,
        max_position_embeddings=64,
    )
    if family == "gpt2":
        base.update(tie_embeddings=True, qkv_bias=True, o_bias=True, mlp_bias=True, activation="gelu_new")
    base.update(kw)
    return TransformerConfig(**base)


def batch(vocab=96, b=3, t=9, seed=1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, (b, t))
    mask = np.ones((b, t), np.int32)
    mask[1, :3] = 0  # left padding
    mask[2, -2:] = 0  # right padding
    return jnp.asarray(ids, jnp.int32), jnp.asarray(mask)


@functools.cache
def _forward(config):
    # One compiled forward per config: much faster than op-by-op dispatch on a small CPU.
    return jax.jit(lambda params, ids, mask: Transformer(config).apply({"params": params}, ids, mask).logits)


def logits(config, params, ids, mask):
    return np.asarray(_forward(config)(params, ids, mask))


def randomize_b(params, seed=7, std=0.3):
    """Sets every lora_b leaf to N(0, std^2) so the adapters change the output."""
    key = jax.random.key(seed)

    def fill(path, x):
        if param_path(path).endswith("lora_b"):
            return std * jax.random.normal(jax.random.fold_in(key, hash(param_path(path)) % 2**31), x.shape, x.dtype)
        return x

    return jax.tree_util.tree_map_with_path(fill, params)


def kl_per_token(p_logits, q_logits, mask):
    """Mean over real tokens of KL(p || q) between next-token distributions (NumPy, float64)."""
    lp = p_logits - np.logaddexp.reduce(p_logits.astype(np.float64), -1, keepdims=True)
    lq = q_logits - np.logaddexp.reduce(q_logits.astype(np.float64), -1, keepdims=True)
    kl = (np.exp(lp) * (lp - lq)).sum(-1)
    real = np.asarray(mask, bool)
    return float(kl[real].mean())


# ----------------------------------------------------------------------------- LoRA


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_zero_b_equals_base_and_structure_matches_init(family):
    config = tiny_config(family)
    lconfig = config.replace(lora_rank=4, lora_targets=ALL if family != "gpt2" else ("q_proj", "up_proj", "down_proj"))
    base = init_params(config, jax.random.key(0))
    params = add_lora_params(base, lconfig, jax.random.key(1))
    assert jax.tree.structure(params) == jax.tree.structure(init_params(lconfig, jax.random.key(0)))
    q = params["layers_1"]["attn"]["q_proj"]
    assert q["lora_a"].shape == (32, 4) and q["lora_b"].shape == (4, 32) and not np.any(q["lora_b"])
    bound = 1 / np.sqrt(32)  # U(-1/sqrt(in), 1/sqrt(in))
    assert np.abs(q["lora_a"]).max() <= bound and np.abs(q["lora_a"]).max() > 0.8 * bound
    ids, mask = batch()
    # Exact in op-by-op mode (B = 0 adds exact zeros); under jit XLA may fuse the two graphs'
    # bias adds differently, so allow 1 ulp-level differences.
    np.testing.assert_allclose(logits(lconfig, params, ids, mask), logits(config, base, ids, mask), atol=1e-6, rtol=0)


def test_random_b_matches_merged_kernels_and_adapters_off_is_base():
    config = tiny_config()
    lconfig = config.replace(lora_rank=4, lora_alpha=8.0, lora_targets=ALL)
    base = init_params(config, jax.random.key(0))
    params = randomize_b(add_lora_params(base, lconfig, jax.random.key(1)))
    ids, mask = batch()
    lora_out = logits(lconfig, params, ids, mask)
    base_out = logits(config, base, ids, mask)
    assert np.abs(lora_out - base_out).max() > 1e-2  # the adapters really change the model

    merged, mconfig = merge_lora(params, lconfig)
    assert mconfig.lora_rank == 0 and jax.tree.structure(merged) == jax.tree.structure(base)
    d = params["layers_0"]["mlp"]["down_proj"]  # merged kernel = W + (alpha/r) A B, in NumPy
    ref = np.asarray(d["kernel"], np.float64) + 2.0 * np.asarray(d["lora_a"], np.float64) @ np.asarray(
        d["lora_b"], np.float64
    )
    np.testing.assert_allclose(merged["layers_0"]["mlp"]["down_proj"]["kernel"], ref, atol=1e-6)
    np.testing.assert_allclose(logits(mconfig, merged, ids, mask), lora_out, atol=1e-5)

    # Reference policy = adapters switched off: the base model, with or without strip_lora.
    off = lconfig.replace(lora_rank=0)
    np.testing.assert_array_equal(logits(off, params, ids, mask), base_out)
    np.testing.assert_array_equal(logits(off, strip_lora(params), ids, mask), base_out)
    assert jax.tree.structure(strip_lora(params)) == jax.tree.structure(base)


def test_lora_dropout_only_with_dropout_rng():
    config = tiny_config(lora_rank=4, lora_dropout=0.5)
    params = randomize_b(init_params(config, jax.random.key(0)))
    ids, mask = batch()
    plain = logits(config.replace(lora_dropout=0.0), params, ids, mask)
    np.testing.assert_array_equal(logits(config, params, ids, mask), plain)  # no rng: identity
    dropped = np.asarray(
        jax.jit(lambda p, key: Transformer(config).apply({"params": p}, ids, mask, rngs={"dropout": key}).logits)(
            params, jax.random.key(3)
        )
    )
    assert np.abs(dropped - plain).max() > 1e-3


def test_ppo_forward_uses_dropout_rng_only_for_models_with_lora_dropout():
    from ppo.rollout import ModelSpecs, response_logits_and_values
    from rm.model import init_head

    policy = tiny_config(lora_rank=4, lora_dropout=0.5)
    value = tiny_config(lora_rank=4, lora_dropout=0.0)
    params = {
        "policy": randomize_b(init_params(policy, jax.random.key(0))),
        "value": {
            "backbone": randomize_b(init_params(value, jax.random.key(1))),
            "head": init_head(value, jax.random.key(2)),
        },
    }
    specs = ModelSpecs(policy=policy, reward=value, value=value)
    ids, mask = batch()
    q, r = ids[:, :3], ids[:, 3:]
    qm, rm_ = mask[:, :3], mask[:, 3:]
    run = jax.jit(lambda p, key: response_logits_and_values(specs, p, q, qm, r, rm_, dropout_rng=key))
    plain_logits, plain_values = response_logits_and_values(specs, params, q, qm, r, rm_)
    logits_, values = run(params, jax.random.key(5))
    assert np.abs(np.asarray(logits_) - np.asarray(plain_logits)).max() > 1e-3  # policy: dropout on
    np.testing.assert_allclose(values, plain_values, atol=1e-5)  # value model: lora_dropout = 0, no dropout


def test_config_fields_validated_and_lists_become_tuples():
    assert tiny_config(lora_targets=["q_proj", "k_proj"]).lora_targets == ("q_proj", "k_proj")
    with pytest.raises(ValueError, match="lora_targets"):
        tiny_config(lora_targets=("qproj",))
    with pytest.raises(ValueError, match="quant"):
        tiny_config(quant="int4")


def test_optimizer_trains_only_adapters_and_head():
    lconfig = tiny_config(lora_rank=4, lora_targets=("q_proj", "v_proj", "down_proj"))
    backbone = init_params(lconfig, jax.random.key(0))
    params = {
        "backbone": {k: v for k, v in backbone.items() if k != "lm_head"},
        "head": init_head(lconfig, jax.random.key(1)),
    }
    ids, mask = batch()
    target = jnp.array([1.0, -1.0, 0.5])

    def loss_fn(p):
        rewards = RewardModel(lconfig).apply({"params": p}, ids, mask)
        return jnp.mean((rewards - target) ** 2)

    tx, _ = make_optimizer(
        learning_rate=1e-2, total_steps=10, warmup_steps=0, weight_decay=0.1, trainable=lora_trainable
    )

    @jax.jit
    def step(p, state):
        updates, state = tx.update(jax.grad(loss_fn)(p), state, p)
        return optax.apply_updates(p, updates), state

    opt_state = tx.init(params)
    new = params
    for _ in range(3):  # B moves at step 1; A gets gradients once B != 0
        new, opt_state = step(new, opt_state)
    flat_old = {param_path(k): v for k, v in jax.tree_util.tree_leaves_with_path(params)}
    flat_new = {param_path(k): v for k, v in jax.tree_util.tree_leaves_with_path(new)}
    n_trainable = 0
    for path, old in flat_old.items():
        if lora_trainable(path):
            n_trainable += old.size
            assert np.abs(np.asarray(flat_new[path]) - np.asarray(old)).max() > 0, path
        else:
            np.testing.assert_array_equal(flat_new[path], old, err_msg=path)
    assert {p.rsplit("/", 1)[-1] for p in flat_old if lora_trainable(p)} == {"lora_a", "lora_b", "kernel", "bias"}
    assert sum(lora_trainable(p) for p in flat_old) == 2 * 2 * 3 + 2  # 2 layers x 3 targets x (A, B) + head

    # Adam moments only for trainable leaves: the state's arrays are mu + nu of those, plus counters.
    state_leaves = jax.tree_util.tree_leaves_with_path(opt_state)
    for path, leaf in state_leaves:
        if np.ndim(leaf) > 0:
            assert lora_trainable(param_path(path)), param_path(path)
    assert sum(np.size(x) for _, x in state_leaves if np.ndim(x) > 0) == 2 * n_trainable


def test_partition_and_combine_round_trip():
    params = init_params(tiny_config(lora_rank=2), jax.random.key(0))
    train, frozen = partition_params(params)
    assert all(lora_trainable(param_path(p)) for p, _ in jax.tree_util.tree_leaves_with_path(train))
    assert not any(lora_trainable(param_path(p)) for p, _ in jax.tree_util.tree_leaves_with_path(frozen))
    assert jax.tree.structure(combine_params(train, frozen)) == jax.tree.structure(params)
    assert lora_trainable("value/head/kernel") and lora_trainable("value_head/bias")
    assert not lora_trainable("backbone/lm_head/kernel") and not lora_trainable("layers_0/attn/q_proj/kernel")


# ----------------------------------------------------------------------------- int8


def test_quantize_kernel_per_channel_error_bound():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(48, 20)) * np.logspace(-3, 1, 20)  # channels of very different scales
    w[:, 3] = 0.0  # an all-zero channel must not divide by zero
    w = w.astype(np.float32)
    q, scale = quantize_kernel(jnp.asarray(w))
    assert q.dtype == jnp.int8 and scale.dtype == jnp.float32 and scale.shape == (20,)
    ref_scale = np.abs(w).max(0) / 127
    np.testing.assert_allclose(scale, ref_scale, rtol=1e-6)
    safe = np.where(ref_scale > 0, ref_scale, 1.0)
    np.testing.assert_array_equal(q, np.clip(np.round(w / safe), -127, 127).astype(np.int8))
    assert np.abs(np.asarray(q, np.int32)).max() == 127
    err = np.abs(np.asarray(dequantize(q, scale)) - w)
    assert np.all(err <= np.asarray(scale) / 2 * (1 + 1e-5) + 1e-12)
    assert np.all(err[:, 3] == 0)
    worst = (err / np.maximum(np.asarray(scale), 1e-30)).max(0)  # round-to-nearest, not truncation
    assert 0.35 < np.delete(worst, 3).min() and worst.max() <= 0.5 + 1e-5


def test_int8_model_matches_dequantized_forward_and_float_model():
    config = tiny_config(vocab_size=128, d_model=64, head_dim=16, d_ff=128)
    ids, mask = batch(vocab=128, b=4, t=16)
    for mult, kl_bound in ((1.0, 1e-5), (10.0, 3e-3)):
        # mult=1: the usual N(0, 0.02) init (near-uniform outputs); mult=10 sharpens the
        # next-token distributions (entropy ~3.7 nats vs log V = 4.85) so rounding matters.
        params = jax.tree.map(lambda x: x * mult if x.ndim == 2 else x, init_params(config, jax.random.key(0)))
        qparams, qconfig = quantize_params(params, config)
        assert qconfig.quant == "int8"
        q_proj = qparams["layers_0"]["attn"]["q_proj"]
        assert set(q_proj) == {"qvalue", "scale"} and q_proj["qvalue"].dtype == jnp.int8
        assert qparams["embed"]["embedding"].dtype == jnp.float32 and "kernel" in qparams["lm_head"]
        float_out = logits(config, params, ids, mask)
        int8_out = logits(qconfig, qparams, ids, mask)
        deq, dconfig = dequantize_params(qparams, qconfig)
        np.testing.assert_allclose(int8_out, logits(dconfig, deq, ids, mask), atol=3e-5 * mult, rtol=1e-5)
        kl = kl_per_token(float_out, int8_out, mask)
        assert kl < kl_bound, (mult, kl)

        # Independent reference: perturb every projection by U(-s/2, s/2), the size of int8
        # rounding error; the KL it causes must be of the same order as int8's.
        key = jax.random.key(42)

        def noisy(path, x):
            name = param_path(path)
            if name.startswith("layers_") and name.endswith("kernel"):
                s = jnp.abs(x).max(0) / 127
                u = jax.random.uniform(jax.random.fold_in(key, hash(name) % 2**31), x.shape, minval=-0.5, maxval=0.5)
                return x + u * s
            return x

        noise_kl = kl_per_token(
            float_out, logits(config, jax.tree_util.tree_map_with_path(noisy, params), ids, mask), mask
        )
        assert 0.25 < kl / noise_kl < 4.0, (kl, noise_kl)
    # int8 projections: about a quarter of the float bytes for the matrices (embeddings stay float).
    proj_bytes = sum(param_bytes(params[f"layers_{i}"]) for i in range(config.n_layers))
    qproj_bytes = sum(param_bytes(qparams[f"layers_{i}"]) for i in range(config.n_layers))
    assert qproj_bytes < 0.27 * proj_bytes
    with pytest.raises(NotImplementedError):
        quantize_params(params, config, include_lm_head=True)


def test_qlora_forward_and_finite_adapter_grads():
    config = tiny_config()
    base = init_params(config, jax.random.key(0))
    qbase, qconfig = quantize_params(base, config)
    qlconfig = qconfig.replace(lora_rank=4, lora_targets=("q_proj", "v_proj", "up_proj"))
    params = randomize_b(add_lora_params(qbase, qlconfig, jax.random.key(1)))
    assert jax.tree.structure(params) == jax.tree.structure(init_params(qlconfig, jax.random.key(0)))
    ids, mask = batch()
    out = logits(qlconfig, params, ids, mask)
    merged, mconfig = merge_lora(params, qlconfig)  # dequantises the int8 base, then folds adapters in
    assert mconfig.quant == "" and mconfig.lora_rank == 0
    np.testing.assert_allclose(logits(mconfig, merged, ids, mask), out, atol=1e-5)

    with pytest.raises(TypeError):  # jax.grad refuses int8 leaves: differentiate the trainable part only
        jax.grad(lambda p: Transformer(qlconfig).apply({"params": p}, ids, mask).logits.sum())(params)
    train, frozen = partition_params(params)

    def loss_fn(t):
        lg = Transformer(qlconfig).apply({"params": combine_params(t, frozen)}, ids, mask).logits
        return -jnp.mean(jax.nn.log_softmax(lg)[..., 0])

    grads = jax.jit(jax.grad(loss_fn))(train)
    leaves = jax.tree_util.tree_leaves_with_path(grads)
    assert len(leaves) == 2 * 2 * 3
    for path, g in leaves:
        assert np.all(np.isfinite(g)) and np.abs(g).max() > 0, param_path(path)


# ----------------------------------------------------------------------------- export


def test_merged_export_loads_in_transformers(tmp_path):
    import torch
    import transformers

    make_tiny_hf_model("llama", str(tmp_path / "src"), seed=2)
    config, base = hf.load_hf_checkpoint(str(tmp_path / "src"))
    lconfig = config.replace(lora_rank=4, lora_alpha=16.0, lora_targets=ALL)
    params = randomize_b(add_lora_params(base, lconfig, jax.random.key(0)), std=0.05)
    ids, mask = batch(vocab=config.vocab_size)
    ours = logits(lconfig, params, ids, mask)
    merged, mconfig = merge_lora(params, lconfig)
    hf.save_hf_checkpoint(mconfig, merged, str(tmp_path / "out"))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    pos = np.maximum(np.cumsum(np.asarray(mask), -1) - 1, 0)
    with torch.no_grad():
        theirs = model(
            input_ids=torch.tensor(np.asarray(ids, np.int64)),
            attention_mask=torch.tensor(np.asarray(mask, np.int64)),
            position_ids=torch.tensor(pos),
        ).logits.numpy()
    real = np.asarray(mask, bool)
    assert np.abs(ours - logits(config, base, ids, mask))[real].max() > 1e-3  # the export carries the adapters
    np.testing.assert_allclose(theirs[real], ours[real], atol=1e-4, rtol=1e-4)
