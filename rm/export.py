"""Export a trained reward model as a Hugging Face sequence-classification folder.

  python -m rm.export --workdir W --out DIR [--no-normalize] [--dtype bfloat16]

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

from models.hf import save_hf_checkpoint
from models.lora import merge_lora
from rm import data as rm_data
from rm.model import load_reward_model

PAD_TOKEN = "<|rm_pad|>"
SEQ_CLS = {"gpt2": "GPT2ForSequenceClassification", "llama": "LlamaForSequenceClassification",
           "qwen2": "Qwen2ForSequenceClassification", "mistral": "MistralForSequenceClassification",
           "qwen3": "Qwen3ForSequenceClassification", "gemma2": "Gemma2ForSequenceClassification",
           "gemma3_text": "Gemma3TextForSequenceClassification",
           "gpt_neox": "GPTNeoXForSequenceClassification", "phi3": "Phi3ForSequenceClassification"}


def _append_eos_postprocessor(tokenizer):
    """Make the fast tokenizer append EOS to every encoding (single and pair)."""
    from tokenizers import processors

    eos, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A $B {eos}", special_tokens=[(eos, eos_id)])


def export(workdir: str, out: str, *, normalize: bool = True, dtype: str = "float32") -> str:
    model = load_reward_model(workdir)
    # LoRA adapters are folded into the base weights (an int8 base is dequantised first), so
    # the folder is a plain float model that transformers loads without PEFT.
    params, config = merge_lora(model.params, model.config)
    tokenizer = rm_data.load_tokenizer(model.tokenizer_path or workdir)
    gain, c = (model.gain, model.bias) if normalize else (1.0, 0.0)
    return write_sequence_classifier(config, params, tokenizer, out, gain=gain, bias=c, normalize=normalize,
                                     source=workdir, dtype=dtype, temperature=abs(gain) * model.temperature)


def write_sequence_classifier(config, params, tokenizer, out: str, *, gain: float, bias: float,
                              normalize: bool, source: str, dtype: str = "float32",
                              temperature: float = 1.0) -> str:
    """Write the HF sequence-classification folder of a reward model's float params
    ({'backbone', 'head'}) whose score is gain * head(h) + bias (see the module docstring);
    `dtype` 'bfloat16' / 'float16' casts the tensors on disk."""
    c = bias
    w = np.asarray(params["head"]["kernel"], np.float64)[:, 0]  # [d]
    b = float(np.asarray(params["head"]["bias"], np.float64)[0])
    score_weight = (gain * w)[None, :].astype(np.float32)  # [1, d]
    offset = gain * b + c
    backbone = dict(params["backbone"])

    if config.uses_layernorm and offset != 0.0:
        # h . w' must gain `offset`: shift ln_f's bias along w' (w' . dv = offset).
        fn = dict(backbone["final_norm"])
        wp = score_weight[0].astype(np.float64)
        fn["bias"] = (np.asarray(fn["bias"], np.float64) + offset * wp / np.dot(wp, wp)).astype(np.float32)
        backbone["final_norm"] = fn
        offset = 0.0

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
        "num_labels": 1, "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0},
        "reward_offset": float(offset),
        "reward_normalization": {"gain": float(gain), "bias": float(c), "head_bias": b, "applied": bool(normalize)},
        "reward_temperature": float(temperature),
    }
    os.makedirs(out, exist_ok=True)
    save_hf_checkpoint(config, backbone, out, architecture=SEQ_CLS[config.family],
                       extra_tensors={"score.weight": score_weight}, extra_config=extra_config,
                       dtype=None if dtype == "float32" else dtype)
    _append_eos_postprocessor(tokenizer)
    tokenizer.save_pretrained(out)
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(f"# Reward model exported from {os.path.abspath(source)}\n\n"
                "score = logits[:, 0] + config.reward_offset (0.0 for GPT-2 and GPT-NeoX, where it is "
                "folded into the final LayerNorm's bias).\n"
                "The tokenizer appends EOS; pad with its pad token (either side).\n"
                f"Normalisation applied: {normalize} (gain={gain:.6g}, bias={c:.6g}).\n")
    return out


def main(argv=None):
    """The command line; a user error (not a reward-model workdir, damaged checkpoint ...) prints one line."""
    from common.run_utils import exit_on_user_error

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", required=True, help="RM workdir (rm trainer output)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--no-normalize", action="store_true", help="export raw scores (no gain/bias)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                    help="dtype of the exported tensors")
    args = ap.parse_args(argv)
    with exit_on_user_error("rm.export"):
        path = export(args.workdir, args.out, normalize=not args.no_normalize, dtype=args.dtype)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    print(f"exported {cfg['architectures'][0]} to {path} (reward_offset={cfg['reward_offset']:.6g})")


if __name__ == "__main__":
    main()
