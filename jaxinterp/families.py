"""The family registry: the one place the library learns what a model architecture is.

A ``Family`` answers every question library code asks about an architecture: how its config
reads and writes Hugging Face ``config.json``, which Flax module computes it, how checkpoint
tensors map to its (layer-stacked) parameters and back, the logical sharding axes of every
parameter, the linear projections that LoRA / ROME / head attribution act on, where its token
embedding lives, its site layout, and how one layer runs on its own (the incremental causal-trace
engine and generation). Library code reaches a family only through this registry, so adding a
family is one folder under ``models/`` plus one line in ``BUILTIN``.

Projections use site-style names (``attn.q``, ``attn.o``, ``mlp.down``, ``mixer.in_proj``); each
names the stacked kernel's path in ``model.params`` (layout ``[layers, in, out]``), an optional
column range of that kernel (the SSM / gate halves of Mamba's fused ``in_proj``), the sites that
hold its input and output, and the Hugging Face module it comes from (PEFT export).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from typing import Any, Callable, Mapping, Optional

import numpy as np

__all__ = [
    "Family", "Projection", "register_family", "get_family", "families", "family_for_config",
    "family_for_model_type", "layer_slice", "BUILTIN",
]

# Built-in families: name -> module that registers it on import.
BUILTIN = {
    "gpt2": "jaxinterp.models.gpt2",
    "gemma": "jaxinterp.models.gemma",
    "gpt_neox": "jaxinterp.models.gpt_neox",
    "gptj": "jaxinterp.models.gptj",
    "llama": "jaxinterp.models.llama",
    "mamba": "jaxinterp.models.mamba",
    "mamba2": "jaxinterp.models.mamba2",
    "mixtral": "jaxinterp.models.mixtral",
    "olmo2": "jaxinterp.models.olmo2",
    "phi3": "jaxinterp.models.phi3",
}
_FAMILIES: dict[str, "Family"] = {}


@dataclasses.dataclass(frozen=True)
class Projection:
    """One linear map of every layer: ``out = in @ kernel[layer][:, cols] (+ bias[layer][cols])``.

    ``kernel``/``bias``: paths in ``model.params`` of the stacked ``[L, d_in, d_out]`` kernel and
    ``[L, d_out]`` bias (None when the map has no bias). ``cols``: a column range of the kernel when
    the projection is part of a fused parameter (the SSM / gate halves of Mamba's ``in_proj``).
    ``in_site``/``out_site``: per-layer site suffixes holding the map's input and output.
    ``hf_module``: the Hugging Face module name with ``{i}`` for the layer; ``hf_fan_in_fan_out``: HF
    stores the weight ``[in, out]`` (GPT-2 Conv1D) rather than torch Linear's ``[out, in]``;
    ``hf_cols``: where the HF module fuses several projections (GPT-2 ``c_attn``, NeoX
    ``query_key_value``), the ranges of its output features that are this projection's, in order.
    """

    kernel: tuple[str, ...]
    bias: Optional[tuple[str, ...]]
    in_site: str
    out_site: str
    hf_module: str
    hf_fan_in_fan_out: bool = False
    cols: Optional[tuple[int, int]] = None
    hf_cols: Optional[tuple[tuple[int, int], ...]] = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Family:
    """Everything jaxinterp needs to know about one architecture family.

    Attributes:
      name: registry key (also ``model.family``).
      config_cls: frozen config dataclass with ``from_hf(dict)`` / ``to_hf()``.
      hf_model_types: ``config.json`` ``model_type`` values this family reads.
      module: ``config -> flax Module`` computing ``(logits, cache)`` (see ``jaxinterp.model.run``).
      site_names: ``config -> tuple[str, ...]`` every site, in forward order.
      from_hf: ``(config, {hf_name: array}, dtype, placer=None) -> params`` (refuses missing/extra/mis-shaped
        tensors; ``placer``: ``models.common.HostPlacer`` (numpy, the default) or ``DevicePlacer``).
      to_hf: ``(config, params) -> {hf_name: np.ndarray}`` (inverse of ``from_hf``).
      param_axes: rows ``(regex on the "/"-joined parameter path, logical axes of one layer's
        parameter)``, first match wins; stacked per-layer parameters get ``layers`` in front
        (``jaxinterp.sharding.param_axes``).
      projections: ``config -> {name: Projection}``: every linear map LoRA may adapt and ROME may edit.
      rome_targets: ``config -> names`` of the projections ROME can edit, the default first.
      embedding: ``params -> [V, D]`` token-embedding table (causal tracing's noise scale).
      attention: True for families with attention heads (``attn.z`` and ``attn.o`` exist).
      stepper: the per-layer interface of the incremental causal-trace engine: ``state_sites``
        (per-layer sites of a reference run that summarise earlier positions), ``per_position``
        (sites whose value at token t affects no other position of its layer),
        ``prefix_state(config, captures, s0)``, ``layer(model, layer, x, sites, state, s0)`` and
        ``head(model, x)``; None where a family has none.
      trace_kinds / trace_freeze: default site kinds traced / frozen by causal-tracing experiments.
    """

    name: str
    config_cls: type
    hf_model_types: tuple[str, ...]
    module: Callable[[Any], Any]
    site_names: Callable[[Any], tuple[str, ...]]
    from_hf: Callable[..., Any]
    to_hf: Callable[[Any, Any], dict]
    param_axes: tuple[tuple[str, tuple], ...]
    projections: Callable[[Any], Mapping[str, Projection]]
    rome_targets: Callable[[Any], tuple[str, ...]]
    embedding: Callable[[Any], Any]
    attention: bool
    stepper: Any = None
    trace_kinds: tuple[str, ...] = ("resid_post",)
    trace_freeze: tuple[str, ...] = ()


def register_family(family: Family) -> Family:
    _FAMILIES[family.name] = family
    return family


def _import_builtin(name: str) -> None:
    if name not in _FAMILIES and name in BUILTIN:
        importlib.import_module(BUILTIN[name])


def get_family(name: str) -> Family:
    _import_builtin(name)
    if name not in _FAMILIES:
        known = sorted(set(BUILTIN) | set(_FAMILIES))
        raise KeyError(f"unknown model family {name!r}; known families: {known}")
    return _FAMILIES[name]


def families() -> dict[str, Family]:
    """Every family (importing the built-in ones)."""
    for name in BUILTIN:
        _import_builtin(name)
    return dict(_FAMILIES)


def family_for_config(config: Any) -> Family:
    for fam in families().values():
        if type(config) is fam.config_cls:
            return fam
    raise TypeError(f"no model family uses config type {type(config).__name__}; families: {sorted(families())}")


def family_for_model_type(model_type: str) -> Family:
    from jaxinterp.hf import ConversionError

    for fam in families().values():
        if model_type in fam.hf_model_types:
            return fam
    known = sorted(t for fam in families().values() for t in fam.hf_model_types)
    close = difflib.get_close_matches(str(model_type), known, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ConversionError(f"unsupported model_type {model_type!r}{hint}; supported: {known}")


def layer_slice(tree: Any, layer) -> Any:
    """One layer's parameters from a stacked subtree (``layer`` may be traced)."""
    import jax

    return jax.tree_util.tree_map(lambda a: a[layer], tree)
