"""New tokens per second: our jitted KV-cache sampler vs Hugging Face `generate` (PyTorch, CPU).

    python -m benchmarks.generation [--reps 5] [--shapes tiny,small,small_llama] [--out PATH]
        [--xla-ynn default|off]

Both sides get the same random-weight model (saved by transformers, loaded by models/hf.py),
the same 16 prompts of 16 tokens and sample 48 new tokens with temperature 0.7, no top-k/top-p.
EOS is disabled on both sides so every row produces exactly 48 tokens: HF's generation config
has no eos_token_id, ours gets eos_token_id=-1. PyTorch runs with torch.set_num_threads(2) (--torch-threads),
XLA uses the machine's cores (2 on the reference box). Compilation and one warm-up call per side
are excluded; repetitions alternate (ours, HF, ours, HF, ...) so drifts in machine load hit both;
the table reports medians and ours/HF.

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


def build_models(shape: str, folder: str):
    """Random HF model of the shape, saved and reloaded into ours. Returns (torch model, config, params)."""
    import torch
    import transformers

    from models import hf

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
    model.generation_config.eos_token_id = None  # no EOS: exactly max_new_tokens per row
    config, params = hf.load_hf_checkpoint(folder)
    return model, config, params


def bench_shape(shape: str, args) -> dict:
    import jax
    import numpy as np
    import torch

    from models.sampling import make_generate_fn

    b, p, n = args.batch, args.prompt_len, args.new_tokens
    with tempfile.TemporaryDirectory() as folder:
        model, config, params = build_models(shape, folder)
    prompts = np.random.default_rng(0).integers(1, config.vocab_size, (b, p)).astype(np.int32)
    mask = np.ones_like(prompts)
    t_prompts, t_mask = torch.tensor(prompts, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
    sample = make_generate_fn(config, max_new_tokens=n, temperature=TEMPERATURE, eos_token_id=-1)
    j_prompts, j_mask = jax.device_put(prompts), jax.device_put(mask)

    def ours(rep):
        out = sample(params, j_prompts, j_mask, jax.random.key(rep))
        return np.asarray(out.response_ids)

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
                max_new_tokens=n,
                pad_token_id=0,
            )
        return out[:, p:].numpy()

    start = time.perf_counter()
    ours(-1)  # compile + warm-up
    compile_s = time.perf_counter() - start
    theirs(-1)
    times, cpu = {"ours": [], "hf": []}, {"ours": [], "hf": []}
    for rep in range(args.reps):
        for name, fn in (("ours", ours), ("hf", theirs)):
            start, start_cpu = time.perf_counter(), time.process_time()
            tokens = fn(rep)
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
            if tokens.shape != (b, n):
                raise RuntimeError(f"{name} produced {tokens.shape} new tokens, expected {(b, n)}")
    family, layers, d, heads, vocab = SHAPES[shape]
    result = dict(
        family=family,
        layers=layers,
        d_model=d,
        heads=heads,
        vocab=vocab,
        params=config.num_params(),
        compile_s=round(compile_s, 2),
        times_s=times,
    )
    for name in times:
        result[f"{name}_tokens_per_s"] = b * n / statistics.median(times[name])
        result[f"{name}_tokens_per_s_best"] = b * n / min(times[name])  # least disturbed by machine load
        result[f"{name}_tokens_per_cpu_s"] = b * n / statistics.median(cpu[name])
    result["ratio"] = result["ours_tokens_per_s"] / result["hf_tokens_per_s"]
    result["ratio_best"] = result["ours_tokens_per_s_best"] / result["hf_tokens_per_s_best"]
    result["ratio_per_cpu_s"] = result["ours_tokens_per_cpu_s"] / result["hf_tokens_per_cpu_s"]
    return result


def main(argv=None):
    args = _parse_args(argv)
    if args.quick:
        args.reps = 3
    if args.pin:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.pin])  # before jax starts its pool
        args.torch_threads = args.pin
    if args.xla_ynn == "off":
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + YNN_OFF_FLAG).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import jax
    import torch
    import transformers

    torch.set_num_threads(args.torch_threads)
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
        f"median of {args.reps}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}\n"
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
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        torch_threads=torch.get_num_threads(),
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
