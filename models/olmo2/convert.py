"""Hugging Face Olmo2ForCausalLM checkpoints <-> the shared block's parameters."""

from __future__ import annotations

from jaxinterp.models.common import Entry, copy, linear
from jaxinterp.models.transformer.convert import (
    ATTN_LINEARS, LAYER, MLP_LINEARS, linear_entries, module_table, norm_entries, qk_norm_entries,
)
from .config import Olmo2Config

IGNORABLE = (".rotary_emb.inv_freq",)


def entries(cfg: Olmo2Config) -> list[Entry]:
    out = [copy("model.embed_tokens.weight", ("embed",))]
    out += norm_entries(LAYER, {"post_attention_layernorm": "post_attn_norm",
                                "post_feedforward_layernorm": "post_mlp_norm"})
    out += linear_entries(LAYER, "self_attn", ATTN_LINEARS, cfg.attention_bias)
    out += qk_norm_entries(LAYER)
    out += linear_entries(LAYER, "mlp", MLP_LINEARS)
    out.append(copy("model.norm.weight", ("final_norm", "scale")))
    if not cfg.tie_embeddings:
        out.append(linear("lm_head.weight", ("lm_head", "kernel")))
    return out


def hf_modules(cfg: Olmo2Config) -> dict[str, tuple]:
    return {**module_table(LAYER, "self_attn", ATTN_LINEARS), **module_table(LAYER, "mlp", MLP_LINEARS)}
