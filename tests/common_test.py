"""Tests of common/ (checkpoints, metrics, optimizers, mesh, run utils) and experiments/run.py."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from common import checkpoint, metrics, optim, run_utils

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _subprocess_env(*extra_paths, **env):
    merged = dict(os.environ, JAX_PLATFORMS="cpu", **env)
    merged["PYTHONPATH"] = os.pathsep.join([*extra_paths, REPO, os.environ.get("PYTHONPATH", "")])
    return merged


# ----------------------------------------------------------------------------- checkpoint


def _state(seed):
    rng = np.random.default_rng(seed)
    return {
        "params": {
            "w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=(4,)), jnp.bfloat16),
        },
        "step": jnp.asarray(seed, jnp.int32),
        "rng": jax.random.key(seed),
        "raw_rng": checkpoint.rng_to_data(jax.random.key(seed + 100)),
        "table": rng.integers(0, 10, size=(5,)).astype(np.int64),
    }


def test_checkpoint_roundtrip_keep_and_skip(tmp_path):
    manager = checkpoint.CheckpointManager(tmp_path / "checkpoints", save_every=2, max_to_keep=2)
    assert manager.latest_step() is None
    with pytest.raises(FileNotFoundError):
        manager.restore(_state(0))
    saved = {}
    for step in range(1, 7):
        did_save = manager.save(step, _state(step), {"data_position": step * 10, "kl": 0.5 / step})
        assert did_save == (step % 2 == 0)
        if did_save:
            saved[step] = _state(step)
    assert manager.save(7, _state(7), {"data_position": 70}, force=True)
    assert not manager.save(7, _state(7), force=True)  # Already on disk.
    assert manager.latest_step() == 7
    assert manager.all_steps() == [6, 7]  # max_to_keep=2 deleted 2 and 4.
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["6", "7"]

    # Restore step 6 into an abstract template (eval_shape), and latest into a concrete one.
    template = jax.eval_shape(lambda: _state(0))
    template["table"] = np.zeros(5, np.int64)  # eval_shape turns numpy into jax structs.
    state, extra = manager.restore(template, step=6)
    assert extra == {"data_position": 60, "kl": 0.5 / 6}
    expected = saved[6]
    np.testing.assert_array_equal(state["params"]["w"], expected["params"]["w"])
    np.testing.assert_array_equal(
        np.asarray(state["params"]["b"], np.float32), np.asarray(expected["params"]["b"], np.float32)
    )
    assert state["params"]["b"].dtype == jnp.bfloat16
    assert int(state["step"]) == 6 and state["step"].dtype == jnp.int32
    np.testing.assert_array_equal(jax.random.key_data(state["rng"]), jax.random.key_data(jax.random.key(6)))
    np.testing.assert_array_equal(
        jax.random.key_data(checkpoint.rng_from_data(state["raw_rng"])), jax.random.key_data(jax.random.key(106))
    )
    np.testing.assert_array_equal(state["table"], expected["table"])
    state7, extra7 = manager.restore(_state(0))
    assert int(state7["step"]) == 7 and extra7 == {"data_position": 70}
    with pytest.raises(FileNotFoundError, match="available steps"):
        manager.restore(_state(0), step=2)
    manager.close()

    # A fresh manager on the same directory (a resumed run) sees the same steps.
    reopened = checkpoint.CheckpointManager(tmp_path / "checkpoints", save_every=2)
    assert reopened.latest_step() == 7
    # Template dtype differs from the saved one (f32 -> bf16): restored in the template's.
    cast_template = jax.tree.map(lambda x: x, _state(0))
    cast_template["params"]["w"] = jax.ShapeDtypeStruct((3, 4), jnp.bfloat16)
    state, _ = reopened.restore(cast_template)
    assert state["params"]["w"].dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(state["params"]["w"], np.float32), np.asarray(_state(7)["params"]["w"], np.float32), rtol=1e-2
    )
    # Partial restore: only the params subtree of the saved state.
    params_only, extra = reopened.restore({"params": jax.eval_shape(lambda: _state(0)["params"])}, partial=True)
    assert set(params_only) == {"params"} and extra == {"data_position": 70}
    np.testing.assert_array_equal(params_only["params"]["w"], _state(7)["params"]["w"])
    # restore_subtree: shapes/dtypes from the checkpoint's metadata, no template needed.
    params_sub, extra = reopened.restore_subtree("params")
    assert extra == {"data_position": 70} and params_sub["b"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(params_sub["w"], _state(7)["params"]["w"])
    with pytest.raises(KeyError, match="no 'nope'"):
        reopened.restore_subtree("nope")
    with pytest.raises(ValueError, match="do not match"):  # Without partial=True they must.
        reopened.restore({"params": _state(0)["params"]})
    reopened.close()


# ----------------------------------------------------------------------------- metrics


def test_metrics_writer_resume_truncates(tmp_path):
    with metrics.MetricsWriter(tmp_path) as writer:
        for step in range(1, 6):
            writer.write(step, {"train": {"loss": jnp.float32(1.0 / step)}, "n": np.int64(step), "ok": jnp.bool_(True)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "train/lo')  # Torn line from a SIGKILL mid-write.
    records = metrics.read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert records[1] == {"step": 2, "train/loss": 0.5, "n": 2, "ok": True}
    assert isinstance(records[1]["n"], int)

    with metrics.MetricsWriter(tmp_path, resume_step=3) as writer:
        writer.write(4, {"train/loss": 7.0})
    records = metrics.read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["train/loss"] == 7.0

    with metrics.MetricsWriter(tmp_path) as writer:  # resume_step=None appends.
        writer.write(5, {"x": 1})
        with pytest.raises(TypeError, match="'bad'"):
            writer.write(6, {"bad": np.ones(3)})
        with pytest.raises(ValueError, match="reserved"):
            writer.write(6, {"step": 1})
    assert [r["step"] for r in metrics.read_metrics(tmp_path)] == [1, 2, 3, 4, 5]


def test_write_config_json_and_progress(tmp_path):
    import ml_collections

    config = ml_collections.ConfigDict({"trainer": "rm", "optim": {"learning_rate": 1e-5}})
    path = metrics.write_config_json(tmp_path, config)
    with open(path) as f:
        assert json.load(f) == {"trainer": "rm", "optim": {"learning_rate": 1e-5}}
    bar = metrics.Progress(10, initial=2, desc="test")
    bar.update(3, loss=jnp.float32(0.25))
    assert bar._bar.n == 5
    bar.close()


# ----------------------------------------------------------------------------- optim


def _hand_schedule(t, *, lr, total, warmup, floor_ratio):
    if t < warmup:
        return lr * t / warmup
    progress = min(1.0, (t - warmup) / (total - warmup))
    floor = floor_ratio * lr
    return floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("warmup", [0, 10])
def test_schedule_matches_hand_formula(warmup):
    schedule = optim.make_schedule(learning_rate=3e-4, total_steps=100, warmup_steps=warmup, min_lr_ratio=0.1)
    for t in [0, 1, 5, 9, 10, 11, 50, 99, 100, 150]:
        expected = _hand_schedule(t, lr=3e-4, total=100, warmup=warmup, floor_ratio=0.1)
        np.testing.assert_allclose(float(schedule(t)), expected, rtol=1e-5, atol=1e-12)
    with pytest.raises(ValueError, match="larger than warmup"):
        optim.make_schedule(learning_rate=1.0, total_steps=10, warmup_steps=10)


def _params():
    return {
        "backbone": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones((2,))},
        "lora": {"a": jnp.full((3, 2), 0.5), "scale": jnp.ones((2,))},
    }


@pytest.mark.parametrize("mode", ["tree", "callable"])
def test_optimizer_trainable_mask(mode):
    params = _params()
    if mode == "tree":
        trainable = {"backbone": {"kernel": False, "bias": False}, "lora": {"a": True, "scale": True}}
    else:
        trainable = lambda path: path.startswith("lora/")
    tx, schedule = optim.make_optimizer(
        learning_rate=0.1, total_steps=10, warmup_steps=0, weight_decay=0.5, max_grad_norm=1.0, trainable=trainable
    )
    opt_state = tx.init(params)
    # Adam moments exist only for the two trainable leaves.
    moment_leaves = [x for x in jax.tree.leaves(opt_state) if jnp.ndim(x) > 0]
    assert sorted(x.shape for x in moment_leaves) == sorted([(3, 2), (2,)] * 2)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 3.0), params)
    updates, _ = tx.update(grads, opt_state, params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(new["backbone"]["kernel"], params["backbone"]["kernel"])
    np.testing.assert_array_equal(new["backbone"]["bias"], params["backbone"]["bias"])
    # Hand AdamW step 0 (lr = 0.1): the clipped grad is g*c, first Adam step gives
    # m_hat/sqrt(v_hat) = sign(g) = 1, so update = -lr * (1 + wd * p) for matrices and
    # -lr * 1 for 1-D leaves (no decay on them).
    lr = float(schedule(0))
    np.testing.assert_allclose(new["lora"]["a"], 0.5 - lr * (1 + 0.5 * 0.5), rtol=1e-5)
    np.testing.assert_allclose(new["lora"]["scale"], 1.0 - lr, rtol=1e-5)


def test_optimizer_clipping_uses_trainable_grads_only():
    params = _params()
    # b1=b2=0 and eps=1 make the first Adam update -lr * g / (|g| + 1), which depends
    # on the clipped gradient's scale, so the clip factor is visible.
    tx, _ = optim.make_optimizer(
        learning_rate=0.1,
        total_steps=10,
        warmup_steps=0,
        max_grad_norm=1.0,
        b1=0.0,
        b2=0.0,
        eps=1.0,
        trainable=lambda path: path.startswith("lora/"),
    )
    grads = jax.tree.map(lambda p: jnp.full_like(p, 2.0), params)
    grads["backbone"]["kernel"] = jnp.full((3, 2), 1e6)  # Frozen and huge: must not count.
    updates, _ = tx.update(grads, tx.init(params), params)
    trainable_norm = 2.0 * math.sqrt(6 + 2)  # lora/a has 6 entries, lora/scale 2.
    clipped = 2.0 / trainable_norm
    np.testing.assert_allclose(updates["lora"]["a"], -0.1 * clipped / (clipped + 1.0), rtol=1e-5)
    np.testing.assert_allclose(updates["lora"]["scale"], -0.1 * clipped / (clipped + 1.0), rtol=1e-5)
    np.testing.assert_array_equal(updates["backbone"]["kernel"], 0.0)


def _mean_loss(params, batch, rng):
    del rng
    pred = jnp.tanh(batch["x"] @ params["w"] + params["b"])  # [B, 1]
    per_example = (pred[:, 0] - batch["y"]) ** 2  # [B]
    return jnp.mean(per_example), {"mse": jnp.mean(per_example), "count": jnp.int32(batch["y"].shape[0])}


@pytest.mark.parametrize("accum_steps", [1, 2, 4])
def test_accumulate_gradients_equals_full_batch(accum_steps):
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(5, 1)), jnp.float32), "b": jnp.zeros((1,))}
    batch = {
        "x": jnp.asarray(rng.normal(size=(8, 5)), jnp.float32),
        "y": jnp.asarray(rng.normal(size=(8,)), jnp.float32),
    }
    (full_loss, _), full_grads = jax.value_and_grad(_mean_loss, has_aux=True)(params, batch, None)
    fn = jax.jit(lambda p, b, r: optim.accumulate_gradients(_mean_loss, p, b, r, accum_steps=accum_steps))
    loss, aux, grads = fn(params, batch, jax.random.key(0))
    np.testing.assert_allclose(loss, full_loss, atol=1e-6)
    np.testing.assert_allclose(aux["mse"], full_loss, atol=1e-6)
    np.testing.assert_allclose(aux["count"], 8 / accum_steps)
    for name in params:
        np.testing.assert_allclose(grads[name], full_grads[name], atol=1e-6)


def test_accumulate_gradients_rng_and_errors():
    def loss_fn(params, batch, rng):
        noise = jax.random.uniform(rng, ())
        return jnp.sum(params) * 0.0 + noise, {"noise": noise}

    params, batch, rng = jnp.ones(2), {"x": jnp.zeros((6, 1))}, jax.random.key(3)
    _, aux, _ = optim.accumulate_gradients(loss_fn, params, batch, rng, accum_steps=3)
    expected = np.mean([float(jax.random.uniform(jax.random.fold_in(rng, i), ())) for i in range(3)])
    np.testing.assert_allclose(aux["noise"], expected, rtol=1e-6)
    with pytest.raises(ValueError, match=r"'x' has batch size 6.*accum_steps=4"):
        optim.accumulate_gradients(loss_fn, params, batch, rng, accum_steps=4)


# ----------------------------------------------------------------------------- mesh


_MESH_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, sys
    from common import mesh as mesh_lib, checkpoint
    assert jax.device_count() == 8
    mesh = mesh_lib.make_mesh((-1, 2))
    assert dict(mesh.shape) == {'data': 4, 'model': 2}, mesh.shape
    x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    out = mesh_lib.shard_batch({'x': x}, mesh)['x']
    np.testing.assert_array_equal(np.asarray(out), x)
    rows = sorted((s.index[0].start, s.index[0].stop) for s in out.addressable_shards)
    assert rows == sorted([(0, 4), (4, 8), (8, 12), (12, 16)] * 2), rows
    for shape in [(3, 4), (-1, -1), (16, 1)]:
      try:
        mesh_lib.make_mesh(shape); raise AssertionError(shape)
      except ValueError as e:
        assert 'make_mesh' in str(e)
    try:
      mesh_lib.shard_batch({'ids': np.zeros((6, 2))}, mesh); raise AssertionError
    except ValueError as e:
      assert "['ids']" in str(e) and '4' in str(e), e
    # Checkpoint restored straight into a sharded layout.
    sharding = mesh_lib.batch_sharding(mesh)
    w = jax.device_put(jnp.arange(8.0).reshape(8, 1), sharding)
    ckpt = checkpoint.CheckpointManager(sys.argv[1], save_every=1)
    ckpt.save(1, {'w': w})
    tmpl = {'w': jax.ShapeDtypeStruct((8, 1), jnp.float32, sharding=mesh_lib.replicated(mesh))}
    restored, _ = ckpt.restore(tmpl)
    assert restored['w'].sharding == mesh_lib.replicated(mesh)
    np.testing.assert_array_equal(np.asarray(restored['w']), np.arange(8.0).reshape(8, 1))
    ckpt.close()
    print('MESH_OK')
""")


def test_mesh_and_sharded_restore_on_8_devices(tmp_path):
    env = _subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=8")
    result = subprocess.run(
        [sys.executable, "-c", _MESH_SCRIPT, str(tmp_path / "ck")], env=env, capture_output=True, text=True, timeout=120
    )
    assert "MESH_OK" in result.stdout, result.stderr[-3000:]


# ----------------------------------------------------------------------------- run utils


def test_preemption_handler_catches_sigterm():
    previous = signal.getsignal(signal.SIGTERM)
    with run_utils.PreemptionHandler() as preemption:
        assert not preemption.requested
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(100):  # Python runs the handler between bytecodes; allow a moment.
            if preemption.requested:
                break
            time.sleep(0.01)
        assert preemption.requested and preemption.sync_requested()
    assert signal.getsignal(signal.SIGTERM) == previous


def test_check_finite_message(tmp_path):
    assert run_utils.check_finite(1.5, step=3, name="train/loss") == 1.5
    with pytest.raises(FloatingPointError) as error:
        run_utils.check_finite(
            jnp.float32(jnp.nan), step=12, name="train/loss", workdir=tmp_path, last_checkpoint_step=10
        )
    message = str(error.value)
    for part in ["train/loss", "nan", "step 12", "step 10", str(tmp_path / "checkpoints")]:
        assert part in message, (part, message)
    with pytest.raises(FloatingPointError, match="2 non-finite"):
        run_utils.check_finite(np.array([1.0, np.inf, -np.inf]), step=1, name="grads")


# ----------------------------------------------------------------------------- experiments/run.py


def _write_run_fixture(tmp_path, trainer):
    """A package with a tiny trainer module and a config naming `trainer`."""
    package = tmp_path / "pkg_for_run_test"
    package.mkdir(exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "my_trainer.py").write_text(
        textwrap.dedent("""
      import json, os
      def train(config, workdir):
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, 'called.json'), 'w') as f:
          json.dump({'lr': config.lr, 'arg': config.arg}, f)
  """)
    )
    config_path = tmp_path / f"config_{trainer.replace('.', '_')}.py"
    config_path.write_text(
        textwrap.dedent(f"""
      import ml_collections
      def get_config(arg=None):
        config = ml_collections.ConfigDict()
        config.trainer = {trainer!r}  # trainer key or module path
        config.lr = 0.1  # learning rate
        config.arg = arg or ''  # the config argument
        return config
  """)
    )
    return config_path


def _run(tmp_path, *args):
    return subprocess.run(
        [sys.executable, "-m", "experiments.run", *args],
        cwd=REPO,
        env=_subprocess_env(str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_run_dispatches_to_dotted_trainer(tmp_path):
    config_path = _write_run_fixture(tmp_path, "pkg_for_run_test.my_trainer")
    workdir = tmp_path / "w"
    result = _run(tmp_path, f"--config={config_path}:hello", f"--workdir={workdir}", "--config.lr=0.25")
    assert result.returncode == 0, result.stderr[-3000:]
    with open(workdir / "called.json") as f:
        assert json.load(f) == {"lr": 0.25, "arg": "hello"}


def test_run_errors(tmp_path):
    config_path = _write_run_fixture(tmp_path, "pkg_for_run_test.my_trainer")
    workdir = tmp_path / "w"
    result = _run(tmp_path, f"--config={config_path}", f"--workdir={workdir}", "--config.nope=1")
    assert result.returncode != 0
    assert "unknown config key nope in ['--config.nope']" in result.stderr, result.stderr[-3000:]

    result = _run(tmp_path, f"--config={config_path}")  # --workdir is required.
    assert result.returncode != 0 and "workdir" in result.stderr

    config_path = _write_run_fixture(tmp_path, "no_such_trainer")
    result = _run(tmp_path, f"--config={config_path}", f"--workdir={workdir}")
    assert result.returncode != 0
    assert (
        "Unknown config.trainer 'no_such_trainer'; known trainers: "
        "['overoptimization', 'ppo', 'quickstart', 'rm', 'sft']"
    ) in result.stderr
    assert not os.path.exists(workdir)
