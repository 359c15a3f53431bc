"""Interventions: small pytrees of arrays with a pure ``apply(x) -> x``.

Their array leaves are ordinary inputs of the compiled program, so

* ``jax.vmap`` over a stack of interventions runs a whole patching sweep at once,
* ``jax.grad`` with respect to them is attribution,
* they shard like any other input.

Masks select elements along the *leading* axes of a site: a mask of shape ``[B, T]``
(or ``[1, T]``) on a site ``[B, T, D]`` selects positions; ``[B, T, H]`` on
``attn.z [B, T, H, Dh]`` selects heads at positions; ``[B, H, Tq, Tk]`` on
``attn.scores`` selects attention edges. Missing trailing axes are broadcast. Values
broadcast against the site with numpy's (right-aligned) rules, so a ``[D]`` vector or a
``[T, D]`` mean both work on ``[B, T, D]``. ``positions_mask`` and ``heads_mask`` build
masks from index lists.

Shapes and dtypes are checked when the model is traced; a mismatch raises naming the
site and the expected shape.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

__all__ = [
    "Intervention",
    "Patch",
    "ZeroAblate",
    "MeanAblate",
    "Add",
    "Scale",
    "ProjectOut",
    "Noise",
    "Fn",
    "Compose",
    "ByLayer",
    "positions_mask",
    "heads_mask",
]


def _check_mask(mask: Any, x: jax.Array, site: str, kind: str) -> None:
    if mask is None:
        return
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"{kind} at {site!r}: mask must be boolean, got dtype {mask.dtype}")
    if mask.ndim > x.ndim:
        raise ValueError(
            f"{kind} at {site!r}: mask has shape {tuple(mask.shape)} with more axes than the site "
            f"{tuple(x.shape)}; masks index the leading axes (e.g. [B, T] or [1, T])"
        )
    for axis, (m, s) in enumerate(zip(mask.shape, x.shape)):
        if m not in (1, s):
            raise ValueError(
                f"{kind} at {site!r}: mask shape {tuple(mask.shape)} does not fit the leading axes "
                f"of the site {tuple(x.shape)} (axis {axis}: {m} vs {s}); expected a prefix of "
                f"{tuple(x.shape)} with 1 allowed for broadcasting"
            )


def _check_values(values: Any, x: jax.Array, site: str, kind: str, name: str = "values") -> None:
    values = jnp.asarray(values) if not hasattr(values, "shape") else values
    try:
        out = jnp.broadcast_shapes(tuple(values.shape), tuple(x.shape))
    except ValueError:
        out = None
    if out != tuple(x.shape):
        raise ValueError(
            f"{kind} at {site!r}: {name} of shape {tuple(values.shape)} do not broadcast to the site's "
            f"shape {tuple(x.shape)}; expected {tuple(x.shape)} or a right-aligned suffix of it "
            f"such as {tuple(x.shape[-1:])}"
        )
    if jnp.issubdtype(values.dtype, jnp.floating) and values.dtype != x.dtype:
        raise TypeError(
            f"{kind} at {site!r}: {name} have dtype {values.dtype} but the site is {x.dtype}; "
            f"cast them with .astype({x.dtype})"
        )


def _expand_mask(mask: jax.Array, x: jax.Array) -> jax.Array:
    mask = jnp.asarray(mask)
    return mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim))


def _select(mask: Optional[jax.Array], new: jax.Array, x: jax.Array) -> jax.Array:
    new = jnp.broadcast_to(new.astype(x.dtype), x.shape)
    if mask is None:
        return new
    return jnp.where(_expand_mask(mask, x), new, x)


class Intervention:
    """Base class: subclasses are flax ``struct.dataclass`` pytrees with ``apply``."""

    def validate(self, x: jax.Array, site: str) -> None:  # pragma: no cover - overridden
        pass

    def apply(self, x: jax.Array) -> jax.Array:  # pragma: no cover - overridden
        raise NotImplementedError


@struct.dataclass
class Patch(Intervention):
    """Replace the site with ``values`` where ``mask`` is true (everywhere if mask is None)."""

    values: jax.Array
    mask: Optional[jax.Array] = None

    def validate(self, x, site):
        _check_values(self.values, x, site, "Patch")
        _check_mask(self.mask, x, site, "Patch")

    def apply(self, x):
        return _select(self.mask, self.values, x)


@struct.dataclass
class ZeroAblate(Intervention):
    """Set the site to zero where ``mask`` is true."""

    mask: Optional[jax.Array] = None

    def validate(self, x, site):
        _check_mask(self.mask, x, site, "ZeroAblate")

    def apply(self, x):
        return _select(self.mask, jnp.zeros((), x.dtype), x)


@struct.dataclass
class MeanAblate(Intervention):
    """Replace the site with a mean activation (e.g. ``[D]`` or ``[T, D]``) where ``mask`` is true."""

    mean: jax.Array
    mask: Optional[jax.Array] = None

    def validate(self, x, site):
        _check_values(self.mean, x, site, "MeanAblate", "mean")
        _check_mask(self.mask, x, site, "MeanAblate")

    def apply(self, x):
        return _select(self.mask, self.mean, x)


@struct.dataclass
class Add(Intervention):
    """Add ``vector`` (a steering vector, or any broadcastable array) where ``mask`` is true."""

    vector: jax.Array
    mask: Optional[jax.Array] = None

    def validate(self, x, site):
        _check_values(self.vector, x, site, "Add", "vector")
        _check_mask(self.mask, x, site, "Add")

    def apply(self, x):
        return _select(self.mask, x + self.vector.astype(x.dtype), x)


@struct.dataclass
class Scale(Intervention):
    """Multiply the site by ``factor`` (scalar or broadcastable) where ``mask`` is true."""

    factor: jax.Array
    mask: Optional[jax.Array] = None

    def validate(self, x, site):
        factor = jnp.asarray(self.factor)
        _check_values(factor.astype(x.dtype) if factor.ndim == 0 else factor, x, site, "Scale", "factor")
        _check_mask(self.mask, x, site, "Scale")

    def apply(self, x):
        return _select(self.mask, x * jnp.asarray(self.factor).astype(x.dtype), x)


@struct.dataclass
class ProjectOut(Intervention):
    """Remove the component of the last axis that lies in span(``basis``).

    ``basis`` is ``[k, D]`` (or one ``[D]`` vector); it need not be orthonormal (it is
    orthonormalised with a QR decomposition inside ``apply``, so gradients flow).
    """

    basis: jax.Array
    mask: Optional[jax.Array] = None

    def validate(self, x, site):
        basis = jnp.atleast_2d(self.basis)
        if basis.ndim != 2 or basis.shape[-1] != x.shape[-1]:
            raise ValueError(
                f"ProjectOut at {site!r}: basis of shape {tuple(jnp.shape(self.basis))} must be [k, {x.shape[-1]}] "
                f"or [{x.shape[-1]}] for a site of shape {tuple(x.shape)}"
            )
        _check_mask(self.mask, x, site, "ProjectOut")

    def apply(self, x):
        basis = jnp.atleast_2d(self.basis).astype(jnp.float32)  # [k, D]
        q, _ = jnp.linalg.qr(basis.T)  # [D, k], orthonormal columns
        xf = x.astype(jnp.float32)
        projected = xf - (xf @ q) @ q.T
        return _select(self.mask, projected.astype(x.dtype), x)


@struct.dataclass
class Noise(Intervention):
    """Add explicit noise ``scale * noise`` where ``mask`` is true.

    Passing the noise array (rather than a key) makes results reproducible across
    implementations; ``Noise.from_key`` draws Gaussian noise of a given shape.
    """

    noise: jax.Array
    scale: jax.Array = 1.0
    mask: Optional[jax.Array] = None

    @classmethod
    def from_key(cls, key, shape, scale=1.0, mask=None, dtype=jnp.float32) -> "Noise":
        return cls(noise=jax.random.normal(key, shape, dtype), scale=jnp.asarray(scale, dtype), mask=mask)

    def validate(self, x, site):
        _check_values(self.noise, x, site, "Noise", "noise")
        _check_mask(self.mask, x, site, "Noise")

    def apply(self, x):
        return _select(self.mask, x + jnp.asarray(self.scale, x.dtype) * self.noise.astype(x.dtype), x)


@struct.dataclass
class Fn(Intervention):
    """Wrap a plain callable ``x -> x`` (static: it is not a pytree leaf)."""

    fn: Callable[[jax.Array], jax.Array] = struct.field(pytree_node=False)

    def apply(self, x):
        return self.fn(x)


@struct.dataclass
class Compose(Intervention):
    """Apply several interventions in order (a list in the interventions mapping does the same)."""

    items: Sequence[Any]

    def validate(self, x, site):
        # Each item is validated against the value it will see, in apply order.
        from jaxinterp.sites import apply_intervention

        for item in self.items:
            x = apply_intervention(item, x, site)

    def apply(self, x):
        for item in self.items:
            x = item.apply(x) if hasattr(item, "apply") else item(x)
        return x


@struct.dataclass
class ByLayer(Intervention):
    """One intervention per layer, stacked: every array leaf of ``item`` has a leading layer axis.

    Registered on a per-layer glob (``"blocks.*.resid_post"``), it acts at layer ``i`` as ``item``
    with each leaf's slice ``[i]``. A sweep that patches different values into every layer is then
    one intervention the scanned layers index, rather than one per layer.
    """

    item: Any

    def at_layer(self, layer) -> Any:
        # jnp.asarray: a NumPy leaf cannot be indexed by the scan's traced layer index
        return jax.tree_util.tree_map(lambda a: jnp.asarray(a)[layer], self.item)

    def apply(self, x):  # pragma: no cover - the site context slices it first
        raise TypeError("ByLayer acts on per-layer sites (blocks.*.<site>): the layer picks its slice")


def positions_mask(seq_len: int, positions: Sequence[int] | int, batch: int = 1) -> jax.Array:
    """Boolean ``[batch, seq_len]`` mask that is true at ``positions`` (negatives count from the end)."""
    positions = np.atleast_1d(np.asarray(positions, dtype=np.int64))
    if np.any((positions >= seq_len) | (positions < -seq_len)):
        raise IndexError(f"positions {positions.tolist()} out of range for a sequence of length {seq_len}")
    mask = np.zeros((batch, seq_len), dtype=bool)
    mask[:, positions % seq_len] = True
    return jnp.asarray(mask)


def heads_mask(seq_len: int, n_heads: int, heads: Sequence[int] | int, positions=None, batch: int = 1) -> jax.Array:
    """Boolean ``[batch, seq_len, n_heads]`` mask for ``attn.z``: ``heads`` at ``positions`` (all if None)."""
    heads = np.atleast_1d(np.asarray(heads, dtype=np.int64))
    if np.any((heads >= n_heads) | (heads < 0)):
        raise IndexError(f"heads {heads.tolist()} out of range for a model with {n_heads} heads")
    pos = np.ones((batch, seq_len), bool) if positions is None else np.asarray(positions_mask(seq_len, positions, batch))
    mask = np.zeros((batch, seq_len, n_heads), dtype=bool)
    mask[:, :, heads] = True
    return jnp.asarray(mask & pos[:, :, None])
