"""Multi-device equivalence of a PPO rollout and a PPO update (ppo/rollout.py, ppo/train.py).

One rollout of a tiny random Llama-shaped policy and a tiny reward/value model is made on one
device; `ppo_update` (2 epochs x 2 minibatches x 2 accumulation steps) then runs on it
  (a) on one device, the reference, and
  (b) under (data, model) meshes (2, 4), (8, 1) and (1, 8), with the train state sharded by
      `tree_shardings(DEFAULT_RULES)` (FSDP over 'data', tensor parallel over 'model'), the
      rollout batch split over 'data' by `shard_batch`, and the update jitted with in/out
      shardings and donation exactly as in `ppo/train.py`.
Params (policy and value), Adam moments and metrics must agree with (a) within 1e-5 while the
update moves params by far more than that. The same holds for a critic-free GRPO update (no value
model; K = 4 samples per prompt, groups shuffled whole; KL as a loss term; clip-higher, dual clip
and seq_mean_token_mean aggregation) under the (2, 4) and (8, 1) meshes. The rollout itself is also rerun under the (2, 4)
mesh with sharded params and prompts: same sampled tokens, same advantages.

This pytest process already imported jax with one CPU device, so everything multi-device runs
in ONE subprocess (this file as a script, `_worker`) with
XLA_FLAGS=--xla_force_host_platform_device_count=8 set before jax is imported; it prints one
JSON line that the test asserts on. The extra XLA flags (no LLVM optimisation, no CPU fusion
emitters) cut XLA:CPU compile time, the bulk of the run, by about 3x; every computation in the
worker, the single-device references included, is compiled with them.
"""

from __future__ import annotations

import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests.worker import run_worker  # noqa: E402

PAD, EOS = 0, 1
# d_ff differs between policy and value model so a mix-up of the two trees cannot go unnoticed.
POLICY = dict(
    family="llama",
    vocab_size=64,
    d_model=32,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=8,
    d_ff=64,
    max_position_embeddings=64,
    pad_token_id=PAD,
    eos_token_id=EOS,
)
VALUE = dict(POLICY, n_layers=1, d_ff=32)
BATCH, PROMPT_LEN = 8, 5
SETTINGS = dict(
    max_new_tokens=6,
    temperature=0.7,
    top_k=0,
    top_p=1.0,
    eos_token_id=EOS,
    stop_token_ids=(),
    missing_eos_penalty=1.0,
    kl_estimator="k1",
    gamma=1.0,
    lam=0.95,
    whiten_rewards=False,
)
UPDATE = dict(ppo_epochs=2, num_minibatches=2, accum_steps=2)
LOSS = dict(clip_eps=0.2, vf_clip_eps=0.2, vf_coef=0.1)
BETA = 0.05
MESHES = [(2, 4), (8, 1), (1, 8)]  # (data, model)
GRPO_MESHES = [(2, 4), (8, 1)]
GRPO_K = 4
GRPO_VARIANT = {
    "clip_eps_low": 0.2,
    "clip_eps_high": 0.28,
    "dual_clip_c": 3.0,
    "aggregation": "seq_mean_token_mean",
    "norm_constant": 6.0,
    "kl_estimator": "k3",
}
TOL = 1e-5
SEED = int(os.environ.get("PPO_SHARDING_TEST_SEED", 0))  # to try other random models by hand
EOS_BOOST = 10.0  # scales the lm_head column of EOS so some rows stop early
REF_NOISE = 0.01  # std of the Gaussian perturbation that makes the reference policy
# Adam's eps: 1e-6 rather than 1e-8 so elements with near-zero gradients (|g| ~ 1e-8) do not turn
# rounding-level gradient differences between layouts into lr-sized update differences.
ADAM_EPS = 1e-6


def test_ppo_rollout_and_update_match_single_device_under_meshes():
    flags = (
        "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
        "--xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false"
    )
    t0 = time.time()
    report = run_worker(__file__, xla_flags=flags)
    print(f"ppo sharding worker: {time.time() - t0:.1f}s, timings {report['timings']}")
    assert report["device_count"] == 8

    # The single-device rollout is non-trivial: KL against the perturbed reference is nonzero,
    # and the response masks are ragged (some rows stop at EOS, some do not).
    roll = report["rollout"]
    assert roll["max_abs_kl"] > 1e-3, roll
    assert 0 < roll["eos_rows"] < BATCH, roll
    assert roll["finite"], roll
    # (2, 4) mesh rollout: same tokens exactly, same floats within TOL.
    mesh_roll = report["mesh_rollout"]
    assert mesh_roll["q_kernel_spec"] == ["data", "model"], mesh_roll
    assert mesh_roll["query_ids_spec"][0] == "data", mesh_roll
    assert mesh_roll["response_ids_equal"] and mesh_roll["response_mask_equal"], mesh_roll
    for key, diff in mesh_roll["max_diff"].items():
        assert diff < TOL, (key, diff)

    single = report["single"]
    # The update must move every trainable tree far more than the tolerance, or equality is vacuous.
    assert single["policy_change"] > 100 * TOL and single["value_change"] > 100 * TOL, single
    assert all(abs(v) < 1e6 for v in single["metrics"].values()), single["metrics"]
    assert single["metrics"]["policy/grad_norm"] > 0
    for name, run in report["meshes"].items():
        data, model = (int(x) for x in name.split("x"))
        # The state really is sharded by the rules (FSDP on 'data', TP on 'model').
        assert run["q_kernel_spec"] == [("data" if data > 1 else None), ("model" if model > 1 else None)], run
        assert run["step"] == 1, (name, run["step"])
        for key in ("policy", "value", "mu"):
            assert run[f"max_{key}_diff"] < TOL, (name, key, run[f"max_{key}_diff"], run["worst"])
        assert set(run["metrics"]) == set(single["metrics"]), name
        for key, value in run["metrics"].items():
            ref = single["metrics"][key]
            tol = TOL * max(1.0, abs(ref))
            assert abs(value - ref) < tol, (name, key, value, ref)

    grpo = report["grpo"]
    assert grpo["param_trees"] == ["policy"] and grpo["max_abs_advantage"] > 0.1, grpo
    assert grpo["policy_change"] > 100 * TOL and grpo["metrics"]["policy/kl_loss"] > 0, grpo
    for name, run in grpo["meshes"].items():
        assert run["max_policy_diff"] < TOL and run["max_mu_diff"] < TOL, (name, run)
        for key, value in run["metrics"].items():
            ref = grpo["metrics"][key]
            assert abs(value - ref) < TOL * max(1.0, abs(ref)), (name, key, value, ref)


# ----------------------------------------------------------------------------- subprocess


def _worker():
    """Runs under 8 fake CPU devices; prints one JSON line."""
    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np

    from common.mesh import batch_sharding, make_mesh, replicated, shard_batch
    from common.optim import make_optimizer
    from common.train_state import build_train_state
    from models.sharding import DEFAULT_RULES, param_path, shard_params
    from models.transformer import TransformerConfig, init_params
    from ppo.rollout import ModelSpecs, make_rollout_fn
    from ppo.update import UPDATE_KEYS, ppo_loss, ppo_update
    from rm.model import RewardModel

    timings = {}  # CPU seconds (process time) per phase: wall time depends on other load
    t = time.process_time()
    pcfg, vcfg = TransformerConfig(**POLICY), TransformerConfig(**VALUE)
    policy = jax.device_get(jax.jit(init_params, static_argnums=0)(pcfg, jax.random.key(SEED)))
    # Make EOS likely from some hidden states (a random model would almost never emit it in
    # 6 tokens), so response masks are ragged.
    lm = np.array(policy["lm_head"]["kernel"])
    lm[:, EOS] = EOS_BOOST * lm[:, EOS]
    policy["lm_head"]["kernel"] = lm
    # Reference = perturbed policy, so the KL penalty (and its share of the rewards) is nonzero.
    noise = np.random.RandomState(SEED + 1)
    ref = jax.tree.map(lambda x: (x + REF_NOISE * noise.standard_normal(x.shape)).astype(np.float32), policy)
    ids1 = jnp.ones((1, 2), jnp.int32)
    reward = jax.device_get(jax.jit(lambda k: RewardModel(vcfg).init(k, ids1, ids1)["params"])(jax.random.key(2)))
    value = jax.tree.map(lambda x: np.asarray(x) + 0.0, reward)  # a trainable copy, as in train.py
    params0 = {"policy": policy, "value": value}
    specs = ModelSpecs(policy=pcfg, reward=vcfg, value=vcfg)

    rs = np.random.RandomState(0)
    lengths = np.array([5, 1, 3, 4, 2, 5, 3, 1])
    qmask = (np.arange(PROMPT_LEN)[None, :] >= PROMPT_LEN - lengths[:, None]).astype(np.int32)  # left padding
    qids = (rs.randint(2, POLICY["vocab_size"], size=(BATCH, PROMPT_LEN)) * qmask).astype(np.int32)
    norm = jnp.array([1.0, 0.0], jnp.float32)
    beta = jnp.float32(BETA)
    roll_rng = jax.random.key(3)
    rollout_fn = make_rollout_fn(specs, SETTINGS)
    timings["setup_s"] = round(time.process_time() - t, 2)

    def flat(tree):
        return {param_path(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}

    def max_diff(a, b):
        fa, fb = flat(a), flat(b)
        assert fa.keys() == fb.keys()
        return max(float(np.max(np.abs(fa[k].astype(np.float64) - fb[k]))) for k in fa)

    def worst(a, b):  # the three leaves that differ most, for failure messages
        fa, fb = flat(a), flat(b)
        diffs = {k: float(np.max(np.abs(fa[k].astype(np.float64) - fb[k]))) for k in fa}
        return sorted(diffs.items(), key=lambda kv: -kv[1])[:3]

    # ---- rollout on one device
    t = time.process_time()
    dev0 = jax.devices()[0]
    on0 = functools.partial(jax.device_put, device=dev0)
    rollout = jax.device_get(
        jax.jit(rollout_fn)(on0(params0), on0(ref), on0(reward), on0(norm), beta, on0(qids), on0(qmask), roll_rng)
    )
    timings["rollout_single_s"] = round(time.process_time() - t, 2)
    report = {"device_count": jax.device_count()}
    floats = (
        "logprobs",
        "ref_logprobs",
        "values",
        "rewards",
        "advantages",
        "returns",
        "scores",
        "raw_scores",
        "kl",
        "entropy",
    )
    report["rollout"] = {
        "max_abs_kl": float(np.max(np.abs(rollout.kl))),
        "eos_rows": int(np.sum(rollout.ended_with_eos)),
        "response_lengths": np.sum(rollout.response_mask, axis=1).tolist(),
        "finite": bool(all(np.all(np.isfinite(getattr(rollout, k))) for k in floats)),
    }

    # ---- rollout under the (2, 4) mesh: params and prompts sharded, same sampled tokens
    t = time.process_time()
    mesh = make_mesh((2, 4))
    prompts = shard_batch({"ids": qids, "mask": qmask}, mesh)
    sharded_params = shard_params(params0, mesh, DEFAULT_RULES)
    mesh_rollout = jax.jit(rollout_fn)(
        sharded_params,
        shard_params(ref, mesh, DEFAULT_RULES),
        shard_params(reward, mesh, DEFAULT_RULES),
        norm,
        beta,
        prompts["ids"],
        prompts["mask"],
        roll_rng,
    )
    mesh_rollout = jax.device_get(mesh_rollout)
    report["mesh_rollout"] = {
        "q_kernel_spec": list(sharded_params["policy"]["layers_0"]["attn"]["q_proj"]["kernel"].sharding.spec),
        "query_ids_spec": list(prompts["ids"].sharding.spec),
        "response_ids_equal": bool(np.array_equal(mesh_rollout.response_ids, rollout.response_ids)),
        "response_mask_equal": bool(np.array_equal(mesh_rollout.response_mask, rollout.response_mask)),
        "max_diff": {k: float(np.max(np.abs(getattr(mesh_rollout, k) - getattr(rollout, k)))) for k in floats},
    }
    timings["rollout_2x4_s"] = round(time.process_time() - t, 2)

    # ---- PPO update: one device, then each mesh, from the same state and rollout batch
    updates_total = UPDATE["ppo_epochs"] * UPDATE["num_minibatches"]
    tx, _ = make_optimizer(
        learning_rate=1e-3,
        total_steps=2 * updates_total,
        warmup_steps=0,
        weight_decay=0.01,
        max_grad_norm=1.0,
        eps=ADAM_EPS,
    )
    state0 = jax.device_get(
        {
            "params": params0,
            "opt_state": tx.init(params0),
            "step": jnp.asarray(0, jnp.int32),
            "rng": jax.random.key_data(jax.random.key(4)),
        }
    )
    batch = {k: np.asarray(getattr(rollout, k)) for k in UPDATE_KEYS}
    loss_fn = functools.partial(ppo_loss, specs=specs, temperature=SETTINGS["temperature"], **LOSS)
    update = functools.partial(ppo_update, tx=tx, loss_fn=loss_fn, **UPDATE)

    def summarise(state, metrics):
        return jax.device_get(state), {k: float(v) for k, v in jax.device_get(metrics).items()}

    t = time.process_time()
    frozen = {}  # what ppo/train.py passes as the update's non-trainable tree when there is no LoRA
    single_state, single_metrics = summarise(*jax.jit(update)(on0(state0), on0(batch), frozen))
    report["single"] = {
        "metrics": single_metrics,
        "policy_change": max_diff(single_state["params"]["policy"], params0["policy"]),
        "value_change": max_diff(single_state["params"]["value"], params0["value"]),
    }
    timings["update_single_s"] = round(time.process_time() - t, 2)

    report["meshes"] = {}
    for shape in MESHES:
        t = time.process_time()
        mesh = make_mesh(shape)
        # The same state as state0 (Adam moments start at 0), built as ppo/train.py builds it.
        built = build_train_state(params0, frozen, tx, mesh=mesh, rules=DEFAULT_RULES, rng=jax.random.key(4))
        update_fn = jax.jit(
            update,
            in_shardings=(built.state_sharding, batch_sharding(mesh), built.frozen_sharding),
            out_shardings=(built.state_sharding, replicated(mesh)),
            donate_argnums=(0,),
        )
        state, metrics = update_fn(built.state, shard_batch(batch, mesh), built.frozen)
        q_spec = list(state["params"]["policy"]["layers_0"]["attn"]["q_proj"]["kernel"].sharding.spec)
        state, metrics = summarise(state, metrics)
        report["meshes"]["x".join(map(str, shape))] = {
            "q_kernel_spec": q_spec + [None] * (2 - len(q_spec)),
            "step": int(state["step"]),
            "metrics": metrics,
            "max_policy_diff": max_diff(state["params"]["policy"], single_state["params"]["policy"]),
            "max_value_diff": max_diff(state["params"]["value"], single_state["params"]["value"]),
            "max_mu_diff": max_diff(state["opt_state"][1][0].mu, single_state["opt_state"][1][0].mu),
            "worst": worst(state["params"], single_state["params"]),
        }
        timings["update_" + "x".join(map(str, shape)) + "_s"] = round(time.process_time() - t, 2)

    # ---- critic-free GRPO: rollout on one device, update on one device and under two meshes
    t = time.process_time()
    cf_specs = ModelSpecs(policy=pcfg, reward=vcfg, value=vcfg, critic=False)
    cf_rollout_fn = make_rollout_fn(cf_specs, dict(SETTINGS, advantage="grpo", group_size=GRPO_K, kl_in_loss=True))
    cf_params0 = {"policy": policy}
    cf_rollout = jax.device_get(
        jax.jit(cf_rollout_fn)(on0(cf_params0), on0(ref), on0(reward), on0(norm), beta, on0(qids), on0(qmask), roll_rng)
    )
    cf_state0 = jax.device_get(
        {
            "params": cf_params0,
            "opt_state": tx.init(cf_params0),
            "step": jnp.asarray(0, jnp.int32),
            "rng": jax.random.key_data(jax.random.key(4)),
        }
    )
    keys = tuple(k for k in UPDATE_KEYS if k not in ("values", "returns")) + ("ref_logprobs", "kl_coef")
    cf_batch = {k: np.asarray(getattr(cf_rollout, k)) for k in keys}
    cf_loss = functools.partial(
        ppo_loss, specs=cf_specs, temperature=SETTINGS["temperature"], **LOSS, variant=GRPO_VARIANT, kl_in_loss=True
    )
    cf_update = functools.partial(ppo_update, tx=tx, loss_fn=cf_loss, group_size=GRPO_K, **UPDATE)
    cf_single, cf_metrics = summarise(*jax.jit(cf_update)(on0(cf_state0), on0(cf_batch), {}))
    report["grpo"] = {
        "param_trees": sorted(cf_single["params"]),
        "metrics": cf_metrics,
        "max_abs_advantage": float(np.max(np.abs(cf_rollout.advantages))),
        "policy_change": max_diff(cf_single["params"]["policy"], policy),
        "meshes": {},
    }
    for shape in GRPO_MESHES:
        mesh = make_mesh(shape)
        built = build_train_state(cf_params0, {}, tx, mesh=mesh, rules=DEFAULT_RULES, rng=jax.random.key(4))
        update_fn = jax.jit(
            cf_update,
            in_shardings=(built.state_sharding, batch_sharding(mesh), {}),
            out_shardings=(built.state_sharding, replicated(mesh)),
            donate_argnums=(0,),
        )
        state, metrics = summarise(*update_fn(built.state, shard_batch(cf_batch, mesh), {}))
        report["grpo"]["meshes"]["x".join(map(str, shape))] = {
            "metrics": metrics,
            "max_policy_diff": max_diff(state["params"]["policy"], cf_single["params"]["policy"]),
            "max_mu_diff": max_diff(state["opt_state"][1][0].mu, cf_single["opt_state"][1][0].mu),
        }
    timings["grpo_s"] = round(time.process_time() - t, 2)
    report["timings"] = timings
    print(json.dumps(report))


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()
