"""penzai's llama-like transformer <-> this family (Llama and Mistral layouts).

penzai's block: RMSNorm, grouped-query attention without biases, rotary on every feature (its
``max_wavelength`` is our ``rope_theta``), a gated MLP (SwiGLU / GeGLU), per-layer causal or
sliding-window masks. Query heads are grouped by key/value head the same way on both sides
(``head_groups`` x ``query_heads`` in penzai = our ``n_kv_heads`` x ``n_heads // n_kv_heads``).
A tied model is given an untied penzai head (penzai's tied variant also scales the embeddings by
sqrt(d), Gemma-style, which this family does not do). Qwen2's q/k/v biases have no penzai
counterpart and are refused.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from penzai import pz
from penzai.models.transformer.variants import llamalike_common as pz_ll

from jaxinterp.interop.penzai import (
    ACTIVATIONS, PREFIX, LayoutError, activation_name, array, bind, check_same_layout, checked_model, layer_value,
    named, single, stack_layers,
)
from jaxinterp.model import Model

from .config import LlamaConfig

MLP_VARIANTS = {"silu": "swiglu", "gelu": "geglu_exact", "gelu_new": "geglu_approx",
                "gelu_pytorch_tanh": "geglu_approx", "gelu_fast": "geglu_approx"}


def _head_axes(n_kv: int, group: int) -> tuple[tuple, tuple]:
    """penzai's (query head axes, key/value head axes), as (name, size) pairs."""
    if group == 1:
        return (("heads", n_kv),), (("heads", n_kv),)
    if n_kv == 1:
        return (("query_heads", group),), ()
    return (("head_groups", n_kv), ("query_heads", group)), (("head_groups", n_kv),)


def penzai_config(cfg: LlamaConfig, dtype, layer_stack: bool) -> "pz_ll.LlamalikeTransformerConfig":
    problems = []
    if cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias:
        problems.append("penzai's llama-like blocks have no q/k/v, output or MLP biases")
    if cfg.activation not in MLP_VARIANTS:
        problems.append(f"activation {cfg.activation!r} has no penzai MLP variant (have {sorted(MLP_VARIANTS)})")
    windows = cfg.arch.windows or (None,) * cfg.n_layers
    kinds = [pz_ll.AttentionTypeGlobalCausal() if w is None else pz_ll.AttentionTypeSlidingWindowCausal(w)
             for w in windows]
    if layer_stack and len(set(kinds)) > 1:
        problems.append("penzai's layer stack needs one attention type for every layer")
    if problems:
        raise ValueError(f"to_penzai: {cfg.variant} config not expressible in penzai: " + "; ".join(problems))
    return pz_ll.LlamalikeTransformerConfig(
        num_kv_heads=cfg.n_kv_heads, query_head_multiplier=cfg.n_heads // cfg.n_kv_heads, embedding_dim=cfg.d_model,
        projection_dim=cfg.head_dim, mlp_hidden_dim=cfg.d_mlp, num_decoder_blocks=cfg.n_layers,
        vocab_size=cfg.vocab_size, mlp_variant=MLP_VARIANTS[cfg.activation], tie_embedder_and_logits=False,
        rope_wavelength=cfg.rope_theta, rms_norm_eps=cfg.rms_eps,
        attention_type=kinds[0] if len(set(kinds)) == 1 else tuple(kinds),
        parameter_dtype=dtype, activation_dtype=dtype, use_layer_stack=layer_stack)


def to_penzai(model: Model, *, layer_stack: bool = False):
    cfg: LlamaConfig = model.config
    p = model.params
    pz_cfg = penzai_config(cfg, p["embed"].dtype, layer_stack)
    q_axes, kv_axes = _head_axes(cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads)
    q_shape, kv_shape = tuple(s for _, s in q_axes), tuple(s for _, s in kv_axes)
    q_names, kv_names = tuple(n for n, _ in q_axes), tuple(n for n, _ in kv_axes)
    d, dh, n = cfg.d_model, cfg.head_dim, cfg.n_layers
    layers, attn, mlp = p["layers"], p["layers"]["attn"], p["layers"]["mlp"]

    def per_layer(stacked, shape, axes):
        return [named(np.asarray(stacked[i]).reshape(shape), *axes) for i in range(n)]

    head = p["embed"].T if cfg.tie_embeddings else p["lm_head"]["kernel"]
    values = {
        "global/embedder.embeddings": named(p["embed"], "vocabulary", "embedding"),
        "global/final_norm/scale.weights": named(p["final_norm"]["scale"], "embedding"),
        "global/lm_head.weights": named(head, "embedding", "vocabulary"),
        "layer/pre_attention_norm/scale.weights": per_layer(layers["ln1"]["scale"], (d,), ("embedding",)),
        "layer/pre_ffw_norm/scale.weights": per_layer(layers["ln2"]["scale"], (d,), ("embedding",)),
        "layer/attention/query.weights": per_layer(attn["q"]["kernel"], (d, *q_shape, dh),
                                                   ("embedding", *q_names, "projection")),
        "layer/attention/key.weights": per_layer(attn["k"]["kernel"], (d, *kv_shape, dh),
                                                 ("embedding", *kv_names, "projection")),
        "layer/attention/value.weights": per_layer(attn["v"]["kernel"], (d, *kv_shape, dh),
                                                   ("embedding", *kv_names, "projection")),
        "layer/attention/output.weights": per_layer(attn["o"]["kernel"], (*q_shape, dh, d),
                                                    (*q_names, "projection", "embedding")),
        "layer/mlp/gating_linear.weights": per_layer(mlp["gate"]["kernel"], (d, cfg.d_mlp), ("embedding", "neurons")),
        "layer/mlp/value_linear.weights": per_layer(mlp["up"]["kernel"], (d, cfg.d_mlp), ("embedding", "neurons")),
        "layer/mlp/out_linear.weights": per_layer(mlp["down"]["kernel"], (cfg.d_mlp, d), ("neurons", "embedding")),
    }
    model_def = pz_ll.build_llamalike_transformer(pz_cfg, init_base_rng=None, name=PREFIX)
    return bind(model_def, values, layer_stack=layer_stack, n_layers=n)


def _read_config(pz_model, params, n_layers: int, max_seq_len: int) -> LlamaConfig:
    if f"{PREFIX}/lm_head.weights" not in params:
        raise LayoutError("it ties its embeddings with Gemma's sqrt(d) input scaling, which this family does not do")
    vocab, d = (params[f"{PREFIX}/embedder.embeddings"].named_shape[a] for a in ("vocabulary", "embedding"))
    q = layer_value(params, "attention/query.weights", 0, n_layers).named_shape
    n_kv = q.get("head_groups", q.get("heads", 1))
    group = q.get("query_heads", 1)
    select = pz.select(pz_model)
    eps = single([s.epsilon for s in select.at_instances_of(pz.nn.RMSStandardize).get_sequence()], "norm epsilons")
    theta = single([r.max_wavelength for r in select.at_instances_of(pz.nn.ApplyRoPE).get_sequence()],
                    "RoPE wavelengths")
    act = single([activation_name(e.fn) or repr(e.fn) for e in select.at_instances_of(pz.nn.Elementwise)
                   .get_sequence()], "activations")
    if act not in ACTIVATIONS:
        raise LayoutError(f"unsupported activation {act}")
    masks = select.at_instances_of((pz.nn.ApplyCausalAttentionMask, pz.nn.ApplyCausalSlidingWindowAttentionMask))
    windows = [int(np.asarray(m.sliding_window_size)) if isinstance(m, pz.nn.ApplyCausalSlidingWindowAttentionMask)
               else None for m in masks.get_sequence()]
    windows = windows * n_layers if len(windows) == 1 else windows
    if len(set(windows)) > 1:
        raise LayoutError(f"sliding windows on some layers only ({windows}); this family's Mistral layout has one "
                          f"window on every layer")
    d_mlp = layer_value(params, "mlp/gating_linear.weights", 0, n_layers).named_shape["neurons"]
    dh = q["projection"]
    kw = dict(vocab_size=vocab, max_seq_len=max_seq_len, d_model=d, n_layers=n_layers, n_heads=n_kv * group,
              n_kv_heads=n_kv, head_dim=dh, d_mlp=d_mlp, activation=act, rms_eps=eps, rope_theta=theta)
    if windows[0] is not None:
        return LlamaConfig(variant="mistral", sliding_window=windows[0], **kw)
    return LlamaConfig(**kw)


def _n_layers(params) -> Optional[int]:
    stacked = params.get(f"{PREFIX}/blocks/attention/query.weights")
    if stacked is not None:
        return stacked.named_shape["blocks"]
    n = 0
    while f"{PREFIX}/block_{n}/attention/query.weights" in params:
        n += 1
    return n or None


def from_penzai(pz_model, params, *, max_seq_len: int) -> Optional[Model]:
    n = _n_layers(params)
    if n is None:
        return None  # not a llama-like model
    cfg = _read_config(pz_model, params, n, max_seq_len)
    q_axes, kv_axes = _head_axes(cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads)
    q_names, kv_names = tuple(a for a, _ in q_axes), tuple(a for a, _ in kv_axes)
    d, dh = cfg.d_model, cfg.head_dim

    def get(key, axes, shape):
        return stack_layers(params, key, n, axes, lambda a: np.asarray(a).reshape(shape))

    top = {k: params[f"{PREFIX}/{k}"] for k in ("embedder.embeddings", "final_norm/scale.weights", "lm_head.weights")}
    out = {
        "embed": np.asarray(array(top["embedder.embeddings"], "vocabulary", "embedding")),
        "final_norm": {"scale": np.asarray(array(top["final_norm/scale.weights"], "embedding"))},
        "lm_head": {"kernel": np.asarray(array(top["lm_head.weights"], "embedding", "vocabulary"))},
        "layers": {
            "ln1": {"scale": get("pre_attention_norm/scale.weights", ("embedding",), (d,))},
            "ln2": {"scale": get("pre_ffw_norm/scale.weights", ("embedding",), (d,))},
            "attn": {
                "q": {"kernel": get("attention/query.weights", ("embedding", *q_names, "projection"), (d, -1))},
                "k": {"kernel": get("attention/key.weights", ("embedding", *kv_names, "projection"), (d, -1))},
                "v": {"kernel": get("attention/value.weights", ("embedding", *kv_names, "projection"), (d, -1))},
                "o": {"kernel": get("attention/output.weights", (*q_names, "projection", "embedding"), (-1, d))},
            },
            "mlp": {
                "gate": {"kernel": get("mlp/gating_linear.weights", ("embedding", "neurons"), (d, cfg.d_mlp))},
                "up": {"kernel": get("mlp/value_linear.weights", ("embedding", "neurons"), (d, cfg.d_mlp))},
                "down": {"kernel": get("mlp/out_linear.weights", ("neurons", "embedding"), (cfg.d_mlp, d))},
            },
        },
    }
    model = checked_model(out, cfg)
    check_same_layout(pz_model, to_penzai(model, layer_stack=f"{PREFIX}/blocks/attention/query.weights" in params))
    return model

