"""Patching methods: causal tracing, activation and attribution patching, knockout.

Each sweep is one compiled program over intervention arrays (``vmap`` / ``lax.map``).
"""

from jaxinterp.patching.causal_trace import (
    TOKEN_CLASSES,
    Corruption,
    TraceConfig,
    TraceResult,
    alt_subject_corruption,
    average_indirect_effect,
    embedding_sigma,
    gaussian_corruption,
    layer_window,
    restore_probs,
    token_classes,
    trace,
    trace_batch,
    trace_kinds,
)

__all__ = [
    "TOKEN_CLASSES", "Corruption", "TraceConfig", "TraceResult", "alt_subject_corruption",
    "average_indirect_effect", "embedding_sigma", "gaussian_corruption", "layer_window", "restore_probs",
    "token_classes", "trace", "trace_batch", "trace_kinds",
]
