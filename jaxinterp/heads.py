"""Attention-head granularity: per-head contributions to the residual stream.

``attn_out = sum_h z[..., h, :] @ W_O[h] + b``; ``head_contributions`` returns the terms of
that sum, so head attribution (direct logit attribution, attribution patching per head,
ATTNATTRIB-style analyses) can work per head without a site per head in the forward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxinterp.families import get_family
from jaxinterp.model import Model

__all__ = ["head_contributions", "head_output_weights"]


def head_output_weights(model: Model, layer: int) -> tuple[jax.Array, jax.Array | None]:
    """``(W_O [H, Dh, D], bias [D] or None)`` of ``layer``'s attention output projection."""
    fam = get_family(model.family)
    if not fam.attention:
        raise ValueError(f"model family {model.family!r} has no attention heads")
    n_layers = model.config.n_layers
    if not 0 <= layer < n_layers:
        raise IndexError(f"layer {layer} out of range for a model with {n_layers} layers")
    proj = fam.projections(model.config)["attn.o"]
    kernel = _get(model.params, proj.kernel)[layer]  # [H * Dh, D]
    bias = None if proj.bias is None else _get(model.params, proj.bias)[layer]
    n_heads = model.config.n_heads
    return kernel.reshape(n_heads, kernel.shape[0] // n_heads, kernel.shape[1]), bias


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def head_contributions(model: Model, z: jax.Array, layer: int) -> jax.Array:
    """Per-head outputs ``[B, T, H, D]`` from ``z [B, T, H, Dh]`` (captured at ``blocks.{layer}.attn.z``).

    Their sum over heads plus the bias equals ``blocks.{layer}.attn_out``.
    """
    w, _ = head_output_weights(model, layer)
    if z.ndim != 4 or z.shape[2:] != w.shape[:2]:
        raise ValueError(f"z must be [B, T, {w.shape[0]}, {w.shape[1]}] for layer {layer}, got {tuple(z.shape)}")
    return jnp.einsum("bthd,hdm->bthm", z, w.astype(z.dtype))
