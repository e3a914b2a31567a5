"""benchmarks/gpu.py (and gpu_shapes.py): the FLOPs/MFU formulas against hand calculations, and a tiny CPU run end to end."""

import json
import math
import os
import statistics
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from benchmarks import gpu, gpu_shapes
from models.transformer import TransformerConfig
from rm.model import RewardModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SMALL_LLAMA = TransformerConfig(
    family="llama", vocab_size=100, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128
)
SMALL_GPT2 = TransformerConfig(
    family="gpt2",
    vocab_size=100,
    d_model=32,
    n_layers=3,
    n_heads=4,
    n_kv_heads=4,
    head_dim=8,
    d_ff=128,
    qkv_bias=True,
    o_bias=True,
    mlp_bias=True,
    activation="gelu_new",
    tie_embeddings=True,
)


def test_flops_per_token_small_llama_by_hand():
    # Per layer: q 64*64 + k 64*32 + v 64*32 + o 64*64 = 12288; SwiGLU 3*64*128 = 24576;
    # two RMSNorms 2*64 = 128 -> 36992. Two layers + final norm: 73984 + 64 = 74048.
    assert gpu_shapes.non_embedding_params(SMALL_LLAMA) == 74048
    # Scalar head d + 1 = 65 -> N = 74113. 6N = 444678; attention 12 * 2 layers * (4*16) * T=32 = 49152.
    assert gpu_shapes.train_flops_per_token(SMALL_LLAMA, 32, extra_params=65) == 444678 + 49152


def test_flops_per_token_small_gpt2_by_hand():
    # Per layer: q,k,v,o 4 * 32*32 = 4096 + biases 3*32 + 32 = 128; MLP 2*32*128 = 8192 + biases 128 + 32;
    # two LayerNorms 2 * (32 + 32) = 128 -> 12704. Three layers + final LayerNorm 64: 38112 + 64 = 38176.
    assert gpu_shapes.non_embedding_params(SMALL_GPT2) == 38176
    # No extra params: 6 * 38176 = 229056; attention 12 * 3 * 32 * T=10 = 11520.
    assert gpu_shapes.train_flops_per_token(SMALL_GPT2, 10) == 229056 + 11520


def test_llama_1b_shape_by_hand():
    cfg = gpu_shapes.MODEL_SHAPES["1b"]
    layer = 2048 * 2048 * 2 + 2048 * 512 * 2 + 3 * 2048 * 8192 + 2 * 2048  # q,o + k,v + SwiGLU + norms
    assert gpu_shapes.non_embedding_params(cfg) == 16 * layer + 2048 == 973_146_112
    flops = gpu_shapes.train_flops_per_token(cfg, 512, extra_params=2049)
    assert flops == 6 * (973_146_112 + 2049) + 12 * 16 * 2048 * 512
    assert math.isclose(flops, 6.04e9, rel_tol=1e-3)


@pytest.mark.parametrize("cfg", [SMALL_LLAMA, SMALL_GPT2], ids=["llama", "gpt2"])
def test_non_embedding_params_match_the_model(cfg):
    # Independent count: every leaf of the real reward model except the embedding table and the head.
    ids = jnp.zeros((1, 2), jnp.int32)
    shapes = jax.eval_shape(lambda: RewardModel(cfg).init(jax.random.key(0), ids, jnp.ones_like(ids))["params"])
    backbone = {k: v for k, v in shapes["backbone"].items() if k not in ("embed", "pos_embed")}
    assert gpu_shapes.non_embedding_params(cfg) == sum(math.prod(x.shape) for x in jax.tree.leaves(backbone))


def test_peak_table_and_mfu():
    assert gpu_shapes.peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_shapes.peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu_shapes.peak_bf16_flops("NVIDIA H200") == 989e12
    assert gpu_shapes.peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_shapes.peak_bf16_flops("TPU v5 lite") == 197e12
    assert gpu_shapes.peak_bf16_flops("TPU v5p") == 459e12
    assert gpu_shapes.peak_bf16_flops("TPU v4") == 275e12
    assert gpu_shapes.peak_bf16_flops("cpu") is None
    # 50,000 tokens/s at 6.04e9 FLOPs/token = 3.02e14 FLOP/s; on a 989e12 chip that is 30.5%.
    assert math.isclose(gpu_shapes.mfu(50_000, 6.04e9, 989e12), 3.02e14 / 989e12)
    assert math.isclose(gpu_shapes.mfu(50_000, 6.04e9, 989e12), 0.30536, rel_tol=1e-4)
    assert gpu_shapes.mfu(50_000, 6.04e9, None) is None


def test_cli_checks(capsys):
    assert gpu.parse_args(["--sizes", "rm_pairs=16, rm_seq=1024"]).sizes == {"rm_pairs": 16, "rm_seq": 1024}
    for argv, message in (
        (["--only", "rm,sampl"], "sampl"),
        (["--sizes", "rm_batch=3"], "rm_batch"),
        (["--sizes", "rm_seq=0"], "positive integer"),
    ):
        with pytest.raises(SystemExit):
            gpu.parse_args(argv)
        assert message in capsys.readouterr().err


_FAKE_RM = dict(
    pairs=1, seq_len=2, tokens_per_s=1000.0, step_s=0.004, model_tflops_per_s=1.0, peak_flops=None, mfu=None
)


def test_a_failing_section_is_recorded_and_the_rest_kept(tmp_path, monkeypatch, capsys):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")

    monkeypatch.setattr(gpu, "bench_sampling", out_of_memory)
    monkeypatch.setattr(gpu, "bench_rm_train", lambda *a, **k: _FAKE_RM)
    out = tmp_path / "r.json"
    with pytest.raises(SystemExit, match="failed: sampling"):
        gpu.main(["--shape", "tiny", "--only", "rm,sampling", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["results"]["sampling"]["error"].startswith("RuntimeError: RESOURCE_EXHAUSTED")
    assert report["results"]["rm"]["tokens_per_s"] == 1000.0
    assert "| sampling | FAILED |" in capsys.readouterr().out


def test_tiny_run_end_to_end(tmp_path):
    out = tmp_path / "gpu.json"
    # The run is dominated by XLA:CPU compilation of ~10 small programs; optimisation level 0
    # compiles them about a third faster (CPU run speed is irrelevant here).
    flags = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + flags).strip())
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", "--shape", "tiny", "--reps", "2", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| RM train step |" in proc.stdout and "| PPO: update |" in proc.stdout
    report = json.loads(out.read_text())

    env_info = report["environment"]
    assert env_info["backend"] == "cpu" and env_info["shape"] == "tiny" and env_info["jax_version"] == jax.__version__
    assert env_info["model_config"]["d_model"] == 64 and env_info["model_config"]["n_layers"] == 2
    assert env_info["sizes"]["rm_pairs"] == 4 and env_info["sizes"]["sample_batch"] == 4

    rm = report["results"]["rm"]
    assert rm["tokens_per_s"] > 0 and rm["mfu"] is None and rm["peak_flops"] is None  # CPU: no peak
    assert len(rm["times_s"]) == 2 and rm["median_s"] == statistics.median(rm["times_s"])
    assert math.isclose(rm["step_s"], rm["median_s"] / rm["steps_per_rep"])
    assert math.isclose(rm["tokens_per_s"], 2 * 4 * 64 / rm["step_s"])
    cfg = gpu_shapes.MODEL_SHAPES["tiny"]
    assert rm["flops_per_token"] == gpu_shapes.train_flops_per_token(cfg, 64, extra_params=cfg.d_model + 1)

    sampling = report["results"]["sampling"]
    assert sampling["tokens_per_s"] > 0
    assert math.isclose(sampling["tokens_per_s"], 4 * 16 / sampling["median_s"])

    ppo = report["results"]["ppo"]
    for key in ("rollout_s", "policy_value_ref_forward_s", "update_s", "iteration_s"):
        assert ppo[key] > 0, key
    assert math.isclose(ppo["iteration_s"], ppo["rollout_s"] + ppo["update_s"])
    assert math.isclose(ppo["generation_and_scoring_s"], ppo["rollout_s"] - ppo["policy_value_ref_forward_s"])
