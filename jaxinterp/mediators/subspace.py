"""Interchange interventions on a subspace of a site, and the mediators that make them.

An interchange intervention runs a *base* input but gives one of its site vectors the source
input's value along a subspace (Geiger et al., "Finding Alignments Between Interpretable Causal
Variables and Distributed Neural Representations", 2023):

    x' = x + Rᵀ R (s - x)        R: [k, D] with orthonormal rows, s: the source's vector

``R = I`` is full activation patching (``x' = s``); ``R`` = rows of the identity patches neurons;
a learned ``R`` (distributed alignment search, ``jaxinterp.mediators.das``) is a non-basis-aligned
subspace. ``FeatureInterchange`` swaps one SAE latent instead: ``x' = x + (f_j(s) - f_j(x)) d_j``.

Both are interventions in the ``jaxinterp.interventions`` sense (pytrees with ``apply``), so jit,
vmap and sharding apply. A *mediator* (``Subspace``, ``SAEFeature``) is the part that does not
depend on the inputs; ``mediator.intervene(source, mask)`` makes the intervention for a batch.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import struct

from jaxinterp.interventions import Intervention, _check_mask, _check_values, _select

__all__ = ["Interchange", "FeatureInterchange", "Subspace", "SAEFeature", "orthonormal_rows"]

_HI = jax.lax.Precision.HIGHEST


def orthonormal_rows(weight: jax.Array) -> jax.Array:
    """``[D, k]`` unconstrained weight -> ``[k, D]`` with orthonormal rows (the Q of its QR).

    Orthonormal to float precision for any full-rank ``weight``, so training the weight with any
    optimizer keeps the rows orthonormal; QR is differentiable (``jnp.linalg.qr``'s rule).
    """
    q, _ = jnp.linalg.qr(jnp.asarray(weight, jnp.float32))  # [D, k]
    return q.T


@struct.dataclass
class Interchange(Intervention):
    """``x + (s - x) Rᵀ R`` where ``mask`` is true: the source's coordinates in span(R).

    ``basis`` ``[k, D]`` (orthonormal rows; a Gram-like product is taken, so other rows give an
    oblique map), ``source`` broadcasts to the site (``[B, 1, D]``: one vector per row).
    """

    basis: jax.Array
    source: jax.Array
    mask: Optional[jax.Array] = None

    def validate(self, x, site):
        basis = jnp.shape(self.basis)
        if len(basis) != 2 or basis[1] != x.shape[-1] or basis[0] > x.shape[-1]:
            raise ValueError(f"Interchange at {site!r}: basis of shape {basis} must be [k, {x.shape[-1]}] with "
                             f"k <= {x.shape[-1]} for a site of shape {tuple(x.shape)}")
        _check_values(self.source, x, site, "Interchange", "source")
        _check_mask(self.mask, x, site, "Interchange")

    def apply(self, x):
        basis = self.basis.astype(jnp.float32)  # [k, D]
        diff = self.source.astype(jnp.float32) - x.astype(jnp.float32)  # [B, T, D]
        coords = jnp.matmul(diff, basis.T, precision=_HI)  # [B, T, k]
        new = x.astype(jnp.float32) + jnp.matmul(coords, basis, precision=_HI)
        return _select(self.mask, new.astype(x.dtype), x)


@struct.dataclass
class FeatureInterchange(Intervention):
    """``x + (f_j(s) - f_j(x)) d_j`` where ``mask`` is true: SAE latent ``j`` takes the source's value.

    ``d_j`` is the latent's decoder row in the site's units (``W_dec[j] / input_scale``); the SAE must
    not normalise each input (``act_norm="none"``).
    """

    sae: Any
    feature: jax.Array
    source: jax.Array
    mask: Optional[jax.Array] = None

    def validate(self, x, site):
        if self.sae.act_norm != "none":
            raise ValueError(f"FeatureInterchange at {site!r}: SAEs with act_norm={self.sae.act_norm!r} "
                             "are not supported (the decoder direction depends on each input)")
        if self.sae.d_in != x.shape[-1]:
            raise ValueError(f"FeatureInterchange at {site!r}: the SAE reads width {self.sae.d_in}, "
                             f"the site has width {x.shape[-1]}")
        _check_values(self.source, x, site, "FeatureInterchange", "source")
        _check_mask(self.mask, x, site, "FeatureInterchange")

    def apply(self, x):
        j = self.feature
        xf = x.astype(jnp.float32)
        f_x = self.sae.encode(xf)[..., j]  # [B, T]
        f_s = self.sae.encode(self.source.astype(jnp.float32))[..., j]  # [B, 1]
        direction = self.sae.params["W_dec"][j] / self.sae.buffers["input_scale"]  # [D]
        new = xf + (f_s - f_x)[..., None] * direction
        return _select(self.mask, new.astype(x.dtype), x)


@struct.dataclass
class Subspace:
    """A mediator: the span of ``basis`` ``[k, D]`` (orthonormal rows)."""

    basis: jax.Array

    @property
    def k(self) -> int:
        return self.basis.shape[-2]

    def intervene(self, source: jax.Array, mask: Optional[jax.Array] = None) -> Interchange:
        return Interchange(self.basis, source, mask)

    @classmethod
    def full(cls, width: int) -> "Subspace":
        """The whole space: full activation patching."""
        return cls(jnp.eye(width, dtype=jnp.float32))

    @classmethod
    def neurons(cls, index, width: int) -> "Subspace":
        """Coordinates ``index`` (an int or a list) of the site's basis."""
        index = jnp.atleast_1d(jnp.asarray(index))
        return cls(jax.nn.one_hot(index, width, dtype=jnp.float32))

    @classmethod
    def random(cls, key: jax.Array, width: int, k: int) -> "Subspace":
        """A uniformly random k-dimensional subspace (Haar): the QR of a Gaussian matrix."""
        return cls(orthonormal_rows(jax.random.normal(key, (width, k), jnp.float32)))


@struct.dataclass
class SAEFeature:
    """A mediator: latent ``feature`` of ``sae`` (a ``jaxinterp.sae`` SAE)."""

    sae: Any
    feature: jax.Array

    def intervene(self, source: jax.Array, mask: Optional[jax.Array] = None) -> FeatureInterchange:
        return FeatureInterchange(self.sae, self.feature, source, mask)
