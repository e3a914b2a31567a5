"""Export the trained PPO policy as a Hugging Face causal-LM folder.

  python -m ppo.export --workdir W --out DIR [--step N]

DIR (config.json, model.safetensors, tokenizer files) loads with
`transformers.AutoModelForCausalLM.from_pretrained(DIR)`; its logits match ours in fp32.
A LoRA policy (policy.lora_rank > 0, int8 base or not) is exported merged into a float model:
W + (alpha / r) A B; the frozen base comes from the checkpoint's 'frozen' tree.
"""

from __future__ import annotations

import argparse
import os

from common.checkpoint import CheckpointManager
from models.hf import save_hf_checkpoint
from models.lora import combine_params, merge_lora
from rm.model import load_model_config


def export(workdir: str, out: str, *, step=None) -> str:
    config = load_model_config(workdir, dtype="float32")
    ckpt = CheckpointManager(os.path.join(workdir, "checkpoints"), save_every=1)
    try:
        params, extra = ckpt.restore_subtree("params", step=step)
        try:  # LoRA runs keep the frozen bases apart from the trainable adapters (ppo/train.py)
            frozen, _ = ckpt.restore_subtree("frozen", step=step)
        except KeyError:
            frozen = {}
    finally:
        ckpt.close()
    params = combine_params(params, frozen)
    if "policy" not in params:
        raise ValueError(f"{workdir} does not hold a PPO policy (params keys: {sorted(params)})")
    policy, config = merge_lora(params["policy"], config)  # the HF folder is a plain float model
    save_hf_checkpoint(config, policy, out, tokenizer_dir=os.path.join(workdir, "tokenizer"))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="PPO workdir")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    args = ap.parse_args(argv)
    print(f"exported policy to {export(args.workdir, args.out, step=args.step)}")


if __name__ == "__main__":
    main()
