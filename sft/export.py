"""Export a trained SFT model as a Hugging Face causal-LM folder.

  python -m sft.export --workdir W --out DIR [--step N] [--dtype bfloat16]

DIR (config.json, model.safetensors, tokenizer files) loads with
`transformers.AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)`;
its logits match ours in float32. It is what the reward-model and PPO trainers take as
`init_from`. A LoRA run (model.lora_rank > 0, int8 base or not) is exported merged into a float
model: W + (alpha / r) A B, the frozen base read from the checkpoint's 'frozen' tree. The SFT trainer writes the same folder to `W/hf` at the end of a run.
"""

from __future__ import annotations

import argparse
import os

import jax
import numpy as np

from common.workdir import load_model_config, restore_params
from models.hf import save_hf_checkpoint
from models.lora import merge_lora
from models.transformer import TransformerConfig


def _host_float32(params):
    """Params as float32 numpy arrays on this host (gathered across processes if needed)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        params = multihost_utils.process_allgather(params, tiled=True)
    params = jax.device_get(params)

    # float32 on disk: safetensors-from-numpy has no bfloat16, and fp32 is what parity is checked in.
    def to_f32(x):
        x = np.asarray(x)
        return x.astype(np.float32) if x.dtype.kind == "f" or x.dtype.name == "bfloat16" else x

    return jax.tree.map(to_f32, params)


def save_causal_lm(
    config: TransformerConfig, params: dict, out: str, *, tokenizer_dir: str | None, dtype: str = "float32"
) -> str | None:
    """Write `params` of the causal LM `config` as a HF folder `out` (process 0 writes; all must call);
    `dtype` 'bfloat16' / 'float16' casts the tensors on disk."""
    host = _host_float32(params)
    if jax.process_index() != 0:
        return None
    save_hf_checkpoint(
        config.replace(dtype="float32", param_dtype="float32", remat=False),
        host,
        out,
        tokenizer_dir=tokenizer_dir,
        dtype=None if dtype == "float32" else dtype,
    )
    return out


def export(workdir: str, out: str, *, step=None, dtype: str = "float32") -> str:
    """Export the params of an SFT workdir's checkpoint (default: the latest) to the HF folder `out`."""
    config = load_model_config(workdir, dtype="float32")
    params, _ = restore_params(workdir, step=step, nothing=": nothing to export")
    if "embed" not in params:
        raise ValueError(
            f"{workdir} does not hold a causal LM (params keys: {sorted(params)}); "
            f"use the exporter of the trainer that wrote it"
        )
    params, config = merge_lora(params, config)  # LoRA runs: W + (alpha / r) A B, a plain float model
    tokenizer_dir = os.path.join(workdir, "tokenizer")
    save_causal_lm(
        config, params, out, tokenizer_dir=tokenizer_dir if os.path.isdir(tokenizer_dir) else None, dtype=dtype
    )
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="SFT workdir (sft trainer output)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ap.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="dtype of the exported tensors"
    )
    args = ap.parse_args(argv)
    from common.run_utils import exit_on_user_error

    with exit_on_user_error("sft.export"):
        path = export(args.workdir, args.out, step=args.step, dtype=args.dtype)
    print(f"exported causal LM to {path}")


if __name__ == "__main__":
    main()
