"""Export the trained PPO policy as a Hugging Face causal-LM folder.

  python -m ppo.export --workdir W --out DIR [--step N] [--dtype bfloat16] [--peft_adapter]

DIR (config.json, model.safetensors, tokenizer files) loads with
`transformers.AutoModelForCausalLM.from_pretrained(DIR)`; its logits match ours in fp32.
A LoRA policy (policy.lora_rank > 0, int8 base or not) is exported merged into a float model:
W + (alpha / r) A B; the frozen base comes from the checkpoint's 'frozen' tree.
--peft_adapter writes the LoRA adapters alone instead, in PEFT's format (adapter_config.json +
adapter_model.safetensors; models/peft_adapters.py), for `peft.PeftModel.from_pretrained` on
the run's policy.init_from. --dtype bfloat16 (or float16) writes tensors in that dtype.
"""

from __future__ import annotations

import argparse
import json
import os

from common.workdir import load_model_config, restore_params
from models.hf import save_hf_checkpoint
from models.lora import merge_lora


def export(workdir: str, out: str, *, step=None, dtype: str = "float32", peft_adapter: bool = False) -> str:
    config = load_model_config(workdir, dtype="float32")
    # LoRA runs keep the frozen bases apart from the trainable adapters (ppo/train.py): joined here.
    params, _ = restore_params(workdir, step=step)
    if "policy" not in params:
        raise ValueError(f"{workdir} does not hold a PPO policy (params keys: {sorted(params)})")
    if peft_adapter:
        from models.peft_adapters import export_peft_adapter

        with open(os.path.join(workdir, "config.json")) as f:
            base = json.load(f)["policy"]["init_from"]
        export_peft_adapter(config, params["policy"], out, base_model=os.path.abspath(base), dtype=dtype)
        return out
    policy, config = merge_lora(params["policy"], config)  # the HF folder is a plain float model
    save_hf_checkpoint(
        config,
        policy,
        out,
        tokenizer_dir=os.path.join(workdir, "tokenizer"),
        dtype=None if dtype == "float32" else dtype,
    )
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="PPO workdir")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    ap.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="dtype of the exported tensors"
    )
    ap.add_argument(
        "--peft_adapter",
        action="store_true",
        help="LoRA runs: write only the adapters, in PEFT's format (base: the run's policy.init_from)",
    )
    args = ap.parse_args(argv)
    from common.run_utils import exit_on_user_error

    with exit_on_user_error("ppo.export"):
        path = export(args.workdir, args.out, step=args.step, dtype=args.dtype, peft_adapter=args.peft_adapter)
    print(f"exported {'LoRA adapters' if args.peft_adapter else 'policy'} to {path}")


if __name__ == "__main__":
    main()
