"""penzai's GPT-NeoX transformer <-> this family.

penzai's block is the parallel one (``x + attn(ln1(x)) + mlp(ln2(x))``) with biases on every
projection, rotary on the first ``rope_subset_size`` features of each head (HF NeoX's layout, so
no weight permutation) and an untied, bias-free head. Configs with a sequential residual, no
attention biases or tied embeddings have no penzai counterpart and are refused.

penzai's builder gives the final norm its default epsilon (1e-6) whatever ``layernorm_epsilon``
says; this family has one ``ln_eps``, so ``to_penzai`` sets every norm's epsilon to it and
``from_penzai`` refuses a model whose norms disagree (one line naming both values).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
from penzai import pz
from penzai.models.transformer.variants import gpt_neox as pz_neox

from jaxinterp.interop.penzai import (
    ACTIVATIONS, PREFIX, LayoutError, activation_name, array, bind, check_same_layout, checked_model, layer_value,
    named, single, stack_layers,
)
from jaxinterp.model import Model

from .config import GPTNeoXConfig

ACTIVATION_NAMES = {"gelu": "gelu_exact", "gelu_new": "gelu_approx", "relu": "relu", "silu": "silu"}
QUERY = "attention/query/Linear.weights"


def penzai_config(cfg: GPTNeoXConfig, dtype, layer_stack: bool) -> "pz_neox.GPTNeoXTransformerConfig":
    problems = []
    if not cfg.parallel_residual:
        problems.append("penzai's GPT-NeoX block is parallel only (parallel_residual=False)")
    if not cfg.attention_bias:
        problems.append("penzai's GPT-NeoX attention always has biases (attention_bias=False)")
    if cfg.tie_embeddings:
        problems.append("penzai's GPT-NeoX head is untied (tie_embeddings=True)")
    if cfg.activation not in ACTIVATION_NAMES:
        problems.append(f"activation {cfg.activation!r} has no penzai counterpart (have {sorted(ACTIVATION_NAMES)})")
    if problems:
        raise ValueError("to_penzai: gpt_neox config not expressible in penzai: " + "; ".join(problems))
    return pz_neox.GPTNeoXTransformerConfig(
        num_attention_heads=cfg.n_heads, embedding_dim=cfg.d_model, projection_dim=cfg.head_dim,
        mlp_hidden_dim=cfg.d_mlp, num_decoder_blocks=cfg.n_layers, vocab_size=cfg.vocab_size,
        activation_fn=ACTIVATION_NAMES[cfg.activation], rope_subset_size=cfg.rotary_dim, rope_wavelength=cfg.rope_theta,
        layernorm_epsilon=cfg.ln_eps, parameter_dtype=dtype, activation_dtype=dtype, use_layer_stack=layer_stack)


def to_penzai(model: Model, *, layer_stack: bool = False):
    cfg: GPTNeoXConfig = model.config
    p = model.params
    pz_cfg = penzai_config(cfg, p["embed"].dtype, layer_stack)
    d, h, dh, n = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.n_layers
    layers, attn, mlp = p["layers"], p["layers"]["attn"], p["layers"]["mlp"]

    def per_layer(stacked, shape, axes):
        return [named(np.asarray(stacked[i]).reshape(shape), *axes) for i in range(n)]

    values = {
        "global/embedder.embeddings": named(p["embed"], "vocabulary", "embedding"),
        "global/final_norm/scale.weights": named(p["final_norm"]["scale"], "embedding"),
        "global/final_norm/shift.bias": named(p["final_norm"]["bias"], "embedding"),
        "global/lm_head.weights": named(p["lm_head"]["kernel"], "embedding", "vocabulary"),
    }
    for ours, theirs in (("ln1", "pre_attention_norm"), ("ln2", "pre_ffw_norm")):
        values[f"layer/{theirs}/scale.weights"] = per_layer(layers[ours]["scale"], (d,), ("embedding",))
        values[f"layer/{theirs}/shift.bias"] = per_layer(layers[ours]["bias"], (d,), ("embedding",))
    for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value")):
        values[f"layer/attention/{theirs}/Linear.weights"] = per_layer(
            attn[ours]["kernel"], (d, h, dh), ("embedding", "heads", "projection"))
        values[f"layer/attention/{theirs}/AddBias.bias"] = per_layer(attn[ours]["bias"], (h, dh), ("heads", "projection"))
    values["layer/attention/output/Linear.weights"] = per_layer(attn["o"]["kernel"], (h, dh, d),
                                                                ("heads", "projection", "embedding"))
    values["layer/attention/output/AddBias.bias"] = per_layer(attn["o"]["bias"], (d,), ("embedding",))
    values["layer/mlp/in/Linear.weights"] = per_layer(mlp["up"]["kernel"], (d, cfg.d_mlp), ("embedding", "neurons"))
    values["layer/mlp/in/AddBias.bias"] = per_layer(mlp["up"]["bias"], (cfg.d_mlp,), ("neurons",))
    values["layer/mlp/out/Linear.weights"] = per_layer(mlp["down"]["kernel"], (cfg.d_mlp, d), ("neurons", "embedding"))
    values["layer/mlp/out/AddBias.bias"] = per_layer(mlp["down"]["bias"], (d,), ("embedding",))
    model_def = pz_neox.build_gpt_neox_transformer(pz_cfg, init_base_rng=None, name=PREFIX)
    model_def = pz.select(model_def).at_instances_of(pz.nn.Standardize).apply(  # one epsilon, the final norm's too
        lambda s: dataclasses.replace(s, epsilon=cfg.ln_eps))
    return bind(model_def, values, layer_stack=layer_stack, n_layers=n)


def _n_layers(params) -> Optional[int]:
    stacked = params.get(f"{PREFIX}/blocks/{QUERY}")
    if stacked is not None:
        return stacked.named_shape["blocks"]
    n = 0
    while f"{PREFIX}/block_{n}/{QUERY}" in params:
        n += 1
    return n or None


def _read_config(pz_model, params, n_layers: int, max_seq_len: int) -> GPTNeoXConfig:
    vocab, d = (params[f"{PREFIX}/embedder.embeddings"].named_shape[a] for a in ("vocabulary", "embedding"))
    q = layer_value(params, QUERY, 0, n_layers).named_shape
    heads, dh = q["heads"], q["projection"]
    d_mlp = layer_value(params, "mlp/in/Linear.weights", 0, n_layers).named_shape["neurons"]
    select = pz.select(pz_model)
    eps = single([s.epsilon for s in select.at_instances_of(pz.nn.Standardize).get_sequence()], "norm epsilons")
    ropes = select.at_instances_of(pz.nn.ApplyRoPEToSubset).get_sequence()
    theta = single([r.max_wavelength for r in ropes], "RoPE wavelengths")
    subset = int(single([r.rope_subset_size for r in ropes], "rotary sizes"))
    act = single([activation_name(e.fn) or repr(e.fn) for e in select.at_instances_of(pz.nn.Elementwise)
                  .get_sequence()], "activations")
    if act not in ACTIVATIONS:
        raise LayoutError(f"unsupported activation {act}")
    cfg = GPTNeoXConfig(vocab_size=vocab, max_seq_len=max_seq_len, d_model=d, n_layers=n_layers, n_heads=heads,
                        d_mlp=d_mlp, activation=act, ln_eps=eps, rotary_pct=subset / dh, rope_theta=theta)
    if cfg.head_dim != dh or cfg.rotary_dim != subset:
        raise LayoutError(f"head size {dh} / rotary size {subset} do not fit d_model {d} with {heads} heads")
    return cfg


def from_penzai(pz_model, params, *, max_seq_len: int) -> Optional[Model]:
    n = _n_layers(params)
    if n is None:
        return None  # not a GPT-NeoX model
    cfg = _read_config(pz_model, params, n, max_seq_len)
    d, d_mlp = cfg.d_model, cfg.d_mlp

    def get(key, axes, shape):
        return stack_layers(params, key, n, axes, lambda a: np.asarray(a).reshape(shape))

    def top(key, *axes):
        return np.asarray(array(params[f"{PREFIX}/{key}"], *axes))

    def norm(name):
        return {"scale": get(f"{name}/scale.weights", ("embedding",), (d,)),
                "bias": get(f"{name}/shift.bias", ("embedding",), (d,))}

    def proj(name):
        return {"kernel": get(f"attention/{name}/Linear.weights", ("embedding", "heads", "projection"), (d, -1)),
                "bias": get(f"attention/{name}/AddBias.bias", ("heads", "projection"), (-1,))}

    out = {
        "embed": top("embedder.embeddings", "vocabulary", "embedding"),
        "final_norm": {"scale": top("final_norm/scale.weights", "embedding"),
                       "bias": top("final_norm/shift.bias", "embedding")},
        "lm_head": {"kernel": top("lm_head.weights", "embedding", "vocabulary")},
        "layers": {
            "ln1": norm("pre_attention_norm"),
            "ln2": norm("pre_ffw_norm"),
            "attn": {
                "q": proj("query"), "k": proj("key"), "v": proj("value"),
                "o": {"kernel": get("attention/output/Linear.weights", ("heads", "projection", "embedding"), (-1, d)),
                      "bias": get("attention/output/AddBias.bias", ("embedding",), (d,))},
            },
            "mlp": {
                "up": {"kernel": get("mlp/in/Linear.weights", ("embedding", "neurons"), (d, d_mlp)),
                       "bias": get("mlp/in/AddBias.bias", ("neurons",), (d_mlp,))},
                "down": {"kernel": get("mlp/out/Linear.weights", ("neurons", "embedding"), (d_mlp, d)),
                         "bias": get("mlp/out/AddBias.bias", ("embedding",), (d,))},
            },
        },
    }
    model = checked_model(out, cfg)
    check_same_layout(pz_model, to_penzai(model, layer_stack=f"{PREFIX}/blocks/{QUERY}" in params))
    return model
