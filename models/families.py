"""Config and weight conversion of the families added after the first four: qwen3, gemma2,
gemma3_text, gpt_neox (Pythia) and phi3. `models/hf.py` dispatches here.

config.json is read through transformers' own config class of the family (`from_dict`), so
every spelling the Hub uses is normalised the way transformers itself normalises it: old
`rope_scaling` / `rope_theta` / `rotary_pct` / `rotary_emb_base` / `rope_local_base_freq`
keys become `rope_parameters` (per layer type for Gemma 3), `layer_types` is derived from
`sliding_window_pattern` (Gemma 3), alternation (Gemma 2) or `use_sliding_window` +
`max_window_layers` (Qwen 3). Options our model does not implement are refused by name.

Tensor names (ours <- HF, torch Linear weights [out, in] transposed to flax [in, out]):

  ours                       qwen3 / phi3 / gemma2 / gemma3_text (model.)   gpt_neox (gpt_neox.)
  embed                      embed_tokens                                   embed_in
  layers_i.attn_norm         layers.i.input_layernorm                       layers.i.input_layernorm
  layers_i.attn.{q,k,v}_proj layers.i.self_attn.{q,k,v}_proj                layers.i.attention.query_key_value
                             (phi3: self_attn.qkv_proj, [q; k; v] rows)       (rows per head: [q_h; k_h; v_h])
  layers_i.attn.{q,k}_norm   layers.i.self_attn.{q,k}_norm (qwen3, gemma3)  -
  layers_i.attn.o_proj       layers.i.self_attn.o_proj                      layers.i.attention.dense
  layers_i.post_attn_norm    layers.i.post_attention_layernorm (gemma)      -
  layers_i.mlp_norm          layers.i.post_attention_layernorm              layers.i.post_attention_layernorm
                             (gemma: layers.i.pre_feedforward_layernorm)
  layers_i.post_mlp_norm     layers.i.post_feedforward_layernorm (gemma)    -
  layers_i.mlp.gate/up_proj  layers.i.mlp.{gate,up}_proj                    - / layers.i.mlp.dense_h_to_4h
                             (phi3: mlp.gate_up_proj, [gate; up] rows)
  layers_i.mlp.down_proj     layers.i.mlp.down_proj                         layers.i.mlp.dense_4h_to_h
  final_norm                 norm                                           final_layer_norm
  lm_head                    lm_head (absent when tied)                     embed_out (or lm_head)

Gemma norms are stored as HF stores them (w, applied as 1 + w).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import numpy as np

from models.rope import ROPE_TYPES
from models.transformer import TransformerConfig

NEW_FAMILIES = ("qwen3", "gemma2", "gemma3_text", "gpt_neox", "phi3")
CAUSAL_LM = {
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "gpt_neox": "GPTNeoXForCausalLM",
    "phi3": "Phi3ForCausalLM",
}
_CONFIG_CLASS = {
    "qwen3": "Qwen3Config",
    "gemma2": "Gemma2Config",
    "gemma3_text": "Gemma3TextConfig",
    "gpt_neox": "GPTNeoXConfig",
    "phi3": "Phi3Config",
}
# HF activation name -> ours (models/transformer.py `_activation`).
_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_new", "gelu_new": "gelu_new", "gelu": "gelu", "silu": "silu", "relu": "relu"}
_HF_ACTIVATION = {"gemma2": "gelu_pytorch_tanh", "gemma3_text": "gelu_pytorch_tanh"}


def _refuse(family: str, what: str):
    raise ValueError(f"{family} with {what} is not supported")


def _rope(family: str, params: dict, where: str = "rope_parameters") -> tuple[float, float, Optional[tuple]]:
    """(theta, rotary_pct, rope_scaling items or None) of one HF rope_parameters dict."""
    params = dict(params or {})
    theta = float(params.pop("rope_theta", 10000.0))
    pct = float(params.pop("partial_rotary_factor", 1.0) or 1.0)
    kind = params.get("rope_type", params.get("type", "default"))
    params.pop("type", None)
    if kind not in ROPE_TYPES:
        _refuse(family, f"{where}.rope_type={kind!r} (supported: {', '.join(ROPE_TYPES)})")
    if kind == "default":
        return theta, pct, None
    params["rope_type"] = kind
    return theta, pct, tuple(sorted(params.items()))


def config_from_hf_family(hf: dict, common: dict) -> TransformerConfig:
    """TransformerConfig of a qwen3 / gemma2 / gemma3_text / gpt_neox / phi3 config.json dict."""
    import transformers

    family = hf["model_type"]
    cfg = getattr(transformers, _CONFIG_CLASS[family]).from_dict(dict(hf))
    act_name = getattr(cfg, "hidden_activation", None) or cfg.hidden_act
    if act_name not in _ACTIVATIONS:
        _refuse(family, f"hidden_act={act_name!r} (supported: {', '.join(_ACTIVATIONS)})")
    if getattr(cfg, "use_bidirectional_attention", False):
        _refuse(family, "use_bidirectional_attention=True (an encoder; only causal models are)")
    d, h = cfg.hidden_size, cfg.num_attention_heads
    kw = dict(
        family=family,
        d_model=d,
        n_layers=cfg.num_hidden_layers,
        n_heads=h,
        n_kv_heads=getattr(cfg, "num_key_value_heads", None) or h,
        head_dim=getattr(cfg, "head_dim", None) or d // h,
        d_ff=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        activation=_ACTIVATIONS[act_name],
        **common,
    )
    layer_types = getattr(cfg, "layer_types", None)
    if family == "gemma3_text":
        rp = cfg.rope_parameters
        local_theta, local_pct, local_scaling = _rope(
            family, rp["sliding_attention"], "rope_parameters.sliding_attention"
        )
        theta, pct, scaling = _rope(family, rp["full_attention"], "rope_parameters.full_attention")
        if local_scaling is not None or local_pct != 1.0 or pct != 1.0:
            _refuse(family, "scaled or partial RoPE on sliding layers")
        kw.update(rope_local_theta=local_theta)
    else:
        theta, pct, scaling = _rope(family, cfg.rope_parameters)
    kw.update(rope_theta=theta, rotary_pct=pct, rope_scaling=scaling)

    if family == "gpt_neox":
        bias = bool(cfg.attention_bias)
        kw.update(
            norm_eps=cfg.layer_norm_eps,
            qkv_bias=bias,
            o_bias=bias,
            mlp_bias=True,
            parallel_residual=bool(cfg.use_parallel_residual),
        )
        return TransformerConfig(**kw)
    kw["norm_eps"] = cfg.rms_norm_eps
    bias = bool(getattr(cfg, "attention_bias", False))
    kw.update(qkv_bias=bias, o_bias=bias)
    if family == "phi3":
        kw["sliding_window"] = cfg.sliding_window  # every layer (as mistral)
    elif "sliding_attention" in (layer_types or ()):
        kw.update(sliding_window=cfg.sliding_window, layer_types=tuple(layer_types))
    if family in ("qwen3", "gemma3_text"):
        kw["qk_norm"] = True
    if family in ("gemma2", "gemma3_text"):
        kw.update(
            query_pre_attn_scalar=float(cfg.query_pre_attn_scalar),
            attn_softcap=cfg.attn_logit_softcapping,
            final_softcap=cfg.final_logit_softcapping,
        )
    return TransformerConfig(**kw)


def _hf_rope(theta: float, pct: float, scaling) -> dict:
    rope = {"rope_theta": theta, "rope_type": "default"}
    rope.update({k: list(v) if isinstance(v, tuple) else v for k, v in (scaling or ())})
    if pct != 1.0:
        rope["partial_rotary_factor"] = pct
    return rope


def config_to_hf_family(c: TransformerConfig, ids: dict):
    """transformers config object of a new-family TransformerConfig (see config_to_hf)."""
    import transformers

    cls = getattr(transformers, _CONFIG_CLASS[c.family])
    act = _HF_ACTIVATION.get(c.family, c.activation)
    kw = dict(
        vocab_size=c.vocab_size,
        hidden_size=c.d_model,
        intermediate_size=c.d_ff,
        num_hidden_layers=c.n_layers,
        num_attention_heads=c.n_heads,
        max_position_embeddings=c.max_position_embeddings,
        tie_word_embeddings=c.tie_embeddings,
        **ids,
    )
    if c.family == "gpt_neox":
        if c.n_kv_heads != c.n_heads or c.head_dim * c.n_heads != c.d_model:
            raise ValueError("gpt_neox export needs n_kv_heads == n_heads and head_dim * n_heads == d_model")
        if not (c.qkv_bias == c.o_bias and c.mlp_bias):
            raise ValueError("gpt_neox export needs qkv_bias == o_bias (one attention_bias flag) and mlp_bias")
        return cls(
            hidden_act=c.activation,
            layer_norm_eps=c.norm_eps,
            use_parallel_residual=c.parallel_residual,
            attention_bias=c.qkv_bias,
            rope_parameters=_hf_rope(c.rope_theta, c.rotary_pct, c.rope_scaling),
            hidden_dropout=0.0,
            attention_dropout=0.0,
            classifier_dropout=0.0,
            **kw,
        )
    kw.update(num_key_value_heads=c.n_kv_heads, rms_norm_eps=c.norm_eps)
    if c.qkv_bias != c.o_bias:
        raise ValueError(f"{c.family} export needs qkv_bias == o_bias (HF has one attention_bias flag)")
    if c.family == "phi3":
        if c.qkv_bias or c.head_dim * c.n_heads != c.d_model:
            raise ValueError("phi3 export needs no attention bias and head_dim * n_heads == d_model")
        rope = _hf_rope(c.rope_theta, c.rotary_pct, c.rope_scaling)
        original = rope.get("original_max_position_embeddings", c.max_position_embeddings)
        return cls(
            hidden_act=act,
            sliding_window=c.sliding_window,
            rope_parameters=rope,
            original_max_position_embeddings=original,
            **kw,
        )
    kw.update(head_dim=c.head_dim, attention_bias=c.qkv_bias, hidden_act=act)
    layer_types = list(c.layer_types) if c.layer_types else ["full_attention"] * c.n_layers
    sliding = dict(sliding_window=c.sliding_window, layer_types=layer_types)
    if c.family == "qwen3":
        if c.sliding_window is not None and c.layer_types is None:
            layer_types[:] = ["sliding_attention"] * c.n_layers
        return cls(
            rope_parameters=_hf_rope(c.rope_theta, c.rotary_pct, c.rope_scaling),
            use_sliding_window=c.sliding_window is not None,
            **sliding,
            **kw,
        )
    if c.sliding_window is not None and c.layer_types is None:
        raise ValueError(f"{c.family} export with a sliding_window needs layer_types")
    scalar = c.query_pre_attn_scalar or c.head_dim
    scalar = int(scalar) if float(scalar).is_integer() else scalar  # HF's strict config wants an int
    gemma = dict(
        hidden_activation=act,
        query_pre_attn_scalar=scalar,
        attn_logit_softcapping=c.attn_softcap,
        final_logit_softcapping=c.final_softcap,
        **sliding,
    )
    if c.family == "gemma2":
        return cls(rope_parameters=_hf_rope(c.rope_theta, c.rotary_pct, c.rope_scaling), **gemma, **kw)
    local = c.rope_local_theta if c.rope_local_theta is not None else c.rope_theta
    rope = {
        "full_attention": _hf_rope(c.rope_theta, c.rotary_pct, c.rope_scaling),
        "sliding_attention": _hf_rope(local, 1.0, None),
    }
    return cls(rope_parameters=rope, **gemma, **kw)


# ----------------------------------------------------------------------------- weights


def params_from_hf_family(config: TransformerConfig, take: Callable, has: Callable, skip: Callable) -> dict:
    """Our params from HF tensors (prefix stripped). take(name, transpose) returns an array and
    marks it used; has(name) tests presence; skip(name) marks a tensor as known but unused."""
    c = config
    h, kvh, hd, d = c.n_heads, c.n_kv_heads, c.head_dim, c.d_model

    def linear(name, bias, rows=None):
        w = take(name + ".weight")  # [out, in]
        out = {"kernel": w.T}  # a view: copied (or sliced per shard) only when placed (models/hf.py)
        if bias:
            out["bias"] = take(name + ".bias")
        return out

    def norm(name):
        out = {"scale": take(name + ".weight")}
        if c.uses_layernorm:
            out["bias"] = take(name + ".bias")
        return out

    def split_rows(name, sizes, bias):  # fused Linear whose output rows are [a; b; ...]
        w = take(name + ".weight")
        b = take(name + ".bias") if bias else None
        parts, start = [], 0
        for n in sizes:
            part = {"kernel": w[start : start + n].T}  # views, as above
            if b is not None:
                part["bias"] = b[start : start + n]
            parts.append(part)
            start += n
        return parts

    params = {"embed": {"embedding": take("embed_in.weight" if c.family == "gpt_neox" else "embed_tokens.weight")}}
    for i in range(c.n_layers):
        p = f"layers.{i}."
        layer = {"attn_norm": norm(p + "input_layernorm")}
        if c.family == "gpt_neox":
            w = take(p + "attention.query_key_value.weight").reshape(h, 3, hd, d)  # rows per head [q; k; v]
            attn = {
                n: {"kernel": w[:, j].reshape(h * hd, d).T}  # one copy (the reshape)
                for j, n in enumerate(("q_proj", "k_proj", "v_proj"))
            }
            if c.qkv_bias:
                b = take(p + "attention.query_key_value.bias").reshape(h, 3, hd)
                for j, n in enumerate(("q_proj", "k_proj", "v_proj")):
                    attn[n]["bias"] = b[:, j].reshape(h * hd)
            attn["o_proj"] = linear(p + "attention.dense", c.o_bias)
            for buf in ("attention.bias", "attention.masked_bias", "attention.rotary_emb.inv_freq"):
                skip(p + buf)
            layer["mlp"] = {
                "up_proj": linear(p + "mlp.dense_h_to_4h", True),
                "down_proj": linear(p + "mlp.dense_4h_to_h", True),
            }
            layer["mlp_norm"] = norm(p + "post_attention_layernorm")
        else:
            a = p + "self_attn."
            if c.family == "phi3":
                q, k, v = split_rows(a + "qkv_proj", (h * hd, kvh * hd, kvh * hd), c.qkv_bias)
                attn = {"q_proj": q, "k_proj": k, "v_proj": v}
                gate, up = split_rows(p + "mlp.gate_up_proj", (c.d_ff, c.d_ff), c.mlp_bias)
                layer["mlp"] = {"gate_proj": gate, "up_proj": up}
            else:
                attn = {n: linear(a + n, c.qkv_bias) for n in ("q_proj", "k_proj", "v_proj")}
                layer["mlp"] = {n: linear(p + "mlp." + n, c.mlp_bias) for n in ("gate_proj", "up_proj")}
            layer["mlp"]["down_proj"] = linear(p + "mlp.down_proj", c.mlp_bias)
            attn["o_proj"] = linear(a + "o_proj", c.o_bias)
            if c.qk_norm:
                attn["q_norm"], attn["k_norm"] = norm(a + "q_norm"), norm(a + "k_norm")
            skip(a + "rotary_emb.inv_freq")
            if c.is_gemma:
                layer["post_attn_norm"] = norm(p + "post_attention_layernorm")
                layer["mlp_norm"] = norm(p + "pre_feedforward_layernorm")
                layer["post_mlp_norm"] = norm(p + "post_feedforward_layernorm")
            else:
                layer["mlp_norm"] = norm(p + "post_attention_layernorm")
        layer["attn"] = attn
        params[f"layers_{i}"] = layer
    params["final_norm"] = norm("final_layer_norm" if c.family == "gpt_neox" else "norm")
    head = "embed_out.weight" if c.family == "gpt_neox" and has("embed_out.weight") else "lm_head.weight"
    if c.tie_embeddings:
        skip(head)
    elif has(head):
        params["lm_head"] = {"kernel": take(head).T}
    return params


def params_to_hf_family(
    config: TransformerConfig, params: dict, *, prefix: bool, include_lm_head: bool
) -> dict[str, np.ndarray]:
    """HF tensor dict (torch layout) of our params; inverse of `params_from_hf_family`."""
    c = config
    h, hd = c.n_heads, c.head_dim
    pre = ("gpt_neox." if c.family == "gpt_neox" else "model.") if prefix else ""
    out: dict[str, np.ndarray] = {}

    def arr(x):
        return np.ascontiguousarray(np.asarray(x))

    def linear(name, d):
        out[name + ".weight"] = arr(np.asarray(d["kernel"]).T)
        if "bias" in d:
            out[name + ".bias"] = arr(d["bias"])

    def fused(name, parts):  # [a; b; ...] rows
        out[name + ".weight"] = arr(np.concatenate([np.asarray(d["kernel"]).T for d in parts], 0))
        if all("bias" in d for d in parts):
            out[name + ".bias"] = arr(np.concatenate([np.asarray(d["bias"]) for d in parts]))

    def norm(name, d):
        out[name + ".weight"] = arr(d["scale"])
        if "bias" in d:
            out[name + ".bias"] = arr(d["bias"])

    out[pre + ("embed_in.weight" if c.family == "gpt_neox" else "embed_tokens.weight")] = arr(
        params["embed"]["embedding"]
    )
    for i in range(c.n_layers):
        lp, p = params[f"layers_{i}"], f"{pre}layers.{i}."
        a, m = lp["attn"], lp["mlp"]
        norm(p + "input_layernorm", lp["attn_norm"])
        if c.family == "gpt_neox":
            qkv = [np.asarray(a[n]["kernel"]).T.reshape(h, hd, -1) for n in ("q_proj", "k_proj", "v_proj")]
            out[p + "attention.query_key_value.weight"] = arr(np.stack(qkv, 1).reshape(3 * h * hd, -1))
            if "bias" in a["q_proj"]:
                bs = [np.asarray(a[n]["bias"]).reshape(h, hd) for n in ("q_proj", "k_proj", "v_proj")]
                out[p + "attention.query_key_value.bias"] = arr(np.stack(bs, 1).reshape(-1))
            linear(p + "attention.dense", a["o_proj"])
            linear(p + "mlp.dense_h_to_4h", m["up_proj"])
            linear(p + "mlp.dense_4h_to_h", m["down_proj"])
            norm(p + "post_attention_layernorm", lp["mlp_norm"])
            continue
        s = p + "self_attn."
        if c.family == "phi3":
            fused(s + "qkv_proj", [a["q_proj"], a["k_proj"], a["v_proj"]])
            fused(p + "mlp.gate_up_proj", [m["gate_proj"], m["up_proj"]])
        else:
            for n in ("q_proj", "k_proj", "v_proj"):
                linear(s + n, a[n])
            for n in ("gate_proj", "up_proj"):
                linear(p + "mlp." + n, m[n])
        linear(s + "o_proj", a["o_proj"])
        linear(p + "mlp.down_proj", m["down_proj"])
        if c.qk_norm:
            norm(s + "q_norm", a["q_norm"])
            norm(s + "k_norm", a["k_norm"])
        if c.is_gemma:
            norm(p + "post_attention_layernorm", lp["post_attn_norm"])
            norm(p + "pre_feedforward_layernorm", lp["mlp_norm"])
            norm(p + "post_feedforward_layernorm", lp["post_mlp_norm"])
        else:
            norm(p + "post_attention_layernorm", lp["mlp_norm"])
    norm(pre + ("final_layer_norm" if c.family == "gpt_neox" else "norm"), params["final_norm"])
    if include_lm_head and not c.tie_embeddings and "lm_head" in params:
        head = "embed_out.weight" if c.family == "gpt_neox" else "lm_head.weight"
        out[head] = arr(np.asarray(params["lm_head"]["kernel"]).T)
    return out
