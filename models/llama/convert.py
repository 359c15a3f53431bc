"""Hugging Face Llama / Mistral / Qwen2 / Qwen3 ForCausalLM checkpoints <-> the shared block's parameters."""

from __future__ import annotations

from jaxinterp.models.common import Entry, copy, linear
from jaxinterp.models.transformer.convert import (
    ATTN_LINEARS, LAYER, MLP_LINEARS, linear_entries, module_table, norm_entries, qk_norm_entries,
)
from .config import LlamaConfig

# Rotary caches written by some old exports; they are recomputed from the config.
IGNORABLE = (".rotary_emb.inv_freq",)


def entries(cfg: LlamaConfig) -> list[Entry]:
    out = [copy("model.embed_tokens.weight", ("embed",))]
    out += norm_entries(LAYER, {"input_layernorm": "ln1", "post_attention_layernorm": "ln2"})
    bias = {"q_proj": cfg.qkv_bias, "k_proj": cfg.qkv_bias, "v_proj": cfg.qkv_bias, "o_proj": cfg.o_bias}
    out += linear_entries(LAYER, "self_attn", ATTN_LINEARS, bias)
    out += linear_entries(LAYER, "mlp", MLP_LINEARS, cfg.mlp_bias)
    if cfg.qk_norm:
        out += qk_norm_entries(LAYER)
    out.append(copy("model.norm.weight", ("final_norm", "scale")))
    if not cfg.tie_embeddings:
        out.append(linear("lm_head.weight", ("lm_head", "kernel")))
    return out


def hf_modules(cfg: LlamaConfig) -> dict[str, tuple]:
    return {**module_table(LAYER, "self_attn", ATTN_LINEARS), **module_table(LAYER, "mlp", MLP_LINEARS)}
