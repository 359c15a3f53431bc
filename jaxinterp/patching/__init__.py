"""Patching methods: causal tracing, activation and attribution patching, knockout.

Each sweep is one compiled program over intervention arrays (``vmap`` / ``lax.map``).
"""

from jaxinterp.patching.activation import PatchingResult, activation_patching, attribution_patching
from jaxinterp.patching.causal_trace import (
    TOKEN_CLASSES,
    Corruption,
    TraceBatch,
    TraceConfig,
    TracePlan,
    TraceResult,
    alt_subject_corruption,
    average_indirect_effect,
    embedding_sigma,
    gaussian_corruption,
    layer_window,
    prepare_batch,
    restore_probs,
    token_classes,
    trace,
    trace_batch,
    trace_kinds,
)
from jaxinterp.patching.knockout import (
    KnockoutResult,
    attention_knockout,
    mean_ablation_knockout,
    path_blocking,
    site_means,
)

__all__ = [
    "TOKEN_CLASSES", "Corruption", "TraceBatch", "TraceConfig", "TracePlan", "TraceResult", "alt_subject_corruption",
    "average_indirect_effect", "embedding_sigma", "gaussian_corruption", "layer_window", "prepare_batch", "restore_probs",
    "token_classes", "trace", "trace_batch", "trace_kinds", "PatchingResult", "activation_patching",
    "attribution_patching", "KnockoutResult", "attention_knockout", "mean_ablation_knockout", "path_blocking",
    "site_means",
]
