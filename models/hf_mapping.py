"""Hugging Face names <-> ours: config.json <-> TransformerConfig, HF tensors <-> our param tree.

Our parameter layout (flax kernels are [in, out]) vs HF (torch Linear weights are [out, in];
GPT-2's Conv1D weights are already [in, out] and q/k/v are fused in c_attn):

  ours                          llama/qwen2/mistral (model.)          gpt2 (transformer.)
  embed.embedding               embed_tokens.weight                   wte.weight
  pos_embed.embedding           -                                     wpe.weight
  layers_i.attn_norm            layers.i.input_layernorm              h.i.ln_1
  layers_i.attn.{q,k,v}_proj    layers.i.self_attn.{q,k,v}_proj       h.i.attn.c_attn (split)
  layers_i.attn.o_proj          layers.i.self_attn.o_proj             h.i.attn.c_proj
  layers_i.mlp_norm             layers.i.post_attention_layernorm     h.i.ln_2
  layers_i.mlp.gate_proj        layers.i.mlp.gate_proj                -
  layers_i.mlp.up_proj          layers.i.mlp.up_proj                  h.i.mlp.c_fc
  layers_i.mlp.down_proj        layers.i.mlp.down_proj                h.i.mlp.c_proj
  final_norm                    norm                                  ln_f
  lm_head.kernel                lm_head.weight (absent when tied)     (tied)

qwen3, gemma2, gemma3_text, gpt_neox and phi3: see `models/families.py` (config through
transformers' config classes, fused GPT-NeoX / Phi-3 projections split and re-fused).

The tree here is always per layer (`layers_{i}`); scan_layers runs stack it after loading and
unstack it before export (models/scan.py). File I/O is in models/hf.py.
"""

from __future__ import annotations

from typing import Any, Optional

import jax.numpy as jnp
import numpy as np

from models.families import (
    NEW_FAMILIES,
    config_from_hf_family,
    config_to_hf_family,
    params_from_hf_family,
    params_to_hf_family,
)
from models.scan import unstack_layers
from models.transformer import FAMILIES, TransformerConfig

# ----------------------------------------------------------------------------- configs


def config_from_hf(hf: dict, *, dtype: str = "float32", param_dtype: str = "float32") -> TransformerConfig:
    """TransformerConfig from a HF config.json dict."""
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(f"unsupported model_type {model_type!r} in config.json; supported: {', '.join(FAMILIES)}")

    def ids(key):
        value = hf.get(key)
        return value[0] if isinstance(value, list) and value else value

    common = dict(
        dtype=dtype,
        param_dtype=param_dtype,
        pad_token_id=ids("pad_token_id"),
        bos_token_id=ids("bos_token_id"),
        eos_token_id=ids("eos_token_id"),
        vocab_size=hf["vocab_size"],
    )
    if model_type in NEW_FAMILIES:
        return config_from_hf_family(hf, common)
    if model_type == "gpt2":
        if hf.get("scale_attn_by_inverse_layer_idx"):
            raise ValueError("gpt2 with scale_attn_by_inverse_layer_idx=True is not supported")
        d = hf["n_embd"]
        return TransformerConfig(
            family="gpt2",
            d_model=d,
            n_layers=hf["n_layer"],
            n_heads=hf["n_head"],
            n_kv_heads=hf["n_head"],
            head_dim=d // hf["n_head"],
            d_ff=hf.get("n_inner") or 4 * d,
            max_position_embeddings=hf["n_positions"],
            norm_eps=hf.get("layer_norm_epsilon", 1e-5),
            tie_embeddings=True,
            qkv_bias=True,
            o_bias=True,
            mlp_bias=True,
            activation=hf.get("activation_function", "gelu_new"),
            **common,
        )

    d, h = hf["hidden_size"], hf["num_attention_heads"]
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    rope_scaling = None if rope_type == "default" else tuple(sorted((k, v) for k, v in rope.items() if k != "type"))
    if rope_scaling is not None and "rope_type" not in dict(rope_scaling):
        rope_scaling = tuple(sorted(dict(rope_scaling, rope_type=rope_type).items()))
    attention_bias = bool(hf.get("attention_bias", False))
    qkv_bias, o_bias = attention_bias, attention_bias
    sliding_window = None
    if model_type == "qwen2":
        qkv_bias, o_bias = True, False
        if hf.get("use_sliding_window"):
            raise ValueError("qwen2 with use_sliding_window=True (per-layer windows) is not supported")
    if model_type == "mistral":
        sliding_window = hf.get("sliding_window")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{model_type} with hidden_act={act!r} is not supported (gated MLP with silu only)")
    return TransformerConfig(
        family=model_type,
        d_model=d,
        n_layers=hf["num_hidden_layers"],
        n_heads=h,
        n_kv_heads=hf.get("num_key_value_heads") or h,
        head_dim=hf.get("head_dim") or d // h,
        d_ff=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=rope_scaling,
        sliding_window=sliding_window,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        activation="silu",
        **common,
    )


def config_to_hf(config: TransformerConfig, *, architecture: str, extra: Optional[dict] = None) -> dict:
    """HF config.json dict for `config` (built through transformers' own config classes)."""
    import transformers  # runtime dep (tokenizers/configs), no torch needed

    c = config
    ids = dict(pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id)
    if c.family == "gpt2":
        hf = transformers.GPT2Config(
            vocab_size=c.vocab_size,
            n_positions=c.max_position_embeddings,
            n_embd=c.d_model,
            n_layer=c.n_layers,
            n_head=c.n_heads,
            n_inner=c.d_ff,
            activation_function=c.activation,
            layer_norm_epsilon=c.norm_eps,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            summary_first_dropout=0.0,
            tie_word_embeddings=True,
            **ids,
        )
    elif c.family in NEW_FAMILIES:
        hf = config_to_hf_family(c, ids)
    else:
        rope = {"rope_theta": c.rope_theta, "rope_type": "default"}
        rope.update(dict(c.rope_scaling or ()))
        kwargs = dict(
            vocab_size=c.vocab_size,
            hidden_size=c.d_model,
            intermediate_size=c.d_ff,
            num_hidden_layers=c.n_layers,
            num_attention_heads=c.n_heads,
            num_key_value_heads=c.n_kv_heads,
            head_dim=c.head_dim,
            max_position_embeddings=c.max_position_embeddings,
            rms_norm_eps=c.norm_eps,
            rope_parameters=rope,
            tie_word_embeddings=c.tie_embeddings,
            hidden_act=c.activation,
            **ids,
        )
        if c.family == "llama":
            if c.qkv_bias != c.o_bias:
                raise ValueError("llama export needs qkv_bias == o_bias (HF has one attention_bias flag)")
            hf = transformers.LlamaConfig(attention_bias=c.qkv_bias, mlp_bias=c.mlp_bias, **kwargs)
        elif c.family == "qwen2":
            kwargs.pop("head_dim")
            hf = transformers.Qwen2Config(**kwargs)
        else:
            hf = transformers.MistralConfig(sliding_window=c.sliding_window, **kwargs)
    hf.architectures = [architecture]
    out = hf.to_dict()
    out.update(extra or {})
    return out


def _strip_prefix(tensors: dict, family: str) -> dict:
    prefixes = {"gpt2": ("transformer.",), "gpt_neox": ("gpt_neox.",)}.get(family, ("model.",))
    out = {}
    for name, value in tensors.items():
        for p in prefixes:
            if name.startswith(p):
                name = name[len(p) :]
                break
        out[name] = value
    return out


def params_from_hf(
    config: TransformerConfig, tensors: dict[str, np.ndarray], *, cast: bool = True
) -> tuple[dict, dict]:
    """Map HF tensors to our params. Returns (params, leftovers such as {'score.weight': ...}).

    cast=False returns NumPy views of `tensors` (transposed/sliced, not copied) instead of
    jnp arrays of config.param_dtype, for `load_hf_checkpoint` to place one by one."""
    t = _strip_prefix(tensors, config.family)
    used = set()

    def take(name, transpose=False):
        if name not in t:
            raise KeyError(f"checkpoint is missing tensor {name!r} (family {config.family})")
        used.add(name)
        x = t[name]
        return x.T if transpose else x  # a view: copied (or sliced per shard) only when placed

    def norm(prefix):
        d = {"scale": take(prefix + ".weight")}
        if config.is_gpt2:
            d["bias"] = take(prefix + ".bias")
        return d

    params: dict[str, Any] = {}
    if config.family in NEW_FAMILIES:
        params = params_from_hf_family(
            config, lambda name, transpose=False: take(name, transpose), lambda name: name in t, used.add
        )
    elif config.is_gpt2:
        params["embed"] = {"embedding": take("wte.weight")}
        params["pos_embed"] = {"embedding": take("wpe.weight")}
        d = config.d_model
        for i in range(config.n_layers):
            p = f"h.{i}."
            qkv_w, qkv_b = take(p + "attn.c_attn.weight"), take(p + "attn.c_attn.bias")
            attn = {
                name: {"kernel": qkv_w[:, j * d : (j + 1) * d], "bias": qkv_b[j * d : (j + 1) * d]}
                for j, name in enumerate(("q_proj", "k_proj", "v_proj"))
            }
            attn["o_proj"] = {"kernel": take(p + "attn.c_proj.weight"), "bias": take(p + "attn.c_proj.bias")}
            mlp = {
                "up_proj": {"kernel": take(p + "mlp.c_fc.weight"), "bias": take(p + "mlp.c_fc.bias")},
                "down_proj": {"kernel": take(p + "mlp.c_proj.weight"), "bias": take(p + "mlp.c_proj.bias")},
            }
            params[f"layers_{i}"] = {
                "attn_norm": norm(p + "ln_1"),
                "attn": attn,
                "mlp_norm": norm(p + "ln_2"),
                "mlp": mlp,
            }
            for buf in ("attn.bias", "attn.masked_bias"):  # causal-mask buffers of old checkpoints
                used.add(p + buf)
        params["final_norm"] = norm("ln_f")
        used.add("lm_head.weight")  # tied to wte
    else:
        params["embed"] = {"embedding": take("embed_tokens.weight")}

        def linear(name, bias):
            d = {"kernel": take(name + ".weight", transpose=True)}
            if bias:
                d["bias"] = take(name + ".bias")
            return d

        for i in range(config.n_layers):
            p = f"layers.{i}."
            attn = {n: linear(p + "self_attn." + n, config.qkv_bias) for n in ("q_proj", "k_proj", "v_proj")}
            attn["o_proj"] = linear(p + "self_attn.o_proj", config.o_bias)
            mlp = {n: linear(p + "mlp." + n, config.mlp_bias) for n in ("gate_proj", "up_proj", "down_proj")}
            params[f"layers_{i}"] = {
                "attn_norm": norm(p + "input_layernorm"),
                "attn": attn,
                "mlp_norm": norm(p + "post_attention_layernorm"),
                "mlp": mlp,
            }
            used.add(p + "self_attn.rotary_emb.inv_freq")
        params["final_norm"] = norm("norm")
        if config.tie_embeddings:
            used.add("lm_head.weight")
        elif "lm_head.weight" in t:
            params["lm_head"] = {"kernel": take("lm_head.weight", transpose=True)}
    leftovers = {k: v for k, v in t.items() if k not in used}
    if cast:
        params = _map(lambda x: jnp.asarray(np.array(x, dtype=jnp.dtype(config.param_dtype))), params)
    return params, leftovers


def _map(fn, tree):
    return {k: _map(fn, v) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


# ----------------------------------------------------------------------------- writing


def params_to_hf(
    config: TransformerConfig, params: dict, *, prefix: bool = True, include_lm_head: bool = True
) -> dict[str, np.ndarray]:
    """Our params -> HF tensor dict (numpy, torch layout). Stacked (scan_layers) trees are unstacked."""
    params = unstack_layers(params)

    def np_(x):
        return np.ascontiguousarray(np.asarray(x))

    if config.family in NEW_FAMILIES:
        return params_to_hf_family(config, params, prefix=prefix, include_lm_head=include_lm_head)
    out = {}
    if config.is_gpt2:
        pre = "transformer." if prefix else ""
        out[pre + "wte.weight"] = np_(params["embed"]["embedding"])
        out[pre + "wpe.weight"] = np_(params["pos_embed"]["embedding"])
        for i in range(config.n_layers):
            lp, p = params[f"layers_{i}"], f"{pre}h.{i}."
            a = lp["attn"]
            out[p + "attn.c_attn.weight"] = np_(
                np.concatenate([np.asarray(a[n]["kernel"]) for n in ("q_proj", "k_proj", "v_proj")], 1)
            )
            out[p + "attn.c_attn.bias"] = np_(
                np.concatenate([np.asarray(a[n]["bias"]) for n in ("q_proj", "k_proj", "v_proj")])
            )
            out[p + "attn.c_proj.weight"] = np_(a["o_proj"]["kernel"])
            out[p + "attn.c_proj.bias"] = np_(a["o_proj"]["bias"])
            out[p + "mlp.c_fc.weight"] = np_(lp["mlp"]["up_proj"]["kernel"])
            out[p + "mlp.c_fc.bias"] = np_(lp["mlp"]["up_proj"]["bias"])
            out[p + "mlp.c_proj.weight"] = np_(lp["mlp"]["down_proj"]["kernel"])
            out[p + "mlp.c_proj.bias"] = np_(lp["mlp"]["down_proj"]["bias"])
            for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
                out[p + theirs + ".weight"] = np_(lp[ours]["scale"])
                out[p + theirs + ".bias"] = np_(lp[ours]["bias"])
        out[pre + "ln_f.weight"] = np_(params["final_norm"]["scale"])
        out[pre + "ln_f.bias"] = np_(params["final_norm"]["bias"])
        return out

    pre = "model." if prefix else ""
    out[pre + "embed_tokens.weight"] = np_(params["embed"]["embedding"])

    def linear(name, d):
        out[name + ".weight"] = np_(np.asarray(d["kernel"]).T)
        if "bias" in d:
            out[name + ".bias"] = np_(d["bias"])

    for i in range(config.n_layers):
        lp, p = params[f"layers_{i}"], f"{pre}layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            linear(p + "self_attn." + n, lp["attn"][n])
        for n in ("gate_proj", "up_proj", "down_proj"):
            linear(p + "mlp." + n, lp["mlp"][n])
        out[p + "input_layernorm.weight"] = np_(lp["attn_norm"]["scale"])
        out[p + "post_attention_layernorm.weight"] = np_(lp["mlp_norm"]["scale"])
    out[pre + "norm.weight"] = np_(params["final_norm"]["scale"])
    if include_lm_head and not config.tie_embeddings and "lm_head" in params:
        out["lm_head.weight"] = np_(np.asarray(params["lm_head"]["kernel"]).T)
    return out
