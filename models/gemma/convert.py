"""Hugging Face Gemma / Gemma-2 / Gemma-3 ForCausalLM checkpoints <-> the shared block's parameters.

Gemma's ``post_attention_layernorm`` is the norm before the MLP (``ln2``); in Gemma-2/3 it is the
norm after attention (``post_attn_norm``), ``pre_feedforward_layernorm`` the one before the MLP
and ``post_feedforward_layernorm`` the one after it.
"""

from __future__ import annotations

from jaxinterp.models.common import Entry, copy, linear
from jaxinterp.models.transformer.convert import (
    ATTN_LINEARS, LAYER, MLP_LINEARS, linear_entries, module_table, norm_entries, qk_norm_entries,
)
from .config import GemmaConfig

IGNORABLE = (".rotary_emb.inv_freq",)


def entries(cfg: GemmaConfig) -> list[Entry]:
    if cfg.variant == "gemma":
        norms = {"input_layernorm": "ln1", "post_attention_layernorm": "ln2"}
    else:
        norms = {"input_layernorm": "ln1", "post_attention_layernorm": "post_attn_norm",
                 "pre_feedforward_layernorm": "ln2", "post_feedforward_layernorm": "post_mlp_norm"}
    out = [copy("model.embed_tokens.weight", ("embed",)), *norm_entries(LAYER, norms)]
    out += linear_entries(LAYER, "self_attn", ATTN_LINEARS, cfg.attention_bias)
    out += linear_entries(LAYER, "mlp", MLP_LINEARS)
    if cfg.variant == "gemma3_text":
        out += qk_norm_entries(LAYER)
    out.append(copy("model.norm.weight", ("final_norm", "scale")))
    if not cfg.tie_embeddings:
        out.append(linear("lm_head.weight", ("lm_head", "kernel")))
    return out


def hf_modules(cfg: GemmaConfig) -> dict[str, tuple]:
    return {**module_table(LAYER, "self_attn", ATTN_LINEARS), **module_table(LAYER, "mlp", MLP_LINEARS)}
