"""One-accelerator speed check at a ~1B Llama shape with random weights (no downloads).

    python -m benchmarks.gpu [--shape 1b|tiny] [--remat] [--reps 3] [--only rm,sampling,ppo]
        [--sizes rm_pairs=16,rm_seq=1024] [--out benchmarks/results/gpu.json]

`--shape` defaults to 1b, or to tiny when JAX's default backend is the CPU. Sized to finish in
under 5 minutes (compilation included) on one H100 / H200; one chip is used (the first device).

Shapes
  1b    Llama-3.2-1B: d_model 2048, 16 layers, 32 query heads, 8 KV heads, head_dim 64,
        d_ff 8192 (SwiGLU), vocab 128256, tied embeddings, RoPE theta 5e5 with llama3 scaling.
        1,235,814,400 parameters, 973,146,112 of them outside the embedding.
        Sizes: RM 4 pairs x 512 tokens (4096 tokens a step); sampling 32 prompts of 128 tokens
        + 128 new; PPO 16 prompts of 128 + 128 new, 1 epoch of 4 minibatches of 4.
  tiny  the same family at d_model 64, 2 layers, 4 heads, 2 KV heads, head_dim 16, d_ff 128,
        vocab 256; RM 4 pairs x 64, sampling and PPO 4 prompts of 16 + 16 new (a CPU smoke run;
        its numbers say nothing about accelerators).
`--sizes` overrides fields of `Sizes` (e.g. a larger RM batch with --remat). Every model
(policy, reference, reward, value) has the shape chosen. Parameters are created directly on
the device by `jax.jit(init, out_shardings=...)`.

Precision: trainable models keep float32 master parameters and Adam moments and compute in
bfloat16 (TransformerConfig dtype='bfloat16', param_dtype='float32'); logits, losses, softmax
and norms are float32 as the model code makes them. Frozen models (PPO reference and reward
model) and the sampling benchmark's weights are stored in bfloat16.

Measurements (each: one warm-up call, which includes compilation and is reported separately
as `first_call_s`, then the median over --reps timed calls, each ended by block_until_ready)
  rm        `rm.train.train_step` (concatenated [2B, T] chosen+rejected forward, Bradley-Terry
            loss, backward, global-norm clip, AdamW from `common.optim.make_optimizer`), jitted
            with the state donated. Tokens/s counts all 2*B*T tokens (no padding). MFU is
            achieved model FLOP/s over the chip's dense bf16 peak, with model FLOPs per token
            (`train_flops_per_token`, the PaLM appendix-B count):
                6 * N + 12 * n_layers * (n_heads * head_dim) * T
            N = non-embedding parameters (attention, MLP, norms, biases, plus the scalar head).
            The attention term counts the full T x T score and value matmuls (as this code
            computes them, causal mask applied afterwards). Recomputation under --remat is not
            counted (model FLOPs, not hardware FLOPs). Unknown chips get MFU null.
  sampling  `models.sampling.make_generate_fn` (KV cache, one jitted while_loop): B prompts of
            P real tokens, N new tokens each, temperature 0.7, EOS disabled so every row makes
            all N tokens. Tokens/s = B * N / (wall time of the whole call, prefill included).
  ppo       one PPO iteration as ppo/train.py runs it: `jax.jit(ppo.rollout.make_rollout_fn)`
            (sample, policy/value/reference forward, reward-model score, KL-shaped rewards,
            GAE) and `ppo.update.ppo_update` (clipped policy + value loss, AdamW on
            {policy, value}, state donated). Split: the rollout's policy + value + reference
            forward passes are also timed as their own jitted call on the rollout's responses
            (`policy_value_ref_forward_s`); generation + reward-model scoring + GAE is the rest,
            `generation_and_scoring_s` = rollout - that forward (derived, not timed alone);
            `iteration_s` = rollout + update. The update runs ppo_epochs x num_minibatches
            optimizer steps on the rollout batch.

Memory (1b, default sizes, no remat): XLA:CPU's memory_analysis of the same programs gives
arguments + temporaries of about 40 GiB for the RM step, 9 GiB for sampling, 32 GiB for the
rollout and 48 GiB for the update (+ 5 GiB of frozen bf16 models alongside), under the 59 GiB
that JAX takes by default on an 80 GB H100. GPU buffer assignment differs; a section that fails
(e.g. out of memory) is recorded as {"error": ...} in the JSON, the others still run, and the
exit status is 1. Larger batches: --remat and --sizes, or XLA_PYTHON_CLIENT_MEM_FRACTION=0.9.

Attention and log-probs: every model uses `--attention` (default auto: cuDNN flash attention on
a GPU in bf16, see models/attention.py) and `--logits-chunk` (default 128: PPO log-probs and
entropies over chunks of the hidden states, models/lm_head.py); `--mlp-chunk C` runs every MLP over
chunks of C positions (models/mlp.py). `--compare` also runs the RM
and PPO sections with the plain paths (attention='xla', logits_chunk=0, mlp_chunk=0) and prints a second
table, plain vs new, with step times, XLA temp bytes of the RM step and the PPO update and,
on GPU/TPU, the device's peak memory.

Output: a markdown table on stdout and JSON (--out) with the device kind, versions, shapes,
batch sizes, every repetition and, on GPU/TPU, the device's peak memory in use so far at the
end of each section (`peak_memory_bytes`, cumulative).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.gpu_report import comparison_table, environment, markdown_table
from benchmarks.gpu_shapes import (
    MODEL_SHAPES,
    SIZES,
    Sizes,
    mfu,
    peak_bf16_flops,
    train_flops_per_token,
)
from common.mesh import batch_sharding, make_mesh, replicated
from common.optim import make_optimizer
from common.train_state import build_train_state
from models.attention import ATTENTION_IMPLS
from models.sampling import make_generate_fn
from models.sharding import REPLICATED_RULES, abstract_sharded
from models.transformer import TransformerConfig, init_params
from ppo.rollout import ModelSpecs, make_rollout_fn, reference_logprobs, response_logprobs_and_values
from ppo.update import UPDATE_KEYS, ppo_loss, ppo_update
from rm.model import RewardModel
from rm.train import train_step

TEMPERATURE = 0.7
MEASUREMENTS = ("rm", "sampling", "ppo")


# ----------------------------------------------------------------------------- helpers


@functools.cache
def _jitted_init(kind: str, config: TransformerConfig, mesh):
    """jit(init, out_shardings) for a policy ('policy') or reward/value model ('rm'); rng is an argument,
    so every model of one kind shares one compiled program (RNG-heavy inits compile slowly on CPU)."""
    ids = jnp.zeros((1, 2), jnp.int32)

    def init(rng):
        if kind == "policy":
            return init_params(config, rng)
        return RewardModel(config).init(rng, ids, jnp.ones_like(ids))["params"]

    _, shardings = abstract_sharded(init, mesh, REPLICATED_RULES, jax.random.key(0))
    return jax.jit(init, out_shardings=shardings)


def init_on_device(kind: str, config: TransformerConfig, mesh, *, seed: int) -> dict:
    """Random parameters created on the device (never materialised on the host)."""
    return _jitted_init(kind, config, mesh)(jax.random.key(seed))


@jax.jit
def to_bf16(tree):
    """bfloat16 copy of the floating-point leaves (frozen models, sampling weights)."""
    return jax.tree.map(lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def timed(fn: Callable[[], object], *, reps: int) -> tuple[dict, object]:
    """Call fn once (warm-up, compilation included), then `reps` times, each waited for.

    fn must return the arrays it produced. Returns ({first_call_s, times_s, median_s}, last output).
    """
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return {"first_call_s": first, "times_s": times, "median_s": statistics.median(times)}, out


def random_tokens(seed: int, shape, config: TransformerConfig) -> jax.Array:
    """Token ids in [2, V): never pad (0) or EOS (1), so every mask is all ones. Drawn with NumPy
    (a jax.random draw would be one more XLA program to compile)."""
    return jnp.asarray(np.random.default_rng(seed).integers(2, config.vocab_size, shape), jnp.int32)


def train_state(params: dict, tx, mesh, *, seed: int) -> tuple[dict, object]:
    """(state, state_sharding) built by the trainers' own `common.train_state.build_train_state`
    (replicated rules on this one-chip mesh; no frozen tree).

    The jitted steps get these shardings as in_shardings and out_shardings: then the donated
    output state has exactly the input's layout and the second call does not recompile.
    """
    built = build_train_state(params, {}, tx, mesh=mesh, rules=REPLICATED_RULES, rng=jax.random.key(seed))
    return built.state, built.state_sharding


def peak_memory_bytes() -> Optional[int]:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def xla_temp_bytes(jitted, *args) -> int:
    """Temporary bytes XLA's buffer assignment gives the compiled program (any backend)."""
    return int(jitted.lower(*args).compile().memory_analysis().temp_size_in_bytes)


# ----------------------------------------------------------------------------- measurements


def bench_rm_train(
    config: TransformerConfig, sizes: Sizes, mesh, *, reps: int, peak: Optional[float], memory: bool = False
) -> dict:
    """Reward-model optimizer steps: tokens/s and MFU."""
    b, t = sizes.rm_pairs, sizes.rm_seq
    params = init_on_device("rm", config, mesh, seed=0)
    tx, schedule = make_optimizer(
        learning_rate=1e-5, total_steps=10_000, warmup_steps=10, weight_decay=0.01, max_grad_norm=1.0
    )
    state, state_sharding = train_state(params, tx, mesh, seed=1)
    params = None  # owned by `state` now, which every step donates
    batch = {
        "chosen_ids": random_tokens(1, (b, t), config),
        "chosen_mask": jnp.ones((b, t), jnp.int32),
        "rejected_ids": random_tokens(2, (b, t), config),
        "rejected_mask": jnp.ones((b, t), jnp.int32),
    }
    step_fn = jax.jit(
        functools.partial(
            train_step,
            model_config=config,
            tx=tx,
            schedule=schedule,
            accum_steps=1,
            center_coef=0.01,
            use_margin=False,
            nan_step=-1,
        ),
        in_shardings=(state_sharding, batch_sharding(mesh)),
        out_shardings=(state_sharding, replicated(mesh)),
        donate_argnums=(0,),
    )

    def run_steps():
        nonlocal state
        for _ in range(sizes.rm_steps_per_rep):
            state, metrics = step_fn(state, batch)
        return state, metrics

    temp = xla_temp_bytes(step_fn, state, batch) if memory else None
    timing, _ = timed(run_steps, reps=reps)
    step_s = timing["median_s"] / sizes.rm_steps_per_rep
    tokens_per_s = 2 * b * t / step_s
    flops = train_flops_per_token(config, t, extra_params=config.d_model + 1)
    return dict(
        timing,
        pairs=b,
        seq_len=t,
        tokens_per_step=2 * b * t,
        steps_per_rep=sizes.rm_steps_per_rep,
        step_s=step_s,
        tokens_per_s=tokens_per_s,
        flops_per_token=flops,
        model_tflops_per_s=tokens_per_s * flops / 1e12,
        peak_flops=peak,
        mfu=mfu(tokens_per_s, flops, peak),
        peak_memory_bytes=peak_memory_bytes(),
        xla_temp_bytes=temp,
    )


def bench_sampling(config: TransformerConfig, sizes: Sizes, mesh, *, reps: int) -> dict:
    """KV-cache sampling with bf16 weights: new tokens/s."""
    b, p, n = sizes.sample_batch, sizes.prompt_len, sizes.new_tokens
    params = to_bf16(init_on_device("policy", config, mesh, seed=3))
    prompts = random_tokens(4, (b, p), config)
    mask = jnp.ones((b, p), jnp.int32)
    generate = make_generate_fn(config, max_new_tokens=n, temperature=TEMPERATURE, eos_token_id=-1)
    rng = jax.random.key(5)
    timing, _ = timed(lambda: generate(params, prompts, mask, rng), reps=reps)
    return dict(
        timing,
        batch=b,
        prompt_len=p,
        new_tokens=n,
        temperature=TEMPERATURE,
        tokens_per_s=b * n / timing["median_s"],
        ms_per_decode_step=1e3 * timing["median_s"] / n,
        peak_memory_bytes=peak_memory_bytes(),
    )


def bench_ppo(config: TransformerConfig, sizes: Sizes, mesh, *, reps: int, memory: bool = False) -> dict:
    """One PPO iteration: rollout (and its policy/value/reference forward on its own), then update."""
    b, p, n = sizes.ppo_batch, sizes.ppo_prompt_len, sizes.ppo_new_tokens
    specs = ModelSpecs(policy=config, reward=config, value=config)
    params = {
        "policy": init_on_device("policy", config, mesh, seed=5),
        "value": init_on_device("rm", config, mesh, seed=6),
    }
    ref_params = to_bf16(params["policy"])  # the reference starts as the policy
    reward_params = to_bf16(init_on_device("rm", config, mesh, seed=7))
    query_ids = random_tokens(8, (b, p), config)
    query_mask = jnp.ones((b, p), jnp.int32)
    norm, beta = jnp.asarray([1.0, 0.0], jnp.float32), jnp.float32(0.05)
    settings = dict(
        max_new_tokens=n,
        temperature=TEMPERATURE,
        top_k=0,
        top_p=1.0,
        eos_token_id=-1,
        stop_token_ids=(),
        missing_eos_penalty=0.0,
        kl_estimator="k1",
        gamma=1.0,
        lam=0.95,
        whiten_rewards=False,
    )
    rng = jax.random.key(9)
    results = {}

    rollout_fn = jax.jit(make_rollout_fn(specs, settings))
    results["rollout"], rollout = timed(
        lambda: rollout_fn(params, ref_params, reward_params, norm, beta, query_ids, query_mask, rng), reps=reps
    )
    response_ids, response_mask = rollout.response_ids, rollout.response_mask

    @jax.jit
    def forwards(params, ref_params):  # step 2 of the rollout on its own (ppo/rollout.py's functions)
        logprobs, entropy, values = response_logprobs_and_values(
            specs, params, query_ids, query_mask, response_ids, response_mask, temperature=TEMPERATURE
        )
        ref = reference_logprobs(
            config, ref_params, query_ids, query_mask, response_ids, response_mask, temperature=TEMPERATURE
        )
        return logprobs, entropy, values, ref

    results["policy_value_ref_forward"], _ = timed(lambda: forwards(params, ref_params), reps=reps)

    tx, _ = make_optimizer(learning_rate=1e-6, total_steps=10_000, warmup_steps=0, max_grad_norm=1.0)
    state, state_sharding = train_state(params, tx, mesh, seed=10)
    loss_fn = functools.partial(
        ppo_loss, specs=specs, temperature=TEMPERATURE, clip_eps=0.2, vf_clip_eps=0.2, vf_coef=0.1
    )
    update_fn = jax.jit(
        functools.partial(
            ppo_update,
            tx=tx,
            loss_fn=loss_fn,
            ppo_epochs=sizes.ppo_epochs,
            num_minibatches=sizes.ppo_minibatches,
            accum_steps=1,
        ),
        in_shardings=(state_sharding, batch_sharding(mesh)),
        out_shardings=(state_sharding, replicated(mesh)),
        donate_argnums=(0,),
    )
    update_batch = {k: getattr(rollout, k) for k in UPDATE_KEYS}
    params = None  # owned by `state` now, which the update donates

    def run_update():
        nonlocal state
        state, metrics = update_fn(state, update_batch)
        return state, metrics

    update_temp = xla_temp_bytes(update_fn, state, update_batch) if memory else None
    results["update"], _ = timed(run_update, reps=reps)

    med = {k: v["median_s"] for k, v in results.items()}
    return dict(
        results,
        batch=b,
        prompt_len=p,
        new_tokens=n,
        ppo_epochs=sizes.ppo_epochs,
        num_minibatches=sizes.ppo_minibatches,
        minibatch_size=b // sizes.ppo_minibatches,
        rollout_s=med["rollout"],
        policy_value_ref_forward_s=med["policy_value_ref_forward"],
        generation_and_scoring_s=med["rollout"] - med["policy_value_ref_forward"],
        update_s=med["update"],
        update_s_per_optimizer_step=med["update"] / (sizes.ppo_epochs * sizes.ppo_minibatches),
        iteration_s=med["rollout"] + med["update"],
        peak_memory_bytes=peak_memory_bytes(),
        update_xla_temp_bytes=update_temp,
    )


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--shape",
        choices=sorted(MODEL_SHAPES),
        default=None,
        help="model shape (default: 1b, or tiny on the CPU backend)",
    )
    parser.add_argument("--remat", action="store_true", help="rematerialise every block (jax.checkpoint)")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per measurement (median reported)")
    parser.add_argument("--only", default=",".join(MEASUREMENTS), help=f"comma list from: {', '.join(MEASUREMENTS)}")
    parser.add_argument("--sizes", default="", help="overrides of the shape's Sizes, e.g. rm_pairs=16,rm_seq=1024")
    parser.add_argument("--out", default="benchmarks/results/gpu.json", help="JSON results path")
    parser.add_argument(
        "--attention",
        default="auto",
        choices=ATTENTION_IMPLS,
        help="TransformerConfig.attention of every model (models/attention.py)",
    )
    parser.add_argument(
        "--logits-chunk",
        type=int,
        default=128,
        help="TransformerConfig.logits_chunk (models/lm_head.py); 0 = full [B, T, V] logits",
    )
    parser.add_argument(
        "--mlp-chunk",
        type=int,
        default=0,
        help="TransformerConfig.mlp_chunk (models/mlp.py): the MLP over chunks of this many positions; 0 = off",
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="also run rm and ppo with attention='xla', logits_chunk=0 (the plain paths) and "
        "report both, with XLA temp bytes of the RM step and the PPO update",
    )
    args = parser.parse_args(argv)
    args.only = [m.strip() for m in args.only.split(",") if m.strip()]
    unknown = sorted(set(args.only) - set(MEASUREMENTS))
    if unknown:
        parser.error(f"--only: unknown measurement(s) {unknown}; choose from {', '.join(MEASUREMENTS)}")
    if args.reps < 1:
        parser.error(f"--reps must be >= 1, got {args.reps}")
    args.sizes = parse_sizes(args.sizes, parser.error)
    return args


def parse_sizes(text: str, error: Callable[[str], None]) -> dict:
    """'rm_pairs=16,rm_seq=1024' -> {'rm_pairs': 16, 'rm_seq': 1024}; every value a positive int."""
    fields = {f.name for f in dataclasses.fields(Sizes)}
    out = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, _, value = item.partition("=")
        if key not in fields:
            error(f"--sizes: unknown field {key!r}; fields: {', '.join(sorted(fields))}")
        if not value.isdigit() or int(value) < 1:
            error(f"--sizes: {key} needs a positive integer, got {value!r}")
        out[key] = int(value)
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    shape = args.shape or ("tiny" if jax.default_backend() == "cpu" else "1b")
    config = MODEL_SHAPES[shape].replace(
        remat=args.remat, attention=args.attention, logits_chunk=args.logits_chunk, mlp_chunk=args.mlp_chunk
    )
    sizes = dataclasses.replace(SIZES[shape], **args.sizes)
    if sizes.ppo_batch % sizes.ppo_minibatches:
        raise SystemExit(f"ppo_batch={sizes.ppo_batch} must be divisible by ppo_minibatches={sizes.ppo_minibatches}")
    # One chip: a 1x1 mesh on the first device, whatever else the host has.
    mesh = make_mesh((1, 1), devices=jax.devices()[:1])
    report = {"environment": environment(shape, config, sizes, args.remat, args.reps), "results": {}, "wall_s": {}}
    peak = peak_bf16_flops(report["environment"]["device_kind"])
    benches = {
        "rm": lambda: bench_rm_train(config, sizes, mesh, reps=args.reps, peak=peak, memory=args.compare),
        "sampling": lambda: bench_sampling(config, sizes, mesh, reps=args.reps),
        "ppo": lambda: bench_ppo(config, sizes, mesh, reps=args.reps, memory=args.compare),
    }
    if args.compare:  # the plain paths, for the effect of blockwise attention + chunked log-probs
        plain = config.replace(attention="xla", logits_chunk=0, mlp_chunk=0)
        benches.update(
            {
                "rm_plain": lambda: bench_rm_train(plain, sizes, mesh, reps=args.reps, peak=peak, memory=True),
                "ppo_plain": lambda: bench_ppo(plain, sizes, mesh, reps=args.reps, memory=True),
            }
        )
        args.only = list(args.only) + [f"{m}_plain" for m in ("rm", "ppo") if m in args.only]
    start = time.perf_counter()
    failed = []
    for name in args.only:
        t0 = time.perf_counter()
        try:
            report["results"][name] = benches[name]()
        except Exception as e:  # e.g. out of memory: keep the other sections' numbers
            failed.append(name)
            report["results"][name] = {"error": f"{type(e).__name__}: {str(e)[:2000]}"}
            print(f"[{name}] FAILED: {type(e).__name__}: {str(e)[:500]}", file=sys.stderr, flush=True)
        report["wall_s"][name] = time.perf_counter() - t0
        print(f"[{name}] done in {report['wall_s'][name]:.1f}s", file=sys.stderr, flush=True)
    report["wall_s"]["total"] = time.perf_counter() - start

    env = report["environment"]
    print(
        f"{env['device_kind']} ({env['backend']}), jax {env['jax_version']}, shape {shape} "
        f"({env['non_embedding_params']:,} non-embedding params), remat {args.remat}, "
        f"median of {args.reps}; wall s (compilation included): "
        + ", ".join(f"{k} {v:.0f}" for k, v in report["wall_s"].items())
    )
    print(markdown_table(report))
    if args.compare:
        print(comparison_table(report))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2, default=float)  # default: NumPy scalars
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)} (errors in {args.out})")
    return report


if __name__ == "__main__":
    main()
