"""Hugging Face GPTJForCausalLM checkpoints <-> the shared block's parameters."""

from __future__ import annotations

from jaxinterp.models.common import Entry, copy, linear
from jaxinterp.models.transformer.convert import linear_entries, module_table, norm_entries
from .config import GPTJConfig

# Causal-mask buffers of old checkpoints; recomputed.
IGNORABLE = (".attn.bias", ".attn.masked_bias")
LAYER = "transformer.h.{i}"
_ATTN = (("q_proj", ("attn", "q")), ("k_proj", ("attn", "k")), ("v_proj", ("attn", "v")), ("out_proj", ("attn", "o")))
_MLP = (("fc_in", ("mlp", "up")), ("fc_out", ("mlp", "down")))


def entries(cfg: GPTJConfig) -> list[Entry]:
    out = [copy("transformer.wte.weight", ("embed",)), *norm_entries(LAYER, {"ln_1": "ln1"}, bias=True)]
    out += linear_entries(LAYER, "attn", _ATTN)
    out += linear_entries(LAYER, "mlp", _MLP, bias=True)
    out += [copy("transformer.ln_f.weight", ("final_norm", "scale")), copy("transformer.ln_f.bias", ("final_norm", "bias")),
            copy("lm_head.bias", ("lm_head", "bias"))]
    if not cfg.tie_embeddings:
        out.append(linear("lm_head.weight", ("lm_head", "kernel")))
    return out


def hf_modules(cfg: GPTJConfig) -> dict[str, tuple]:
    return {**module_table(LAYER, "attn", _ATTN), **module_table(LAYER, "mlp", _MLP)}
