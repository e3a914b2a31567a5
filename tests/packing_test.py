"""Packed batches (common/packing.py): the packer's layout, and a packed batch giving the same
rewards, loss, gradients (RM) and token-mean loss (SFT) as the same sequences unpacked; segments
never see each other, in the xla, chunked and dot_product_attention paths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common import packing
from models.attention import attend
from models.transformer import TransformerConfig
from rm.losses import bradley_terry_loss
from rm.model import RewardModel
from rm.train import batch_token_stats, packed_pair_rewards, pair_rewards
from sft.train import lm_nll

L = 16  # max_length
SMALL = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48)
FAMILIES = {
    "llama": dict(family="llama"),
    "gpt2": dict(
        family="gpt2",
        n_kv_heads=4,
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        activation="gelu_new",
        tie_embeddings=True,
        max_position_embeddings=32,
    ),
    "mistral_window": dict(family="mistral", sliding_window=3),
}


def test_first_fit_decreasing_by_hand():
    # Longest first: 9 -> bin 0, 7 -> bin 1 (9 + 7 > 10), 3 -> bin 1 (7 + 3), 2 -> bin 2 (both full), 1 -> bin 0.
    bin_of, offset_of, n_bins = packing.first_fit_decreasing([3, 9, 2, 7, 1], capacity=10)
    assert n_bins == 3
    assert bin_of.tolist() == [1, 0, 2, 1, 0]
    assert offset_of.tolist() == [7, 0, 0, 0, 9]
    # At most 2 items per bin: the third 5 opens a second bin although the first has room for it.
    bin_of, _, n_bins = packing.first_fit_decreasing([5, 5, 5, 1], capacity=20, max_segments=2)
    assert n_bins == 2 and bin_of.tolist() == [0, 0, 1, 1]


def _pair_batch(rng, pairs):
    """A padded preference batch with long-tailed lengths (some short, a few near L)."""
    batch = {k: np.zeros((pairs, L), np.int32) for k in ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask")}
    for side in ("chosen", "rejected"):
        for i in range(pairs):
            n = int(rng.choice([2, 3, 4, 5, 7, L - 1, L]))
            batch[f"{side}_ids"][i, :n] = rng.integers(1, 64, n)
            batch[f"{side}_mask"][i, :n] = 1
    batch["margin"] = rng.normal(size=pairs).astype(np.float32)
    return batch


def _init(family):
    cfg = TransformerConfig(**dict(SMALL, **FAMILIES[family]), attention="xla")
    params = RewardModel(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))
    return cfg, params["params"]


def _assert_trees_close(a, b, tol=1e-5):
    def close(x, y):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        np.testing.assert_array_less(np.abs(x - y), tol * np.max(np.abs(y), initial=0.0) + 1e-7)

    jax.tree.map(close, a, b)


@pytest.mark.parametrize("family,groups", [("llama", 1), ("gpt2", 1), ("mistral_window", 2)])
def test_packed_rewards_loss_grads_equal_unpacked(family, groups):
    cfg, params = _init(family)
    batch = _pair_batch(np.random.default_rng(1), 6)
    chosen_lengths, rejected_lengths = batch["chosen_mask"].sum(1), batch["rejected_mask"].sum(1)
    layout = packing.plan_pair_layout(
        chosen_lengths, rejected_lengths, lambda step: np.arange(6), steps=range(1), groups=groups, length=L
    )
    packed = packing.pack_pairs(batch, layout, pad_id=0)
    assert layout.rows * groups < 12  # it does pack: fewer rows than sequences
    # Every real token is placed once; pad fraction as counted by hand.
    real = int(chosen_lengths.sum() + rejected_lengths.sum())
    assert int((packed["segment_ids"] > 0).sum()) == real
    stats = jax.device_get(batch_token_stats(packed))
    assert stats["tokens"] == real and stats["pad_fraction"] == pytest.approx(1 - real / (groups * layout.rows * L))
    assert stats["pad_fraction_unpacked"] == pytest.approx(1 - real / (12 * L))

    def loss(p, fn, b):
        chosen, rejected = fn(cfg, p, b)
        value = bradley_terry_loss(chosen, rejected, margin=b["margin"].reshape(-1), center_coef=0.01)[0]
        return value, (chosen, rejected)

    grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (ref_loss, ref_rewards), ref_grads = grad_fn(params, pair_rewards, batch)
    (got_loss, got_rewards), got_grads = grad_fn(params, packed_pair_rewards, packed)
    np.testing.assert_allclose(np.asarray(got_rewards), np.asarray(ref_rewards), atol=1e-5)
    np.testing.assert_allclose(float(got_loss), float(ref_loss), atol=1e-5)
    _assert_trees_close(got_grads, ref_grads)


def test_segments_never_see_each_other():
    """Changing the other segments of a row leaves a segment's reward unchanged (llama and gpt2)."""
    for family in ("llama", "gpt2"):
        cfg, params = _init(family)
        ids = np.array([[5, 6, 7, 8, 9, 10, 11, 12]], np.int32)
        segments = np.array([[1, 1, 1, 2, 2, 2, 2, 0]], np.int32)
        read_at = np.array([[2, 6]], np.int32)

        @jax.jit
        def rewards(tokens):
            return RewardModel(cfg).apply(
                {"params": params}, tokens, (segments > 0).astype(np.int32), segment_ids=segments, read_at=read_at
            )

        base = np.asarray(rewards(ids))
        other = ids.copy()
        other[0, :3] = [40, 41, 42]  # segment 1 changes
        changed = np.asarray(rewards(other))
        assert changed[0, 0] != pytest.approx(base[0, 0])  # its own reward moves
        assert changed[0, 1] == base[0, 1]  # the other segment's does not, bit for bit
        # And the reward of a segment equals that sequence scored alone.
        alone = RewardModel(cfg).apply({"params": params}, ids[:, 3:7], np.ones((1, 4), np.int32))
        np.testing.assert_allclose(base[0, 1], np.asarray(alone)[0], atol=1e-5)


@pytest.mark.parametrize("impl", ["chunked", "dpa_xla"])
def test_attention_paths_respect_segments(impl):
    """The chunked (several blocks) and dot_product_attention paths equal the xla path with segments."""
    b, t, h, kvh, d = 2, 12, 4, 2, 8
    kq, kk, kv = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(kq, (b, t, h, d))
    k = jax.random.normal(kk, (b, kvh, t, d))
    v = jax.random.normal(kv, (b, kvh, t, d))
    segments = jnp.asarray([[1] * 5 + [2] * 4 + [3] * 2 + [0], [1] * 3 + [2] * 9], jnp.int32)
    kw = dict(q_slots=jnp.arange(t), kv_mask=(segments > 0).astype(jnp.int32), scale=d**-0.5, segment_ids=segments)
    for window in (None, 3):
        ref = attend(q, k, v, impl="xla", sliding_window=window, **kw)
        extra = dict(block_q=4, block_k=4) if impl == "chunked" else {}
        got = attend(q, k, v, impl=impl, sliding_window=window, **kw, **extra)
        real = np.asarray(segments > 0)
        np.testing.assert_allclose(np.asarray(got)[real], np.asarray(ref)[real], atol=1e-5)
        # Reference by hand: segment 2 of row 0 attended alone.
        alone = attend(
            q[:1, 5:9],
            k[:1, :, 5:9],
            v[:1, :, 5:9],
            q_slots=jnp.arange(4),
            kv_mask=jnp.ones((1, 4)),
            scale=d**-0.5,
            impl="xla",
            sliding_window=window,
        )
        np.testing.assert_allclose(np.asarray(got)[0, 5:9], np.asarray(alone)[0], atol=1e-5)


@pytest.mark.parametrize("family", ["llama"])
def test_sft_packed_loss_equals_unpacked(family):
    """Token-mean NLL and accuracy over the same target tokens, packed or padded."""
    cfg = TransformerConfig(**dict(SMALL, **FAMILIES[family], n_layers=1), attention="xla", logits_chunk=0)
    from models.transformer import init_params

    params = init_params(cfg, jax.random.key(1))
    rng = np.random.default_rng(2)
    n = 5
    batch = {k: np.zeros((n, L), np.int32) for k in ("input_ids", "attention_mask", "loss_mask")}
    for i in range(n):
        length = int(rng.choice([3, 4, 6, L]))
        batch["input_ids"][i, :length] = rng.integers(1, 64, length)
        batch["attention_mask"][i, :length] = 1
        batch["loss_mask"][i, 1:length] = rng.integers(0, 2, length - 1)
        batch["loss_mask"][i, length - 1] = 1
    layout = packing.plan_sequence_layout(
        batch["attention_mask"].sum(1), lambda step: np.arange(n), steps=range(1), length=L
    )
    packed = packing.pack_sequences(batch, layout, pad_id=0)
    assert layout.rows < n and int(packed["loss_mask"].sum()) == int(batch["loss_mask"].sum())

    def mean_loss(p, b, segment_ids=None):
        mask = b["attention_mask"] if segment_ids is None else (segment_ids > 0).astype(jnp.int32)
        nll, weights, correct = lm_nll(cfg, p, b["input_ids"], mask, b["loss_mask"], segment_ids=segment_ids)
        return jnp.sum(nll) / jnp.sum(weights), jnp.sum(correct) / jnp.sum(weights)

    grad_fn = jax.jit(jax.value_and_grad(mean_loss, has_aux=True))
    (ref, ref_acc), ref_grads = grad_fn(params, batch)
    (got, got_acc), got_grads = grad_fn(params, packed, packed["segment_ids"])
    np.testing.assert_allclose(float(got), float(ref), atol=1e-5)
    assert float(got_acc) == pytest.approx(float(ref_acc), abs=1e-6)
    _assert_trees_close(got_grads, ref_grads)


def test_choose_row_buckets_is_optimal_against_brute_force():
    """The dynamic programme's buckets cost what the best of every bucket subset costs (brute force)."""
    import itertools

    def total(buckets, needs):
        return sum(min(b for b in buckets if b >= n) for n in needs)

    rng = np.random.default_rng(0)
    for _ in range(30):
        needs = rng.integers(3, 12, size=int(rng.integers(1, 15))).tolist()
        top = max(needs) + int(rng.integers(0, 2))
        for count in (1, 2, 3):
            got = packing.choose_row_buckets(needs, count=count, top=top)
            assert got[-1] == top and len(got) <= count and list(got) == sorted(set(got))
            candidates = sorted(set(needs) - {top})
            best = min(
                total(subset + (top,), needs)
                for size in range(count)
                for subset in itertools.combinations(candidates, size)
            )
            assert total(got, needs) == best
    assert packing.choose_row_buckets([4, 4, 6, 9, 9, 9], count=1) == (9,)  # one shape: the worst step
    assert packing.choose_row_buckets([4, 4, 6, 9, 9, 9], count=3) == (4, 6, 9)  # exact
    # 2 buckets: {6, 9} costs 6+6+6+27 = 45, {4, 9} costs 4+4+9+27 = 44.
    assert packing.choose_row_buckets([4, 4, 6, 9, 9, 9], count=2) == (4, 9)


def _batch_of_lengths(rng, chosen, rejected):
    """A padded preference batch whose sequences have the given lengths (distinct random tokens)."""
    pairs = len(chosen)
    batch = {k: np.zeros((pairs, L), np.int32) for k in ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask")}
    for side, lengths in (("chosen", chosen), ("rejected", rejected)):
        for i, n in enumerate(lengths):
            batch[f"{side}_ids"][i, :n] = rng.integers(1, 64, n)
            batch[f"{side}_mask"][i, :n] = 1
    batch["margin"] = rng.normal(size=pairs).astype(np.float32)
    return batch


def test_row_buckets_place_every_sequence_once_in_the_smallest_bucket():
    """Steps of different sizes take different row buckets; each pair's two slots hold exactly its
    chosen and rejected tokens (read back by segment), every real token once, no sequence twice."""
    rng = np.random.default_rng(4)
    # Per step (4 pairs, L = 16): rows the lengths need at least, by hand (sum / 16 rounded up).
    steps = [
        ([2, 3, 2, 4], [3, 2, 5, 2]),  # 23 tokens: 2 rows
        ([16, 15, 16, 14], [13, 16, 12, 15]),  # every sequence needs its own row: 8 rows
        ([9, 9, 3, 3], [9, 9, 2, 2]),  # no two 9s share a row, the short ones fit beside them: 4 rows
        ([16, 15, 16, 14], [13, 16, 12, 15]),
    ]
    batches = [_batch_of_lengths(rng, c, r) for c, r in steps]
    lengths = {side: np.concatenate([np.asarray(s[k]) for s in steps]) for k, side in enumerate(("chosen", "rejected"))}
    layout = packing.plan_pair_layout(
        lengths["chosen"],
        lengths["rejected"],
        lambda step: np.arange(4 * step, 4 * step + 4),
        steps=range(4),
        groups=1,
        length=L,
        row_buckets=2,
    )
    # needs [2, 8, 4, 8]: {2, 8} costs 2+8+8+8 = 26, {4, 8} 4+8+4+8 = 24 -> (4, 8).
    assert layout.rows == 8 and layout.row_buckets == (4, 8)
    for batch, want_rows in zip(batches, [4, 8, 4, 8]):
        packed = packing.pack_pairs(batch, layout, pad_id=0)
        assert packed["input_ids"].shape == (1, want_rows, L)
        k_count = layout.max_segments
        seen = set()
        for side in ("chosen", "rejected"):
            for pair in range(4):
                slot = int(packed[f"{side}_slot"][0, pair])
                row, segment = divmod(slot, k_count)
                tokens = packed["input_ids"][0, row][packed["segment_ids"][0, row] == segment + 1]
                n = int(batch[f"{side}_mask"][pair].sum())
                np.testing.assert_array_equal(tokens, batch[f"{side}_ids"][pair, :n])
                assert (
                    int(packed["read_at"][0, row, segment])
                    == np.flatnonzero(packed["segment_ids"][0, row] == segment + 1).max()
                )
                seen.add(slot)
        assert len(seen) == 8  # no two sequences share a slot
        real = int(batch["chosen_mask"].sum() + batch["rejected_mask"].sum())
        assert int((packed["segment_ids"] > 0).sum()) == real  # every real token once
        assert float(jax.device_get(batch_token_stats(packed))["tokens"]) == real


def test_smaller_row_bucket_gives_padded_loss_and_grads():
    """A step packed into a smaller row bucket: rewards, loss and gradients equal the padded batch's."""
    cfg = TransformerConfig(**dict(SMALL, n_layers=1), family="llama", attention="xla")  # one layer: cheap
    params = RewardModel(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))
    params = params["params"]
    rng = np.random.default_rng(5)
    small = _batch_of_lengths(rng, [2, 5, 3, 7, 4, 2], [3, 2, 6, 4, 2, 5])
    large = _batch_of_lengths(rng, [16, 15, 14, 16, 13, 16], [15, 16, 16, 12, 16, 14])
    chosen = np.concatenate([small["chosen_mask"].sum(1), large["chosen_mask"].sum(1)])
    rejected = np.concatenate([small["rejected_mask"].sum(1), large["rejected_mask"].sum(1)])
    layout = packing.plan_pair_layout(
        chosen, rejected, lambda s: np.arange(6 * s, 6 * s + 6), steps=range(2), groups=1, length=L, row_buckets=2
    )
    packed = packing.pack_pairs(small, layout, pad_id=0)
    assert packed["input_ids"].shape[1] == 3 < layout.rows == 12  # 45 tokens in rows of 16

    def loss(p, fn, b):
        c, r = fn(cfg, p, b)
        return bradley_terry_loss(c, r, margin=b["margin"].reshape(-1), center_coef=0.01)[0], (c, r)

    grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (ref_loss, ref_rewards), ref_grads = grad_fn(params, pair_rewards, small)
    (got_loss, got_rewards), got_grads = grad_fn(params, packed_pair_rewards, packed)
    np.testing.assert_allclose(np.asarray(got_rewards), np.asarray(ref_rewards), atol=1e-5)
    np.testing.assert_allclose(float(got_loss), float(ref_loss), atol=1e-5)
    _assert_trees_close(got_grads, ref_grads)


def test_sft_row_buckets_keep_every_token_and_the_row_multiple():
    """SFT steps take the smallest bucket (a multiple of row_multiple) and keep every token and target."""
    rng = np.random.default_rng(6)
    step_lengths = [[3, 4, 2, 5], [16, 16, 15, 14], [8, 9, 3, 2]]  # rows by hand: 1, 4, 2
    batches = []
    for lengths in step_lengths:
        batch = {k: np.zeros((4, L), np.int32) for k in ("input_ids", "attention_mask", "loss_mask")}
        for i, n in enumerate(lengths):
            batch["input_ids"][i, :n] = rng.integers(1, 64, n)
            batch["attention_mask"][i, :n] = 1
            batch["loss_mask"][i, 1:n] = 1
        batches.append(batch)
    all_lengths = np.concatenate([np.asarray(x) for x in step_lengths])
    layout = packing.plan_sequence_layout(
        all_lengths, lambda s: np.arange(4 * s, 4 * s + 4), steps=range(3), length=L, row_multiple=2, row_buckets=3
    )
    assert layout.rows == 4 and layout.row_buckets == (2, 4)  # needs 1, 4, 2 rounded to multiples of 2
    for batch, want_rows in zip(batches, [2, 4, 2]):
        packed = packing.pack_sequences(batch, layout, pad_id=0)
        assert packed["input_ids"].shape == (want_rows, L) and packed["padded_tokens"].shape == (want_rows,)
        assert int(packed["loss_mask"].sum()) == int(batch["loss_mask"].sum())
        for i in range(4):  # each sequence appears once, whole, as some segment of some row
            n = int(batch["attention_mask"][i].sum())
            found = [
                r
                for r in range(want_rows)
                for s in range(1, int(packed["segment_ids"][r].max()) + 1)
                if np.array_equal(packed["input_ids"][r][packed["segment_ids"][r] == s], batch["input_ids"][i, :n])
            ]
            assert len(found) == 1
