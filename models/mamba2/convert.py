"""Hugging Face Mamba2ForCausalLM checkpoint <-> layer-stacked Flax params."""

from __future__ import annotations

from jaxinterp.models.common import Entry, copy, linear
from jaxinterp.models.mamba.convert import depthwise_conv
from .config import Mamba2Config


def entries(cfg: Mamba2Config) -> list[Entry]:
    m, pm = "backbone.layers.{i}.mixer", ("layers", "mixer")
    out = [copy("backbone.embeddings.weight", ("embed",)),
           copy("backbone.layers.{i}.norm.weight", ("layers", "norm", "scale")),
           linear(f"{m}.in_proj.weight", (*pm, "in_proj", "kernel")),
           depthwise_conv(f"{m}.conv1d.weight", (*pm, "conv1d", "kernel")),
           copy(f"{m}.dt_bias", (*pm, "dt_bias")),
           copy(f"{m}.A_log", (*pm, "A_log")),
           copy(f"{m}.D", (*pm, "D")),
           copy(f"{m}.norm.weight", (*pm, "norm", "scale")),
           linear(f"{m}.out_proj.weight", (*pm, "out_proj", "kernel"))]
    if cfg.use_conv_bias:
        out.append(copy(f"{m}.conv1d.bias", (*pm, "conv1d", "bias")))
    if cfg.use_bias:
        out += [copy(f"{m}.in_proj.bias", (*pm, "in_proj", "bias")), copy(f"{m}.out_proj.bias", (*pm, "out_proj", "bias"))]
    out.append(copy("backbone.norm_f.weight", ("final_norm", "scale")))
    if not cfg.tie_embeddings:
        out.append(linear("lm_head.weight", ("lm_head", "kernel")))
    return out
