"""Hugging Face GPTNeoXForCausalLM checkpoint <-> the shared block's parameters.

``query_key_value`` (torch ``[3D, D]``) interleaves its output features per head as ``[H, 3, Dh]``
(q, k, v of head 0, then head 1, ...); it is split into ``attn/{q,k,v}`` on load and interleaved
back on export. The unembedding is written as ``embed_out.weight`` (the name every transformers
version reads; transformers 5 renames it to ``lm_head.weight`` in memory) and read under either name.
"""

from __future__ import annotations

import numpy as np

from jaxinterp.models.common import Entry, copy, linear
from .config import GPTNeoXConfig

# Causal-mask and rotary buffers stored by old checkpoints; recomputed from the config.
IGNORABLE = (".attention.bias", ".attention.masked_bias", ".attention.rotary_emb.inv_freq")


def _qkv(cfg: GPTNeoXConfig, what: str) -> Entry:
    """``query_key_value.{weight,bias}`` <-> ``attn/{q,k,v}/{kernel,bias}``."""
    h, dh = cfg.n_heads, cfg.head_dim
    paths = tuple(("layers", "attn", n, "kernel" if what == "weight" else "bias") for n in ("q", "k", "v"))

    def split(a):
        if what == "weight":
            a = a.T.reshape(a.shape[1], h, 3, dh)  # [D, H, 3, Dh]
            return tuple(a[:, :, j].reshape(a.shape[0], h * dh) for j in range(3))
        a = a.reshape(h, 3, dh)
        return tuple(a[:, j].reshape(h * dh) for j in range(3))

    def join(parts):
        if what == "weight":
            d = parts[0].shape[0]
            return np.stack([p.reshape(d, h, dh) for p in parts], axis=2).reshape(d, 3 * h * dh).T
        return np.stack([p.reshape(h, dh) for p in parts], axis=1).reshape(3 * h * dh)

    return Entry(f"gpt_neox.layers.{{i}}.attention.query_key_value.{what}", paths, split, join)


def entries(cfg: GPTNeoXConfig) -> list[Entry]:
    h = "gpt_neox.layers.{i}"
    out = [copy("gpt_neox.embed_in.weight", ("embed",))]
    for ln, ours in (("input_layernorm", "ln1"), ("post_attention_layernorm", "ln2")):
        out += [copy(f"{h}.{ln}.weight", ("layers", ours, "scale")), copy(f"{h}.{ln}.bias", ("layers", ours, "bias"))]
    out.append(_qkv(cfg, "weight"))
    out.append(linear(f"{h}.attention.dense.weight", ("layers", "attn", "o", "kernel")))
    if cfg.attention_bias:
        out += [_qkv(cfg, "bias"), copy(f"{h}.attention.dense.bias", ("layers", "attn", "o", "bias"))]
    for lin, ours in (("dense_h_to_4h", "up"), ("dense_4h_to_h", "down")):
        out += [linear(f"{h}.mlp.{lin}.weight", ("layers", "mlp", ours, "kernel")),
                copy(f"{h}.mlp.{lin}.bias", ("layers", "mlp", ours, "bias"))]
    out += [copy("gpt_neox.final_layer_norm.weight", ("final_norm", "scale")),
            copy("gpt_neox.final_layer_norm.bias", ("final_norm", "bias"))]
    if not cfg.tie_embeddings:
        out.append(linear("embed_out.weight", ("lm_head", "kernel")))
    return out


def hf_modules(cfg: GPTNeoXConfig) -> dict[str, tuple]:
    h, dh, n = "gpt_neox.layers.{i}", cfg.head_dim, cfg.n_heads
    qkv = f"{h}.attention.query_key_value"
    ranges = lambda j: tuple(((3 * head + j) * dh, (3 * head + j + 1) * dh) for head in range(n))  # noqa: E731
    return {"attn.q": (qkv, ranges(0)), "attn.k": (qkv, ranges(1)), "attn.v": (qkv, ranges(2)),
            "attn.o": (f"{h}.attention.dense", None), "mlp.up": (f"{h}.mlp.dense_h_to_4h", None),
            "mlp.down": (f"{h}.mlp.dense_4h_to_h", None)}


def canonical(key: str) -> str:
    return "embed_out.weight" if key == "lm_head.weight" else key
