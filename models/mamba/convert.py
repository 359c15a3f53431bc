"""Hugging Face MambaForCausalLM / FalconMambaForCausalLM checkpoint <-> layer-stacked Flax params
(and the naming helpers Mamba-2's conversion shares)."""

from __future__ import annotations

import numpy as np

from jaxinterp.hf import ConversionError
from jaxinterp.models.common import Entry, copy, drop_tied_copy, linear
from .config import MambaConfig


def depthwise_conv(hf: str, path) -> Entry:
    """HF depthwise conv1d weight ``[C, 1, K]`` <-> Flax kernel ``[K, C]``."""
    return Entry(hf, (tuple(path),), lambda a: (np.ascontiguousarray(a[:, 0, :].T),),
                 lambda parts: np.ascontiguousarray(parts[0].T[:, None, :]))


def entries(cfg: MambaConfig) -> list[Entry]:
    m, pm = "backbone.layers.{i}.mixer", ("layers", "mixer")
    out = [copy("backbone.embeddings.weight", ("embed",)),
           copy("backbone.layers.{i}.norm.weight", ("layers", "norm", "scale")),
           linear(f"{m}.in_proj.weight", (*pm, "in_proj", "kernel")),
           depthwise_conv(f"{m}.conv1d.weight", (*pm, "conv1d", "kernel")),
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


def canonical_tensors(model_type: str, tensors, tied: bool) -> dict:
    """Checkpoint tensors under their canonical names (``canonical``), refusing two names for one
    tensor; with tied embeddings an explicitly written identical ``lm_head.weight`` is dropped."""
    renamed = {}
    for k, v in tensors.items():
        if canonical(k) in renamed:
            raise ConversionError(f"{model_type} checkpoint holds two names for {canonical(k)!r}; expected one")
        renamed[canonical(k)] = v
    if tied:
        drop_tied_copy(model_type, renamed, "lm_head.weight", "backbone.embeddings.weight")
    return renamed
