"""Hugging Face GPTNeoXForCausalLM <-> Flax params.

The unembedding is written as ``embed_out.weight`` (the name every transformers version reads;
transformers 5 renames it to ``lm_head.weight`` in memory) and read under either name.
"""

from __future__ import annotations

from jaxinterp.hf import ConversionError
from jaxinterp.models.common import Entry, param_shapes, params_from_hf, params_to_hf
from jaxinterp.models.common import drop_tied_copy
from jaxinterp.sites import SiteContext
from .config import GPTNeoXConfig
from .model import GPTNeoX, site_names

# Causal-mask and rotary buffers stored by old checkpoints; recomputed from the config.
_IGNORABLE = (".attention.bias", ".attention.masked_bias", ".attention.rotary_emb.inv_freq")


def entries(cfg: GPTNeoXConfig) -> list[Entry]:
    out = [Entry("gpt_neox.embed_in.weight", ("embed_in",))]
    for i in range(cfg.n_layers):
        h, p = f"gpt_neox.layers.{i}", f"layers_{i}"
        for ln in ("input_layernorm", "post_attention_layernorm"):
            out += [Entry(f"{h}.{ln}.weight", (p, ln, "scale")), Entry(f"{h}.{ln}.bias", (p, ln, "bias"))]
        for mod, lin, bias in (("attention", "query_key_value", cfg.attention_bias),
                               ("attention", "dense", cfg.attention_bias),
                               ("mlp", "dense_h_to_4h", True), ("mlp", "dense_4h_to_h", True)):
            out.append(Entry(f"{h}.{mod}.{lin}.weight", (p, mod, lin, "kernel"), "T"))  # torch [out, in]
            if bias:
                out.append(Entry(f"{h}.{mod}.{lin}.bias", (p, mod, lin, "bias")))
    out += [Entry("gpt_neox.final_layer_norm.weight", ("final_layer_norm", "scale")),
            Entry("gpt_neox.final_layer_norm.bias", ("final_layer_norm", "bias"))]
    if not cfg.tie_embeddings:
        out.append(Entry("embed_out.weight", ("embed_out", "kernel"), "T"))
    return out


def _canonical(key: str) -> str:
    return "embed_out.weight" if key == "lm_head.weight" else key


def from_hf(cfg: GPTNeoXConfig, tensors):
    if "lm_head.weight" in tensors and "embed_out.weight" in tensors:
        raise ConversionError("gpt_neox checkpoint holds both 'embed_out.weight' and 'lm_head.weight'; expected one")
    tensors = {_canonical(k): v for k, v in tensors.items()}
    if cfg.tie_embeddings:
        drop_tied_copy("gpt_neox", tensors, "embed_out.weight", "gpt_neox.embed_in.weight")
    shapes = param_shapes(GPTNeoX(cfg), lambda: SiteContext(site_names(cfg)))
    return params_from_hf("gpt_neox", entries(cfg), shapes, tensors, _IGNORABLE)


def to_hf(cfg: GPTNeoXConfig, params):
    return params_to_hf(entries(cfg), params)
