"""LoRA adapters alone, in PEFT's on-disk format (adapter_config.json + adapter_model.safetensors).

`peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), DIR)` then computes
what our LoRA model computes. Our adapter on a projection is y = x W + b + (alpha/r) (x A) B with
A [in, r], B [r, out] (models/lora.py); PEFT's is y = base(x) + (lora_alpha/r) B'(A'(x)) with
lora_A.weight = A^T [r, in] and lora_B.weight = B^T [out, r], so the matrices are transposed and
the scale carries over as is.

HF module names per family (models/hf.py's params_to_hf mapping):
  llama, qwen2, mistral, qwen3, gemma2, gemma3_text: model.layers.{i}.self_attn.{q,k,v,o}_proj, model.layers.{i}.mlp.{gate,up,down}_proj
  gpt2: transformer.h.{i}.attn.c_attn (q, k and v fused), attn.c_proj (o_proj), mlp.c_fc (up_proj),
        mlp.c_proj (down_proj); Conv1D layers, so fan_in_fan_out=True.
GPT-2's fused c_attn gets one adapter of rank k*r for the k adapted projections among q, k, v:
A' stacks their A^T, B' is block-diagonal (each B^T in its own output slice), and its
lora_alpha is k*alpha so that the scale lora_alpha / rank stays alpha / r: exactly the sum of the
separate adapters. PEFT's rank_pattern / alpha_pattern hold these per-module values.

Only the adapters are written: the base is the float model the run started from (a QLoRA run's
adapters were trained on an int8 base, so they are refused: export the merged model instead).
"""

from __future__ import annotations

import json
import os

import numpy as np
from safetensors.numpy import save_file

from models.scan import unstack_layers

__all__ = ["export_peft_adapter", "PEFT_FAMILIES"]

# Families whose HF module names are mapped (and tested against peft) here.
PEFT_FAMILIES = ("gpt2", "llama", "qwen2", "mistral", "qwen3", "gemma2", "gemma3_text")

_LLAMA_NAMES = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}
_GPT2_NAMES = {"o_proj": "attn.c_proj", "up_proj": "mlp.c_fc", "down_proj": "mlp.c_proj"}
_SECTION = {
    "q_proj": "attn",
    "k_proj": "attn",
    "v_proj": "attn",
    "o_proj": "attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}


def _f32(x):
    return np.asarray(x, np.float32)


def _adapters(config, params):
    """{(layer, projection): (A [in, r], B [r, out])} of every adapted projection."""
    out = {}
    params = unstack_layers(params)  # scan_layers runs hold the layers stacked (models/scan.py)
    for i in range(config.n_layers):
        layer = params[f"layers_{i}"]
        for name, section in _SECTION.items():
            module = layer.get(section, {}).get(name, {})
            if "lora_a" in module:
                out[(i, name)] = (_f32(module["lora_a"]), _f32(module["lora_b"]))
    return out


def export_peft_adapter(
    config,
    params: dict,
    out_dir: str,
    *,
    base_model: str,
    dtype: str = "float32",
    task_type: str = "CAUSAL_LM",
    modules_to_save: dict | None = None,
) -> str:
    """Writes the LoRA adapters of a causal LM (`params` with lora_a / lora_b leaves) as a PEFT folder.

    A reward model (rm/export.py) passes task_type 'SEQ_CLS' and `modules_to_save`
    {HF module name: {tensor name: array}} (e.g. {'score': {'weight': ...}}): PEFT saves such a
    module's full weights as `base_model.model.<module>.<tensor>` (checked against peft 0.21.2's
    save_pretrained) and swaps them in for the base's on load.

    Args:
      config: the TransformerConfig the adapters were trained with (lora_rank, lora_alpha, ...).
      params: the model's params (base + adapters; only the adapters are read).
      out_dir: folder for adapter_config.json and adapter_model.safetensors.
      base_model: the base model's folder or hub name, written as base_model_name_or_path.
      dtype: 'float32' or 'bfloat16' for the adapter tensors.
    """
    if config.lora_rank <= 0:
        raise ValueError("this run has no LoRA adapters (lora_rank=0): export the full model instead")
    if config.quant:
        raise ValueError(
            f"the adapters were trained on an int8 base (quant={config.quant!r}); on the float base "
            "PEFT loads they would compute something else: export the merged model instead"
        )
    if config.family not in PEFT_FAMILIES:
        raise ValueError(
            f"PEFT adapter export supports the families {PEFT_FAMILIES}; {config.family!r} fuses its "
            "projections differently in Hugging Face (e.g. query_key_value): export the merged model"
        )
    adapters = _adapters(config, params)
    if not adapters:
        raise ValueError("no lora_a / lora_b leaves in the params: nothing to export")
    r, alpha = int(config.lora_rank), float(config.lora_alpha)
    tensors, targets, rank_pattern, alpha_pattern = {}, set(), {}, {}
    if config.is_gpt2:
        prefix = "base_model.model.transformer.h"
        for i in range(config.n_layers):
            fused = [n for n in ("q_proj", "k_proj", "v_proj") if (i, n) in adapters]
            if fused:
                d_out = config.n_heads * config.head_dim
                a = np.concatenate([adapters[(i, n)][0].T for n in fused], axis=0)  # [k r, in]
                b = np.zeros((3 * d_out, len(fused) * r), np.float32)  # block-diagonal [3 d, k r]
                for j, n in enumerate(fused):
                    offset = ("q_proj", "k_proj", "v_proj").index(n) * d_out
                    b[offset : offset + d_out, j * r : (j + 1) * r] = adapters[(i, n)][1].T
                tensors[f"{prefix}.{i}.attn.c_attn.lora_A.weight"] = a
                tensors[f"{prefix}.{i}.attn.c_attn.lora_B.weight"] = b
                targets.add("attn.c_attn")
                if len(fused) > 1:
                    rank_pattern[f"h.{i}.attn.c_attn"] = len(fused) * r
                    alpha_pattern[f"h.{i}.attn.c_attn"] = len(fused) * alpha
            for ours, theirs in _GPT2_NAMES.items():
                if (i, ours) in adapters:
                    a, b = adapters[(i, ours)]
                    tensors[f"{prefix}.{i}.{theirs}.lora_A.weight"] = a.T
                    tensors[f"{prefix}.{i}.{theirs}.lora_B.weight"] = b.T
                    targets.add(theirs)
        if "gate_proj" in {n for _, n in adapters}:
            raise ValueError("gpt2 has no gate_proj")
        fan_in_fan_out = True
    else:
        prefix = "base_model.model.model.layers"
        for (i, ours), (a, b) in adapters.items():
            tensors[f"{prefix}.{i}.{_LLAMA_NAMES[ours]}.lora_A.weight"] = a.T
            tensors[f"{prefix}.{i}.{_LLAMA_NAMES[ours]}.lora_B.weight"] = b.T
            targets.add(ours)
        fan_in_fan_out = False
    for module, module_tensors in (modules_to_save or {}).items():
        for name, value in module_tensors.items():
            tensors[f"base_model.model.{module}.{name}"] = _f32(value)
    import jax.numpy as jnp

    target_dtype = np.dtype(jnp.dtype(dtype))
    tensors = {k: np.ascontiguousarray(v.astype(target_dtype)) for k, v in tensors.items()}
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": float(config.lora_dropout),
        "bias": "none",
        "target_modules": sorted(targets),
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        # PEFT matches modules_to_save by the module name's last component (score, ln_f)
        "modules_to_save": sorted({m.split(".")[-1] for m in modules_to_save}) if modules_to_save else None,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
    }
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(adapter_config, f, indent=2, sort_keys=True)
    return out_dir
