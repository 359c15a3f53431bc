"""Hugging Face MambaForCausalLM <-> Flax params."""

from __future__ import annotations

import numpy as np

from jaxinterp.models.common import Entry, param_shapes, params_from_hf, params_to_hf
from jaxinterp.sites import SiteContext
from .config import MambaConfig
from .model import Mamba, site_names

# HF conv1d weight [Di, 1, K] <-> Flax depthwise kernel [K, Di].
_CONV = (lambda a: np.ascontiguousarray(a[:, 0, :].T), lambda a: np.ascontiguousarray(a.T[:, None, :]))


def entries(cfg: MambaConfig) -> list[Entry]:
    out = [Entry("backbone.embeddings.weight", ("embeddings",))]
    for i in range(cfg.n_layers):
        h, p = f"backbone.layers.{i}", f"layers_{i}"
        m, pm = f"{h}.mixer", (p, "mixer")
        out += [
            Entry(f"{h}.norm.weight", (p, "norm", "scale")),
            Entry(f"{m}.in_proj.weight", (*pm, "in_proj", "kernel"), "T"),
            Entry(f"{m}.conv1d.weight", (*pm, "conv1d", "kernel"), _CONV),
            Entry(f"{m}.x_proj.weight", (*pm, "x_proj", "kernel"), "T"),
            Entry(f"{m}.dt_proj.weight", (*pm, "dt_proj", "kernel"), "T"),
            Entry(f"{m}.dt_proj.bias", (*pm, "dt_proj", "bias")),
            Entry(f"{m}.A_log", (*pm, "A_log")),
            Entry(f"{m}.D", (*pm, "D")),
            Entry(f"{m}.out_proj.weight", (*pm, "out_proj", "kernel"), "T"),
        ]
        if cfg.use_conv_bias:
            out.append(Entry(f"{m}.conv1d.bias", (*pm, "conv1d", "bias")))
        if cfg.use_bias:
            out += [Entry(f"{m}.in_proj.bias", (*pm, "in_proj", "bias")),
                    Entry(f"{m}.out_proj.bias", (*pm, "out_proj", "bias"))]
    out.append(Entry("backbone.norm_f.weight", ("norm_f", "scale")))
    if not cfg.tie_embeddings:
        out.append(Entry("lm_head.weight", ("lm_head", "kernel"), "T"))
    return out


def _canonical(key: str) -> str:
    # MambaModel checkpoints (no LM head) lack the "backbone." prefix; some old uploads say "embedding.".
    if not key.startswith(("backbone.", "lm_head.")):
        key = f"backbone.{key}"
    return key.replace("backbone.embedding.", "backbone.embeddings.")


def from_hf(cfg: MambaConfig, tensors):
    tensors = dict(tensors)
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # some exports write the tied copy explicitly
    shapes = param_shapes(Mamba(cfg), lambda: SiteContext(site_names(cfg)))
    return params_from_hf("mamba", entries(cfg), shapes, tensors, rename=_canonical)


def to_hf(cfg: MambaConfig, params):
    return params_to_hf(entries(cfg), params)
