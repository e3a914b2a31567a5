"""Export a trained reward model as a Hugging Face sequence-classification folder.

  python -m rm.export --workdir W --out DIR [--no-normalize] [--dtype bfloat16] [--peft_adapter]

DIR loads with `transformers.AutoModelForSequenceClassification.from_pretrained(DIR)` and
`AutoTokenizer.from_pretrained(DIR)`; its logits are our reward scores.

How our head maps onto HF's (whose `score` Linear has no bias):
  our score = gain * (w . h + b) + c      (w, b: head; gain, c: normalisation)
  - `score.weight` = gain * w;
  - LayerNorm families (gpt2, gpt_neox): the constant gain*b + c is folded into the final
    LayerNorm's bias (h = ln_f(x) feeds only the score in a sequence classifier), so the HF
    logit IS our normalised score;
  - RMSNorm families (llama, qwen2, mistral, qwen3, phi3, and gemma2/gemma3_text whose
    x_hat * (1 + w) norm has no bias either) have nothing to fold into: the constant is
    written as `reward_offset` in config.json, and score = logit + config.reward_offset.
  config.json also records `reward_normalization` {gain, bias, head_bias} for provenance,
  and `reward_temperature`, the fitted calibration temperature in the exported score's units
  (gain * T, as p = sigmoid((raw_a - raw_b) / T) = sigmoid((score_a - score_b) / (gain T))).
  --no-normalize exports raw scores (gain 1, c 0).
A LoRA (or int8 + LoRA) reward model is exported merged: W + (alpha / r) A B, in float.
--peft_adapter (LoRA runs) writes the adapters alone instead, in PEFT's SEQ_CLS format
(adapter_config.json + adapter_model.safetensors over the run's model.init_from):
`score` (gain * w) and, for GPT-2, `ln_f` (the constant folded into its bias) ride in
modules_to_save; load with
  base = AutoModelForSequenceClassification.from_pretrained(INIT_FROM, num_labels=1, pad_token_id=P)
  model = peft.PeftModel.from_pretrained(base, DIR); score = logits[:, 0] + reward_offset
with P and reward_offset from DIR/reward_model.json (and DIR's README.md), tokenizer from DIR.
When the training tokenizer pads with EOS the adapter folder's tokenizer gets '<|rm_pad|>' if
the base's embedding has a spare row for it, else the export is refused (an adapter cannot grow
the embedding: export merged). An int8 (QLoRA) base is refused (models/peft_adapters.py).
--dtype bfloat16 (or float16) writes the tensors in that dtype (config.json torch_dtype says so);
the default float32 is what parity is checked in.

Padding: HF reads the score at the last token that is not `pad_token_id`. When the training
tokenizer pads with EOS (GPT-2 style), the export adds a distinct '<|rm_pad|>' token (and
an embedding row if needed) so the final EOS is read, not the token before it. The exported
tokenizer appends EOS to every encoded text, as in training, so
`tokenizer(texts, padding=True)` gives the inputs the model expects.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from common import data_io
from models.hf import save_hf_checkpoint
from models.lora import merge_lora
from rm.model import load_reward_model

PAD_TOKEN = "<|rm_pad|>"
SEQ_CLS = {
    "gpt2": "GPT2ForSequenceClassification",
    "llama": "LlamaForSequenceClassification",
    "qwen2": "Qwen2ForSequenceClassification",
    "mistral": "MistralForSequenceClassification",
    "qwen3": "Qwen3ForSequenceClassification",
    "gemma2": "Gemma2ForSequenceClassification",
    "gemma3_text": "Gemma3TextForSequenceClassification",
    "gpt_neox": "GPTNeoXForSequenceClassification",
    "phi3": "Phi3ForSequenceClassification",
}


def _append_eos_postprocessor(tokenizer):
    """Make the fast tokenizer append EOS to every encoding (single and pair)."""
    from tokenizers import processors

    eos, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A $B {eos}", special_tokens=[(eos, eos_id)]
    )


def export(workdir: str, out: str, *, normalize: bool = True, dtype: str = "float32") -> str:
    model = load_reward_model(workdir)
    # LoRA adapters are folded into the base weights (an int8 base is dequantised first), so
    # the folder is a plain float model that transformers loads without PEFT.
    params, config = merge_lora(model.params, model.config)
    tokenizer = data_io.load_tokenizer(model.tokenizer_path or workdir)
    gain, c = (model.gain, model.bias) if normalize else (1.0, 0.0)
    return write_sequence_classifier(
        config,
        params,
        tokenizer,
        out,
        gain=gain,
        bias=c,
        normalize=normalize,
        source=workdir,
        dtype=dtype,
        temperature=abs(gain) * model.temperature,
    )


def export_adapter(workdir: str, out: str, *, normalize: bool = True, dtype: str = "float32") -> str:
    """Writes a LoRA reward model's adapters alone as a PEFT SEQ_CLS folder (see the module docstring).

    The base is the run's model.init_from; `score` (gain * w) and, for GPT-2, `ln_f` (with the
    head's constant folded into its bias) go in modules_to_save; RMSNorm families keep the
    constant as reward_offset in reward_model.json. The folder also holds the tokenizer (EOS
    appended, a distinct pad) and README.md / reward_model.json saying how to load it.
    """
    from models.peft_adapters import export_peft_adapter

    model = load_reward_model(workdir)
    config = model.config
    if config.lora_rank <= 0:
        raise ValueError(
            f"{workdir} is not a LoRA reward model (model.lora_rank=0): export the full model without --peft_adapter"
        )
    try:
        with open(os.path.join(workdir, "config.json")) as f:
            base = json.load(f)["model"]["init_from"]
    except (OSError, KeyError, TypeError, ValueError) as e:
        raise ValueError(
            f"{workdir}/config.json does not name the run's model.init_from (the adapters' base): {e!r}"
        ) from None
    base = os.path.abspath(base)
    if not os.path.isfile(os.path.join(base, "config.json")):
        raise ValueError(f"the adapters' base {base} (model.init_from of {workdir}) has no config.json")
    tokenizer = data_io.load_tokenizer(model.tokenizer_path or workdir)
    pad_id = tokenizer.pad_token_id
    if pad_id is None or pad_id == tokenizer.eos_token_id:
        # HF's classifier reads the last token that is not pad: with pad == EOS it would read the
        # token before the final EOS. A new pad id needs an embedding row the base does not have
        # when the tokenizer already fills it; the adapter cannot grow the base's embedding.
        if len(tokenizer) >= config.vocab_size:
            raise ValueError(
                f"the tokenizer of {workdir} pads with EOS and the base's embedding has no spare row "
                f"for a pad token (vocab_size {config.vocab_size}, tokenizer {len(tokenizer)} tokens): "
                "an adapter cannot grow the base's embedding; export the merged model "
                "(rm.export without --peft_adapter), which adds the row"
            )
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        pad_id = tokenizer.pad_token_id
    gain, c = (model.gain, model.bias) if normalize else (1.0, 0.0)
    score_weight, backbone, offset, head_bias = fold_head(config, model.params, gain=gain, bias=c)
    modules = {"score": {"weight": score_weight}}
    if config.uses_layernorm:  # the constant was folded into ln_f's bias (gpt2)
        norm = backbone["final_norm"]
        modules["transformer.ln_f"] = {"weight": norm["scale"], "bias": norm["bias"]}
    export_peft_adapter(
        config,
        model.params["backbone"],
        out,
        base_model=base,
        dtype=dtype,
        task_type="SEQ_CLS",
        modules_to_save=modules,
    )
    _append_eos_postprocessor(tokenizer)
    tokenizer.save_pretrained(out)
    info = {
        "base_model": base,
        "num_labels": 1,
        "pad_token_id": int(pad_id),
        "reward_offset": float(offset),
        "reward_normalization": {
            "gain": float(gain),
            "bias": float(c),
            "head_bias": head_bias,
            "applied": bool(normalize),
        },
        "reward_temperature": float(abs(gain) * model.temperature),
    }
    with open(os.path.join(out, "reward_model.json"), "w") as f:
        json.dump(info, f, indent=2)
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(
            f"# LoRA reward-model adapters exported from {os.path.abspath(workdir)}\n\n"
            "```python\n"
            "from peft import PeftModel\n"
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
            f"base = AutoModelForSequenceClassification.from_pretrained({base!r}, num_labels=1, "
            f"pad_token_id={int(pad_id)})\n"
            "model = PeftModel.from_pretrained(base, ADAPTER_DIR)\n"
            "tokenizer = AutoTokenizer.from_pretrained(ADAPTER_DIR)  # appends EOS, pads with pad_token_id\n"
            f"score = model(**tokenizer(texts, padding=True, return_tensors='pt')).logits[:, 0] + {float(offset)!r}"
            "\n```\n\nnum_labels=1 and pad_token_id must be passed (the base folder is a causal LM's); "
            "the offset is reward_model.json's reward_offset (0 for GPT-2: folded into ln_f's bias).\n"
        )
    return out


def fold_head(config, params, *, gain: float, bias: float):
    """(score_weight [1, d], backbone, reward_offset, head_bias) of HF's bias-free `score`: the weight
    is gain * w; gain * b + bias goes into the final LayerNorm's bias (LayerNorm families, offset
    0) or is returned as the offset (RMSNorm families). The backbone tree is copied where changed."""
    w = np.asarray(params["head"]["kernel"], np.float64)[:, 0]  # [d]
    b = float(np.asarray(params["head"]["bias"], np.float64)[0])
    score_weight = (gain * w)[None, :].astype(np.float32)  # [1, d]
    offset = gain * b + bias
    backbone = dict(params["backbone"])
    if config.uses_layernorm and offset != 0.0:
        # h . w' must gain `offset`: shift ln_f's bias along w' (w' . dv = offset).
        fn = dict(backbone["final_norm"])
        wp = score_weight[0].astype(np.float64)
        fn["bias"] = (np.asarray(fn["bias"], np.float64) + offset * wp / np.dot(wp, wp)).astype(np.float32)
        backbone["final_norm"] = fn
        offset = 0.0
    return score_weight, backbone, offset, b


def write_sequence_classifier(
    config,
    params,
    tokenizer,
    out: str,
    *,
    gain: float,
    bias: float,
    normalize: bool,
    source: str,
    dtype: str = "float32",
    temperature: float = 1.0,
) -> str:
    """Write the HF sequence-classification folder of a reward model's float params
    ({'backbone', 'head'}) whose score is gain * head(h) + bias (see the module docstring);
    `dtype` 'bfloat16' / 'float16' casts the tensors on disk."""
    c = bias
    score_weight, backbone, offset, b = fold_head(config, params, gain=gain, bias=bias)
    pad_id = tokenizer.pad_token_id
    if pad_id is None or pad_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
        pad_id = tokenizer.pad_token_id
    if pad_id >= config.vocab_size:  # grow the embedding so the new id exists
        emb = np.asarray(backbone["embed"]["embedding"])
        extra = np.zeros((pad_id + 1 - config.vocab_size, emb.shape[1]), emb.dtype)
        backbone["embed"] = {"embedding": np.concatenate([emb, extra])}
        config = config.replace(vocab_size=pad_id + 1)
    config = config.replace(pad_token_id=pad_id, dtype="float32")

    extra_config = {
        "num_labels": 1,
        "id2label": {"0": "LABEL_0"},
        "label2id": {"LABEL_0": 0},
        "reward_offset": float(offset),
        "reward_normalization": {"gain": float(gain), "bias": float(c), "head_bias": b, "applied": bool(normalize)},
        "reward_temperature": float(temperature),
    }
    os.makedirs(out, exist_ok=True)
    save_hf_checkpoint(
        config,
        backbone,
        out,
        architecture=SEQ_CLS[config.family],
        extra_tensors={"score.weight": score_weight},
        extra_config=extra_config,
        dtype=None if dtype == "float32" else dtype,
    )
    _append_eos_postprocessor(tokenizer)
    tokenizer.save_pretrained(out)
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(
            f"# Reward model exported from {os.path.abspath(source)}\n\n"
            "score = logits[:, 0] + config.reward_offset (0.0 for GPT-2 and GPT-NeoX, where it is "
            "folded into the final LayerNorm's bias).\n"
            "The tokenizer appends EOS; pad with its pad token (either side).\n"
            f"Normalisation applied: {normalize} (gain={gain:.6g}, bias={c:.6g}).\n"
        )
    return out


def main(argv=None):
    """The command line; a user error (not a reward-model workdir, damaged checkpoint ...) prints one line."""
    from common.run_utils import exit_on_user_error

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="RM workdir (rm trainer output)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--no-normalize", action="store_true", help="export raw scores (no gain/bias)")
    ap.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="dtype of the exported tensors"
    )
    ap.add_argument(
        "--peft_adapter",
        action="store_true",
        help="LoRA reward models: write only the adapters (+ score head) in PEFT's SEQ_CLS format",
    )
    args = ap.parse_args(argv)
    with exit_on_user_error("rm.export"):
        if args.peft_adapter:
            path = export_adapter(args.workdir, args.out, normalize=not args.no_normalize, dtype=args.dtype)
            with open(os.path.join(path, "reward_model.json")) as f:
                info = json.load(f)
            print(
                f"exported LoRA adapters (PEFT SEQ_CLS) to {path} (base {info['base_model']}, "
                f"pad_token_id={info['pad_token_id']}, reward_offset={info['reward_offset']:.6g})"
            )
            return
        path = export(args.workdir, args.out, normalize=not args.no_normalize, dtype=args.dtype)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    print(f"exported {cfg['architectures'][0]} to {path} (reward_offset={cfg['reward_offset']:.6g})")


if __name__ == "__main__":
    main()
