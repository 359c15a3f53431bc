"""Hugging Face Mixtral / OLMoE ForCausalLM checkpoints <-> the shared block's parameters.

Checkpoints hold one tensor per expert (``...experts.{e}.w1.weight`` for Mixtral,
``...experts.{e}.gate_proj.weight`` for OLMoE, torch ``[out, in]``); the block keeps one stacked
kernel per layer (``moe/experts/gate [E, D, F]``). ``pack`` regroups the per-expert tensors into
a lazily stacked ``...experts.<w>.weight`` per layer before the mapping reads them (one layer's
experts are materialised at a time), and ``unpack`` splits them again on export.
"""

from __future__ import annotations

import numpy as np

from jaxinterp.hf import ConversionError
from jaxinterp.models.common import Entry, copy, linear
from jaxinterp.models.transformer.convert import (
    ATTN_LINEARS, LAYER, linear_entries, module_table, norm_entries, qk_norm_entries,
)
from .config import MixtralConfig

IGNORABLE = (".rotary_emb.inv_freq",)
# variant -> (sparse block module, {HF expert weight: our expert kernel})
_MOE = {"mixtral": ("block_sparse_moe", {"w1": "gate", "w3": "up", "w2": "down"}),
        "olmoe": ("mlp", {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"})}


def _expert(cfg: MixtralConfig, w: str) -> str:
    return f"{LAYER}.{_MOE[cfg.variant][0]}.experts.{{e}}.{w}.weight"


def _stacked(cfg: MixtralConfig, w: str) -> str:
    return f"{LAYER}.{_MOE[cfg.variant][0]}.experts.{w}.weight"


def _swap(a):
    return (np.swapaxes(np.asarray(a), -1, -2),)


def _unswap(parts):
    return np.swapaxes(parts[0], -1, -2)


def entries(cfg: MixtralConfig) -> list[Entry]:
    module, experts = _MOE[cfg.variant]
    out = [copy("model.embed_tokens.weight", ("embed",)),
           *norm_entries(LAYER, {"input_layernorm": "ln1", "post_attention_layernorm": "ln2"})]
    out += linear_entries(LAYER, "self_attn", ATTN_LINEARS, cfg.attention_bias)
    if cfg.variant == "olmoe":
        out += qk_norm_entries(LAYER)
    out.append(linear(f"{LAYER}.{module}.gate.weight", ("layers", "moe", "router", "kernel")))
    # [E, out, in] <-> [E, in, out]
    out += [Entry(_stacked(cfg, w), (("layers", "moe", "experts", ours),), _swap, _unswap) for w, ours in experts.items()]
    out.append(copy("model.norm.weight", ("final_norm", "scale")))
    if not cfg.tie_embeddings:
        out.append(linear("lm_head.weight", ("lm_head", "kernel")))
    return out


def hf_modules(cfg: MixtralConfig) -> dict[str, tuple]:
    return {**module_table(LAYER, "self_attn", ATTN_LINEARS),
            "moe.router": (f"{LAYER}.{_MOE[cfg.variant][0]}.gate", None)}


class _Stacked:
    """Per-expert checkpoint tensors seen as one ``[E, ...]`` tensor, stacked only when read."""

    def __init__(self, parts):
        self.parts = parts
        self.shape = (len(parts), *parts[0].shape)
        self.dtype = parts[0].dtype

    def __array__(self, dtype=None, copy=None):
        out = np.stack([np.asarray(p) for p in self.parts])
        return out if dtype is None else out.astype(dtype)


def pack(cfg: MixtralConfig, tensors: dict) -> dict:
    """Per-expert tensors -> one lazily stacked tensor per layer and expert weight."""
    out, missing = dict(tensors), []
    for w in _MOE[cfg.variant][1]:
        for i in range(cfg.n_layers):
            names = [_expert(cfg, w).format(i=i, e=e) for e in range(cfg.n_experts)]
            absent = [n for n in names if n not in out]
            if absent:
                missing += absent
                continue
            parts = [out.pop(n) for n in names]
            shapes = sorted({tuple(p.shape) for p in parts})
            if len(shapes) > 1:
                raise ConversionError(f"{cfg.variant} checkpoint: the experts of {_stacked(cfg, w).format(i=i)!r} "
                                      f"have different shapes {shapes}")
            out[_stacked(cfg, w).format(i=i)] = _Stacked(parts)
    if missing:
        raise ConversionError(f"{cfg.variant} checkpoint does not match its config ({cfg.n_experts} experts): "
                              f"missing tensors {missing[:6]}" + (f" and {len(missing) - 6} more" if len(missing) > 6 else ""))
    return out


def unpack(cfg: MixtralConfig, tensors: dict) -> dict:
    """Inverse of ``pack`` on exported arrays: one tensor per expert again."""
    out = dict(tensors)
    for w in _MOE[cfg.variant][1]:
        for i in range(cfg.n_layers):
            stacked = out.pop(_stacked(cfg, w).format(i=i))
            out.update({_expert(cfg, w).format(i=i, e=e): np.ascontiguousarray(stacked[e]) for e in range(cfg.n_experts)})
    return out
