"""Hugging Face Llama/Mistral/Qwen2ForCausalLM <-> Flax params."""

from __future__ import annotations

from jaxinterp.models.common import Entry, drop_tied_copy, param_shapes, params_from_hf, params_to_hf
from jaxinterp.sites import SiteContext
from .config import LlamaConfig
from .model import Llama, site_names

# Rotary caches written by some old exports; they are recomputed from the config.
_IGNORABLE = (".rotary_emb.inv_freq",)

def entries(cfg: LlamaConfig) -> list[Entry]:
    out = [Entry("model.embed_tokens.weight", ("embed_tokens",))]
    for i in range(cfg.n_layers):
        h, p = f"model.layers.{i}", f"layers_{i}"
        for ln in ("input_layernorm", "post_attention_layernorm"):
            out.append(Entry(f"{h}.{ln}.weight", (p, ln, "scale")))
        for mod, lin, bias in (("self_attn", "q_proj", cfg.qkv_bias), ("self_attn", "k_proj", cfg.qkv_bias),
                               ("self_attn", "v_proj", cfg.qkv_bias), ("self_attn", "o_proj", cfg.o_bias),
                               ("mlp", "gate_proj", cfg.mlp_bias), ("mlp", "up_proj", cfg.mlp_bias),
                               ("mlp", "down_proj", cfg.mlp_bias)):
            out.append(Entry(f"{h}.{mod}.{lin}.weight", (p, mod, lin, "kernel"), "T"))  # torch [out, in]
            if bias:
                out.append(Entry(f"{h}.{mod}.{lin}.bias", (p, mod, lin, "bias")))
    out.append(Entry("model.norm.weight", ("norm", "scale")))
    if not cfg.tie_embeddings:
        out.append(Entry("lm_head.weight", ("lm_head", "kernel"), "T"))
    return out

def from_hf(cfg: LlamaConfig, tensors):
    tensors = dict(tensors)
    if cfg.tie_embeddings:
        drop_tied_copy(cfg.variant, tensors, "lm_head.weight", "model.embed_tokens.weight")
    shapes = param_shapes(Llama(cfg), lambda: SiteContext(site_names(cfg)))
    return params_from_hf(cfg.variant, entries(cfg), shapes, tensors, _IGNORABLE)

def to_hf(cfg: LlamaConfig, params):
    return params_to_hf(entries(cfg), params)
