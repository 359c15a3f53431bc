"""Hugging Face GPT2LMHeadModel <-> Flax params."""

from __future__ import annotations

from jaxinterp.models.common import Entry, drop_tied_copy, param_shapes, params_from_hf, params_to_hf
from jaxinterp.sites import SiteContext
from .config import GPT2Config
from .model import GPT2, site_names

# Causal-mask buffers stored by old checkpoints (e.g. the original "gpt2" upload).
_IGNORABLE = (".attn.bias", ".attn.masked_bias")


def entries(cfg: GPT2Config) -> list[Entry]:
    out = [Entry("transformer.wte.weight", ("wte",)), Entry("transformer.wpe.weight", ("wpe",))]
    for i in range(cfg.n_layers):
        h, p = f"transformer.h.{i}", f"h_{i}"
        for ln in ("ln_1", "ln_2"):
            out += [Entry(f"{h}.{ln}.weight", (p, ln, "scale")), Entry(f"{h}.{ln}.bias", (p, ln, "bias"))]
        for mod, lin in (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj")):
            # GPT-2 uses Conv1D: weights are stored [in, out] like a Flax kernel.
            out += [Entry(f"{h}.{mod}.{lin}.weight", (p, mod, lin, "kernel")),
                    Entry(f"{h}.{mod}.{lin}.bias", (p, mod, lin, "bias"))]
    out += [Entry("transformer.ln_f.weight", ("ln_f", "scale")), Entry("transformer.ln_f.bias", ("ln_f", "bias"))]
    if not cfg.tie_embeddings:
        out.append(Entry("lm_head.weight", ("lm_head", "kernel"), "T"))
    return out


def from_hf(cfg: GPT2Config, tensors):
    tensors = dict(tensors)
    if cfg.tie_embeddings:
        drop_tied_copy("gpt2", tensors, "lm_head.weight", "transformer.wte.weight")
    shapes = param_shapes(GPT2(cfg), lambda: SiteContext(site_names(cfg)))
    return params_from_hf("gpt2", entries(cfg), shapes, tensors, _IGNORABLE, rename=_canonical)


def _canonical(key: str) -> str:
    # The original hub upload stores the GPT2Model weights without the "transformer." prefix.
    return key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"


def to_hf(cfg: GPT2Config, params):
    return params_to_hf(entries(cfg), params)
