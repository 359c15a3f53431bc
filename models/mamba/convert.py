"""Hugging Face MambaForCausalLM checkpoint <-> layer-stacked Flax params."""

from __future__ import annotations

import numpy as np

from jaxinterp.models.common import Entry, copy, linear
from .config import MambaConfig

# HF conv1d weight [Di, 1, K] <-> Flax depthwise kernel [K, Di].
_CONV = (lambda a: (np.ascontiguousarray(a[:, 0, :].T),), lambda parts: np.ascontiguousarray(parts[0].T[:, None, :]))


def entries(cfg: MambaConfig) -> list[Entry]:
    m, pm = "backbone.layers.{i}.mixer", ("layers", "mixer")
    out = [copy("backbone.embeddings.weight", ("embed",)),
           copy("backbone.layers.{i}.norm.weight", ("layers", "norm", "scale")),
           linear(f"{m}.in_proj.weight", (*pm, "in_proj", "kernel")),
           Entry(f"{m}.conv1d.weight", ((*pm, "conv1d", "kernel"),), *_CONV),
           linear(f"{m}.x_proj.weight", (*pm, "x_proj", "kernel")),
           linear(f"{m}.dt_proj.weight", (*pm, "dt_proj", "kernel")),
           copy(f"{m}.dt_proj.bias", (*pm, "dt_proj", "bias")),
           copy(f"{m}.A_log", (*pm, "A_log")),
           copy(f"{m}.D", (*pm, "D")),
           linear(f"{m}.out_proj.weight", (*pm, "out_proj", "kernel"))]
    if cfg.use_conv_bias:
        out.append(copy(f"{m}.conv1d.bias", (*pm, "conv1d", "bias")))
    if cfg.use_bias:
        out += [copy(f"{m}.in_proj.bias", (*pm, "in_proj", "bias")), copy(f"{m}.out_proj.bias", (*pm, "out_proj", "bias"))]
    out.append(copy("backbone.norm_f.weight", ("final_norm", "scale")))
    if not cfg.tie_embeddings:
        out.append(linear("lm_head.weight", ("lm_head", "kernel")))
    return out


def canonical(key: str) -> str:
    # MambaModel checkpoints (no LM head) lack the "backbone." prefix; some old uploads say "embedding.".
    if not key.startswith(("backbone.", "lm_head.")):
        key = f"backbone.{key}"
    return key.replace("backbone.embedding.", "backbone.embeddings.")
