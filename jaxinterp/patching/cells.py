"""What both causal-tracing engines share: which layers a cell restores, and the score."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["layer_window", "answer_prob"]


def layer_window(layer: int, window: int, n_layers: int) -> range:
    """Layers restored for a cell at ``layer``: ROME's ``[l - w//2, l - (-w//2))`` clipped to the model."""
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def answer_prob(logits: jax.Array, answer: jax.Array) -> jax.Array:
    """Mean over rows of ``softmax(logits)[answer]``; ``logits [..., N, V]`` -> ``[...]``."""
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., answer].mean(-1)
