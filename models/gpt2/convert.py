"""Hugging Face GPT2LMHeadModel checkpoint <-> the shared block's parameters.

GPT-2 stores its linear maps as ``Conv1D`` (``[in, out]``, the Flax kernel layout) and fuses the
query/key/value projections in ``c_attn`` (output features ``[q | k | v]``), which is split into
``attn/{q,k,v}`` on load and joined on export.
"""

from __future__ import annotations

from jaxinterp.models.common import Entry, copy, linear, split_columns
from .config import GPT2Config

# Causal-mask buffers stored by old checkpoints (e.g. the original "gpt2" upload).
IGNORABLE = (".attn.bias", ".attn.masked_bias")


def entries(cfg: GPT2Config) -> list[Entry]:
    h, d = "transformer.h.{i}", cfg.d_model
    out = [copy("transformer.wte.weight", ("embed",)), copy("transformer.wpe.weight", ("pos_embed",))]
    for ln, ours in (("ln_1", "ln1"), ("ln_2", "ln2")):
        out += [copy(f"{h}.{ln}.weight", ("layers", ours, "scale")), copy(f"{h}.{ln}.bias", ("layers", ours, "bias"))]
    qkv = [("layers", "attn", n) for n in ("q", "k", "v")]
    out += [split_columns(f"{h}.attn.c_attn.weight", [(*p, "kernel") for p in qkv], [d] * 3, transpose=False),
            split_columns(f"{h}.attn.c_attn.bias", [(*p, "bias") for p in qkv], [d] * 3, transpose=False)]
    for mod, lin, ours in (("attn", "c_proj", ("attn", "o")), ("mlp", "c_fc", ("mlp", "up")),
                           ("mlp", "c_proj", ("mlp", "down"))):
        out += [copy(f"{h}.{mod}.{lin}.weight", ("layers", *ours, "kernel")),
                copy(f"{h}.{mod}.{lin}.bias", ("layers", *ours, "bias"))]
    out += [copy("transformer.ln_f.weight", ("final_norm", "scale")),
            copy("transformer.ln_f.bias", ("final_norm", "bias"))]
    if not cfg.tie_embeddings:
        out.append(linear("lm_head.weight", ("lm_head", "kernel")))
    return out


def hf_modules(cfg: GPT2Config) -> dict[str, tuple]:
    h, d = "transformer.h.{i}", cfg.d_model
    return {
        "attn.q": (f"{h}.attn.c_attn", ((0, d),)),
        "attn.k": (f"{h}.attn.c_attn", ((d, 2 * d),)),
        "attn.v": (f"{h}.attn.c_attn", ((2 * d, 3 * d),)),
        "attn.o": (f"{h}.attn.c_proj", None),
        "mlp.up": (f"{h}.mlp.c_fc", None),
        "mlp.down": (f"{h}.mlp.c_proj", None),
    }


def canonical(key: str) -> str:
    # The original hub upload stores the GPT2Model weights without the "transformer." prefix.
    return key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"
