"""New tokens per second: our jitted KV-cache sampler vs Hugging Face `generate` (PyTorch, CPU).

    python -m benchmarks.generation [--reps 5] [--shapes tiny,small,small-12L,gpt2-small] [--out PATH]
        [--xla-ynn default|off] [--pin N] [--quick]

Both sides get the same random-weight model (saved once by transformers; our worker loads it with
models/hf.py, HF's with from_pretrained), the same 16 prompts of 16 tokens and sample 48 new tokens
with temperature 0.7, no top-k/top-p. Each framework runs in its own process (ours imports no torch,
HF's no JAX, so neither's thread pool competes with the other's), one after the other per shape.
EOS is disabled on both sides so every row produces exactly 48 tokens: HF's generation config
has no eos_token_id, ours gets eos_token_id=-1. PyTorch runs with torch.set_num_threads(2) (--torch-threads),
XLA uses the machine's cores (2 on the reference box); --pin N pins both to N cores and N torch threads.
Compilation and one warm-up call per side are excluded; the table reports medians of the timed
calls, wall and CPU seconds (the load-robust figure on a shared machine), and ours/HF.

--xla-ynn off (the default) appends `--xla_cpu_experimental_ynn_fusion_type=` to XLA_FLAGS, so
XLA:CPU uses no YNNPACK fusions: measured on 2 cores it made the small shape's decode step
~20-30% faster (8.0-8.5 vs 9.9-12 ms best of 20) and left the tiny shape unchanged within noise.
XLA_FLAGS must be set before JAX starts; main() sets it before importing jax.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

YNN_OFF_FLAG = "--xla_cpu_experimental_ynn_fusion_type="


def _parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per side and shape")
    parser.add_argument("--shapes", default="tiny,small", help=f"comma list from: {', '.join(SHAPES)}")
    parser.add_argument("--out", default="benchmarks/results/generation.json", help="JSON results path")
    parser.add_argument(
        "--xla-ynn",
        choices=["default", "off"],
        default="off",
        help="off: disable XLA:CPU YNNPACK fusions (see the module docstring)",
    )
    parser.add_argument("--torch-threads", type=int, default=2, help="torch.set_num_threads for HF generate")
    parser.add_argument(
        "--pin",
        type=int,
        default=0,
        help="pin the process to this many cores (XLA sizes its pool from them) and use as many torch threads; "
        "with 1, CPU-seconds per token is the load-robust figure on a shared machine",
    )
    parser.add_argument("--quick", action="store_true", help="3 repetitions")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--worker", choices=["ours", "hf"], help=argparse.SUPPRESS)  # internal: one side
    parser.add_argument("--dir", help=argparse.SUPPRESS)  # internal: the worker's checkpoint folder
    args = parser.parse_args(argv)
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
    if unknown:
        parser.error(f"unknown shape(s) {unknown}; choose from {', '.join(SHAPES)}")
    return args


# name -> (family, layers, d_model, heads, vocab)
SHAPES = {
    "tiny": ("gpt2", 2, 64, 4, 512),
    "small": ("gpt2", 4, 256, 4, 2048),
    "small_llama": ("llama", 4, 256, 4, 2048),
    "small-12L": ("gpt2", 12, 256, 4, 2048),  # the small shape at GPT-2 small's depth
    "gpt2-small": ("gpt2", 12, 768, 12, 50257),  # GPT-2 small (124M), its real vocabulary
}
TEMPERATURE = 0.7


def save_hf_model(shape: str, folder: str):
    """Random HF model of the shape (seed 0), saved to `folder`. Returns the torch model."""
    import torch
    import transformers

    family, layers, d, heads, vocab = SHAPES[shape]
    torch.manual_seed(0)
    ids = dict(bos_token_id=None, eos_token_id=None, pad_token_id=0)
    if family == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=vocab,
            n_positions=256,
            n_embd=d,
            n_layer=layers,
            n_head=heads,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **ids,
        )
    else:
        cfg = transformers.LlamaConfig(
            vocab_size=vocab,
            hidden_size=d,
            intermediate_size=4 * d,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=256,
            **ids,
        )
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(folder)
    return model


def build_models(shape: str, folder: str):
    """Random HF model of the shape, saved and reloaded into ours. Returns (torch model, config, params)."""
    from models import hf

    model = save_hf_model(shape, folder)
    model.generation_config.eos_token_id = None  # no EOS: exactly max_new_tokens per row
    config, params = hf.load_hf_checkpoint(folder)
    return model, config, params


def _prompts(vocab: int, args):
    import numpy as np

    prompts = np.random.default_rng(0).integers(1, vocab, (args.batch, args.prompt_len)).astype(np.int32)
    return prompts, np.ones_like(prompts)


def _timed_reps(fn, args) -> dict:
    """Compile + warm-up call (timed as compile_s), then args.reps timed calls (wall and CPU seconds)."""
    start = time.perf_counter()
    fn(-1)
    out = dict(compile_s=round(time.perf_counter() - start, 2), times_s=[], cpu_s=[])
    for rep in range(args.reps):
        start, start_cpu = time.perf_counter(), time.process_time()
        tokens = fn(rep)
        out["times_s"].append(time.perf_counter() - start)
        out["cpu_s"].append(time.process_time() - start_cpu)
        if tokens.shape != (args.batch, args.new_tokens):
            raise RuntimeError(f"produced {tokens.shape} new tokens, expected {(args.batch, args.new_tokens)}")
    return out


def worker_ours(folder: str, args) -> dict:
    """Our jitted sampler on the checkpoint in `folder` (this process runs JAX only)."""
    import jax
    import numpy as np

    from models import hf
    from models.sampling import make_generate_fn

    config, params = hf.load_hf_checkpoint(folder)
    prompts, mask = _prompts(config.vocab_size, args)
    sample = make_generate_fn(config, max_new_tokens=args.new_tokens, temperature=TEMPERATURE, eos_token_id=-1)
    j_prompts, j_mask = jax.device_put(prompts), jax.device_put(mask)

    def ours(rep):
        return np.asarray(sample(params, j_prompts, j_mask, jax.random.key(rep)).response_ids)

    return dict(_timed_reps(ours, args), params=config.num_params())


def worker_hf(folder: str, args) -> dict:
    """Hugging Face `generate` on the checkpoint in `folder` (this process runs PyTorch only)."""
    import torch
    import transformers

    torch.set_num_threads(args.torch_threads)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    model.generation_config.eos_token_id = None  # no EOS: exactly max_new_tokens per row
    prompts, mask = _prompts(model.config.vocab_size, args)
    t_prompts, t_mask = torch.tensor(prompts, dtype=torch.long), torch.tensor(mask, dtype=torch.long)

    def theirs(rep):
        torch.manual_seed(rep)
        with torch.no_grad():
            out = model.generate(
                t_prompts,
                attention_mask=t_mask,
                do_sample=True,
                temperature=TEMPERATURE,
                top_k=0,
                top_p=1.0,
                max_new_tokens=args.new_tokens,
                pad_token_id=0,
            )
        return out[:, args.prompt_len :].numpy()

    return dict(_timed_reps(theirs, args), torch_threads=torch.get_num_threads())


def _ours_xla_flags(args) -> str:
    """XLA_FLAGS of our worker process."""
    extra = " " + YNN_OFF_FLAG if args.xla_ynn == "off" else ""
    return (os.environ.get("XLA_FLAGS", "") + extra).strip()


def _spawn(kind: str, folder: str, shape: str, args) -> dict:
    """Run one framework's worker in a fresh process (inherits the pinning); returns its RESULT json."""
    env = dict(os.environ)
    if kind == "ours":
        env["XLA_FLAGS"] = _ours_xla_flags(args)
    cmd = [sys.executable, "-m", "benchmarks.generation", "--worker", kind, "--dir", folder, "--shapes", shape]
    cmd += ["--reps", str(args.reps), "--torch-threads", str(args.torch_threads), "--batch", str(args.batch)]
    cmd += ["--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(
            f"generation worker {kind} ({shape}) failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    return json.loads(lines[-1][len("RESULT ") :])


def bench_shape(shape: str, args) -> dict:
    """Both frameworks on one shape, each in its own process, same saved weights and prompts."""
    with tempfile.TemporaryDirectory() as folder:
        save_hf_model(shape, folder)
        runs = {name: _spawn(name, folder, shape, args) for name in ("ours", "hf")}
    b, n = args.batch, args.new_tokens
    family, layers, d, heads, vocab = SHAPES[shape]
    result = dict(
        family=family,
        layers=layers,
        d_model=d,
        heads=heads,
        vocab=vocab,
        params=runs["ours"]["params"],
        compile_s=runs["ours"]["compile_s"],
        times_s={name: r["times_s"] for name, r in runs.items()},
        cpu_s={name: r["cpu_s"] for name, r in runs.items()},
    )
    for name, r in runs.items():
        result[f"{name}_tokens_per_s"] = b * n / statistics.median(r["times_s"])
        result[f"{name}_tokens_per_s_best"] = b * n / min(r["times_s"])  # least disturbed by machine load
        result[f"{name}_tokens_per_cpu_s"] = b * n / statistics.median(r["cpu_s"])
    result["ratio"] = result["ours_tokens_per_s"] / result["hf_tokens_per_s"]
    result["ratio_best"] = result["ours_tokens_per_s_best"] / result["hf_tokens_per_s_best"]
    result["ratio_per_cpu_s"] = result["ours_tokens_per_cpu_s"] / result["hf_tokens_per_cpu_s"]
    return result


def main(argv=None):
    args = _parse_args(argv)
    if args.quick:
        args.reps = 3
    if args.pin:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.pin])  # the workers inherit it
        args.torch_threads = args.pin
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.worker:  # one framework, one shape, in this process; the parent reads the RESULT line
        worker = worker_ours if args.worker == "ours" else worker_hf
        print("RESULT " + json.dumps(worker(args.dir, args)))
        return
    import jax
    import torch
    import transformers

    results = {}
    for shape in args.shapes.split(","):
        results[shape] = bench_shape(shape, args)
        r = results[shape]
        print(
            f"{shape}: ours {r['ours_tokens_per_s']:.0f} tok/s, HF {r['hf_tokens_per_s']:.0f} tok/s, "
            f"ratio {r['ratio']:.2f} (compile {r['compile_s']} s)",
            file=sys.stderr,
        )

    print(
        f"\nbatch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, temperature {TEMPERATURE}, "
        f"median of {args.reps}; each framework in its own process; ours with "
        f"XLA_FLAGS={_ours_xla_flags(args)!r}\n"
    )
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; `{uptime}`; torch threads {args.torch_threads}\n")
    print(
        "| shape | model | ours tok/s | HF generate tok/s | ours/HF | ours tok/CPU-s | HF tok/CPU-s | ours/HF per CPU-s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for shape, r in results.items():
        model = f"{r['family']} L{r['layers']} d{r['d_model']} h{r['heads']} V{r['vocab']}"
        print(
            f"| {shape} | {model} | {r['ours_tokens_per_s']:.0f} | {r['hf_tokens_per_s']:.0f} | {r['ratio']:.2f}x | "
            f"{r['ours_tokens_per_cpu_s']:.0f} | {r['hf_tokens_per_cpu_s']:.0f} | {r['ratio_per_cpu_s']:.2f}x |"
        )

    meta = dict(
        batch=args.batch,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        temperature=TEMPERATURE,
        reps=args.reps,
        uptime=uptime,
        xla_flags=_ours_xla_flags(args),
        torch_threads=args.torch_threads,
        cpu_count=os.cpu_count(),
        machine=platform.machine(),
        jax=jax.__version__,
        torch=torch.__version__,
        transformers=transformers.__version__,
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(meta=meta, shapes=results), f, indent=1)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
