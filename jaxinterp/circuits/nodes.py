"""Nodes of a circuit: the latents of a dictionary at each spliced site, plus the dictionary's error term.

At a site with an SAE, ``x = decode(f) + e`` with ``f = encode(x)`` (the *feature* nodes) and
``e = x - decode(f)`` (the *error* node, a ``[D]`` vector per position treated as one node). A
``Neurons`` dictionary makes the site's own coordinates the nodes (``encode = decode = identity``,
no error node): the neuron-circuit baseline (MLP neurons at ``mlp.post``, residual or attention-
output dimensions).

``Sites`` ties an ordered set of site names to their dictionaries and validates them against a
model (unknown site, width mismatch: one-line errors). The interventions here are the three ways
circuit code touches a site:

* ``NodeValues``: set the site to ``decode(features) + error`` (given node values: integrated
  gradients and edges differentiate through them);
* ``NodeProbe``: ``decode(encode(x) + probe_f) + error(x) + probe_e`` (zero probes: attribution
  patching differentiates with respect to them; the site's value is unchanged);
* ``NodeAblate``: replace the nodes outside a circuit by their means (faithfulness, SHIFT).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import struct

from jaxinterp.interventions import Intervention
from jaxinterp.sae.families import Reads
from jaxinterp.sae.splice import Splice
from jaxinterp.sites import resolve_sites, split_layer_site

__all__ = ["Neurons", "Sites", "NodeValues", "NodeProbe", "NodeAblate", "stop_gradient", "STREAM_SUFFIXES",
           "site_input", "site_output", "encode_nodes", "has_error_node"]

# Sites that carry the residual stream: edges join nodes with no stream site strictly between them.
STREAM_SUFFIXES = ("resid_pre", "resid_mid", "resid_post")
STREAM_TOP = ("embed", "final_norm")


@struct.dataclass
class Neurons:
    """The identity dictionary: every coordinate of the site is a node (no error term)."""

    d: int = struct.field(pytree_node=False)
    reads: Reads = struct.field(pytree_node=False, default=Reads())

    @property
    def d_in(self) -> int:
        return self.d

    @property
    def d_sae(self) -> int:
        return self.d

    def encode(self, x: jax.Array) -> jax.Array:
        return x

    def decode(self, f: jax.Array, x: jax.Array | None = None) -> jax.Array:
        return f


def has_error_node(dictionary) -> bool:
    """Whether a site's dictionary leaves an error term (an SAE does; ``Neurons`` do not)."""
    return not isinstance(dictionary, Neurons)


def site_input(dictionary, x: jax.Array) -> jax.Array:
    """The site's value ``[B, T, ...]`` as the dictionary's input ``[B, T, d_in]`` (float32)."""
    return Splice(dictionary).sae_input(x).astype(jnp.float32)


def site_output(dictionary, x: jax.Array, y: jax.Array) -> jax.Array:
    """The dictionary-space value ``y`` put back in the layout and dtype of the site value ``x``."""
    return Splice(dictionary)._site_output(x, y.astype(x.dtype))


def encode_nodes(dictionary, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(features [B, T, F], error [B, T, D])`` of a site value ``x``."""
    xin = site_input(dictionary, x)
    f = dictionary.encode(xin)
    return f, xin - dictionary.decode(f, xin)


@struct.dataclass
class NodeValues(Intervention):
    """Set the site to ``decode(features) + error``: ``features [B, T, F]``, ``error [B, T, D]``.

    ``select`` (a traced bool, optional): act only where it is true, else leave the site as it is
    (one compiled program then serves every site: the selected one is an input, not the structure).
    """

    dictionary: Any
    features: jax.Array
    error: jax.Array
    select: Any = None

    def validate(self, x, site):
        Splice(self.dictionary).validate(x, site)

    def apply(self, x):
        def values(x):
            xin = site_input(self.dictionary, x)
            return site_output(self.dictionary, x, self.dictionary.decode(self.features, xin) + self.error)

        return values(x) if self.select is None else jax.lax.cond(self.select, values, lambda v: v, x)


@struct.dataclass
class NodeProbe(Intervention):
    """``decode(encode(x) + probe_f) + (x - decode(encode(x))) + probe_e``: equal to ``x`` at zero probes."""

    dictionary: Any
    probe_f: jax.Array
    probe_e: jax.Array

    def validate(self, x, site):
        Splice(self.dictionary).validate(x, site)

    def apply(self, x):
        xin = site_input(self.dictionary, x)
        f = self.dictionary.encode(xin)
        y = self.dictionary.decode(f + self.probe_f, xin) + (xin - self.dictionary.decode(f, xin)) + self.probe_e
        return site_output(self.dictionary, x, y)


@struct.dataclass
class NodeAblate(Intervention):
    """Keep the nodes where ``keep_f`` / ``keep_e`` are true and set the others to their means.

    ``keep_f`` ``[F]`` (every position) or ``[T, F]``; ``mean_f`` broadcastable to ``[B, T, F]``;
    ``keep_e`` ``[]`` or ``[T]``; ``mean_e`` broadcastable to ``[B, T, D]``.
    """

    dictionary: Any
    keep_f: jax.Array
    mean_f: jax.Array
    keep_e: jax.Array
    mean_e: jax.Array

    def validate(self, x, site):
        Splice(self.dictionary).validate(x, site)

    def apply(self, x):
        f, e = encode_nodes(self.dictionary, x)
        f = jnp.where(self.keep_f, f, self.mean_f)
        e = jnp.where(jnp.asarray(self.keep_e)[..., None], e, self.mean_e)
        return site_output(self.dictionary, x, self.dictionary.decode(f, site_input(self.dictionary, x)) + e)


def stop_gradient(x: jax.Array) -> jax.Array:
    """An intervention that leaves a site's value as it is and blocks gradients through it."""
    return jax.lax.stop_gradient(x)


def _is_stream(site: str) -> bool:
    layer, suffix = split_layer_site(site)
    return suffix in STREAM_SUFFIXES if layer is not None else site in STREAM_TOP


@dataclasses.dataclass(frozen=True)
class Sites:
    """An ordered set of spliced sites (model order) and their dictionaries.

    ``Sites.build(model, {site: SAE or Neurons})`` checks every name against ``model.sites`` and
    every dictionary's width against the site (one-line errors naming the valid choices).
    """

    names: tuple[str, ...]

    @staticmethod
    def build(model, dictionaries: Mapping[str, Any]) -> tuple["Sites", tuple]:
        """``(Sites, dictionaries in model order)``."""
        if not dictionaries:
            raise ValueError("a circuit needs at least one site with a dictionary (an SAE or Neurons)")
        for name in dictionaries:
            if any(c in name for c in "*?["):
                raise ValueError(f"circuit sites must be concrete site names, got the glob {name!r}")
            resolve_sites(name, model.sites)  # unknown names raise, naming close ones
        for name, d in dictionaries.items():
            if not (hasattr(d, "encode") and hasattr(d, "decode") and hasattr(d, "d_in")):
                raise TypeError(f"the dictionary for {name!r} must be an SAE (jaxinterp.sae) or circuits.Neurons, "
                                f"got {type(d).__name__}")
        names = tuple(s for s in model.sites if s in dictionaries)
        sites = Sites(names)
        dicts = tuple(dictionaries[s] for s in names)
        sites.check_widths(model, dicts)
        return sites, dicts

    def check_widths(self, model, dicts) -> None:
        from jaxinterp.grads import site_shapes

        shapes = site_shapes(model, jnp.zeros((1, 2), jnp.int32), list(self.names))
        for name, d in zip(self.names, dicts):
            Splice(d).validate(jnp.zeros(shapes[name].shape, shapes[name].dtype), name)

    def edge_pairs(self, with_y: bool = True) -> list[tuple[str, str, tuple[str, ...]]]:
        """``(upstream, downstream, sites strictly between)`` for every edge of the graph.

        Nodes of ``u`` feed nodes of a later ``d`` when no residual-stream site lies strictly
        between them (Marks et al.: resid_{l-1} -> attn_l, mlp_l, resid_l; attn_l -> mlp_l, resid_l;
        mlp_l -> resid_l); the sites in between get a stop-gradient, so an edge is a direct effect.
        ``"y"`` (the metric) follows every site.
        """
        order = list(self.names) + (["y"] if with_y else [])
        pairs = []
        for j, d in enumerate(order):
            for i in range(j - 1, -1, -1):
                u = order[i]
                between = tuple(order[i + 1:j])
                pairs.append((u, d, between))
                if _is_stream(u):
                    break  # sites before a stream site reach d only through it
        return pairs
