"""Hugging Face Llama / Mistral / Qwen2 / Qwen3 ForCausalLM checkpoints <-> the shared block's parameters."""

from __future__ import annotations

from jaxinterp.models.common import Entry, copy, linear
from .config import LlamaConfig

# Rotary caches written by some old exports; they are recomputed from the config.
IGNORABLE = (".rotary_emb.inv_freq",)

_LINEARS = (("self_attn", "q_proj", ("attn", "q")), ("self_attn", "k_proj", ("attn", "k")),
            ("self_attn", "v_proj", ("attn", "v")), ("self_attn", "o_proj", ("attn", "o")),
            ("mlp", "gate_proj", ("mlp", "gate")), ("mlp", "up_proj", ("mlp", "up")),
            ("mlp", "down_proj", ("mlp", "down")))


def entries(cfg: LlamaConfig) -> list[Entry]:
    h = "model.layers.{i}"
    out = [copy("model.embed_tokens.weight", ("embed",)),
           copy(f"{h}.input_layernorm.weight", ("layers", "ln1", "scale")),
           copy(f"{h}.post_attention_layernorm.weight", ("layers", "ln2", "scale"))]
    bias = {"q_proj": cfg.qkv_bias, "k_proj": cfg.qkv_bias, "v_proj": cfg.qkv_bias, "o_proj": cfg.o_bias}
    for mod, lin, ours in _LINEARS:
        out.append(linear(f"{h}.{mod}.{lin}.weight", ("layers", *ours, "kernel")))  # torch [out, in]
        if bias.get(lin, cfg.mlp_bias):
            out.append(copy(f"{h}.{mod}.{lin}.bias", ("layers", *ours, "bias")))
    if cfg.qk_norm:
        out += [copy(f"{h}.self_attn.{n}.weight", ("layers", "attn", n, "scale")) for n in ("q_norm", "k_norm")]
    out.append(copy("model.norm.weight", ("final_norm", "scale")))
    if not cfg.tie_embeddings:
        out.append(linear("lm_head.weight", ("lm_head", "kernel")))
    return out


def hf_modules(cfg: LlamaConfig) -> dict[str, tuple]:
    return {".".join(ours): (f"model.layers.{{i}}.{mod}.{lin}", None) for mod, lin, ours in _LINEARS}
