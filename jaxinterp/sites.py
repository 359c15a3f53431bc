"""Named intermediate activations ("sites") and the per-call context that taps them.

Every port calls ``sites(name, x)`` at each named intermediate. The context applies the
interventions registered for that name (in order), records the result if it was asked for, and
returns the (possibly modified) array. A context lives for exactly one traced call of a model:
nothing is stored on modules, so ``jit``/``vmap``/``grad`` see a pure function of (params,
tokens, intervention arrays).

Layers are stacked and run with ``scan``, so inside a block a site is named by its per-layer
suffix (``"attn.z"``) and the layer index may be a tracer. ``SiteContext.at_layer(i)`` gives the
block a ``LayerSites`` that

* applies an intervention registered for every layer (``"blocks.*.attn.z"``) unconditionally and
  one registered for some layers (``"blocks.3.attn.z"``) under ``lax.cond`` on the layer index (the
  predicate never depends on vmapped data, so under ``vmap`` it stays a branch, not a select);
* returns what is captured at any layer as the scan's stacked output, which ``finish_layers``
  splits back into ``blocks.{i}.<suffix>`` entries of the cache;
* adds LoRA side paths (``adapt``) from adapter weights stacked on a layer axis.

Public names never change: captures and interventions use ``blocks.{i}.<suffix>`` as before.

Axis vocabulary used across the project (parameters, activations and sharding rules):
``batch, seq, embed, heads, kv_heads, head_dim, mlp, vocab, layers, experts, latents, d_inner,
ssm_state, conv``. Activation layouts are documented per site in the ports.
"""

from __future__ import annotations

import collections.abc
import difflib
import fnmatch
import re
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["SiteContext", "LayerSites", "Cache", "resolve_sites", "close_matches", "UnknownSiteError",
           "apply_intervention", "split_layer_site"]

_LAYER_SITE = re.compile(r"^blocks\.(\d+)\.(.+)$")


class UnknownSiteError(KeyError):
    """A site name or glob that matches none of the model's sites."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
        return str(self.args[0])


def split_layer_site(name: str) -> tuple[Optional[int], str]:
    """``"blocks.3.attn.z"`` -> ``(3, "attn.z")``; a top-level site -> ``(None, name)``."""
    m = _LAYER_SITE.match(name)
    return (int(m.group(1)), m.group(2)) if m else (None, name)


def close_matches(name: str, sites: Sequence[str], n: int = 5) -> list[str]:
    """The valid site names closest to ``name`` (for error messages)."""
    # Compare against the per-layer "template" too, so "blocks.3.resid" suggests
    # "blocks.3.resid_pre/resid_mid/resid_post" rather than unrelated layers.
    matches = difflib.get_close_matches(name, sites, n=n, cutoff=0.5)
    if not matches:
        stem = re.sub(r"\d+", "*", name)
        matches = [s for s in sites if fnmatch.fnmatchcase(s, stem)][:n]
    return matches


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def resolve_sites(patterns: str | Iterable[str] | None, sites: Sequence[str]) -> list[str]:
    """Expand a site name, glob, list of them, or ``"all"`` to concrete site names.

    Order follows the model's site order; every pattern must match at least one site.
    """
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    elif not isinstance(patterns, (list, tuple, set, frozenset)):
        raise TypeError(f"capture must be a site name, a glob, a list of them, 'all' or None; "
                        f"got {type(patterns).__name__}")
    wanted: set[str] = set()
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"site patterns must be strings, got {type(pattern).__name__}: {pattern!r:.80}")
        if pattern == "all":
            wanted.update(sites)
            continue
        if _is_glob(pattern):
            hits = [s for s in sites if fnmatch.fnmatchcase(s, pattern)]
        else:
            hits = [pattern] if pattern in sites else []
        if not hits:
            suggestions = close_matches(pattern, sites)
            hint = f" Did you mean: {', '.join(suggestions)}?" if suggestions else ""
            raise UnknownSiteError(
                f"unknown site {pattern!r}: it matches none of this model's {len(sites)} sites.{hint}"
                f" (see model.sites for the full list)"
            )
        wanted.update(hits)
    return [s for s in sites if s in wanted]


def _as_list(value: Any) -> list[Any]:
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


@jax.tree_util.register_pytree_node_class
class Cache(collections.abc.Mapping):
    """The captured sites: a read-only mapping ``{site name: array}`` (a pytree).

    A site captured at every layer is kept as the scan produced it, stacked ``[L, ...]``, and
    ``cache["blocks.3.resid_post"]`` slices it on access: capturing everything costs one write per
    value, never a second copy per layer. ``cache.stacked(suffix)`` gives the stacked array itself.
    """

    def __init__(self, flat: Mapping[str, jax.Array], stacked: Mapping[str, jax.Array], order: Sequence[str]):
        self._flat, self._stacked, self._order = dict(flat), dict(stacked), tuple(order)

    def __getitem__(self, name: str) -> jax.Array:
        if name in self._flat:
            return self._flat[name]
        layer, suffix = split_layer_site(name)
        if suffix in self._stacked and layer is not None and name in self._names:
            stacked = self._stacked[suffix]
            if isinstance(stacked, jax.ShapeDtypeStruct):  # under jax.eval_shape
                return jax.ShapeDtypeStruct(stacked.shape[1:], stacked.dtype, sharding=None)
            return stacked[layer]
        raise KeyError(name)

    @property
    def _names(self) -> frozenset:
        return frozenset(self._order)

    def __iter__(self):
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, name) -> bool:
        return name in self._names

    def stacked(self, suffix: str) -> jax.Array:
        """``blocks.*.<suffix>`` as one ``[L, ...]`` array (when it was captured at every layer)."""
        if suffix in self._stacked:
            return self._stacked[suffix]
        return jnp.stack([self[n] for n in self._order if split_layer_site(n)[1] == suffix])

    def __repr__(self) -> str:
        return f"Cache({len(self)} sites: {', '.join(self._order[:4])}{' ...' if len(self) > 4 else ''})"

    def tree_flatten(self):
        return (self._flat, self._stacked), self._order

    @classmethod
    def tree_unflatten(cls, order, children):
        return cls(children[0], children[1], order)


class SiteContext:
    """Applies interventions and records captures for one forward call.

    Args:
      sites: every site name of the model (``model.sites``).
      capture: names/globs to record, ``"all"``, or None.
      interventions: mapping from site name or glob to an intervention, a plain callable
        ``x -> x``, or a list of them (applied in order). A site matched by several keys gets the
        interventions of every key, in the mapping's order.
      constrain: optional ``(site, x) -> x`` applied to every site value before and after its
        interventions (``jaxinterp.sharding`` passes activation sharding constraints).
      adapters: optional ``{projection: Adapter}`` side paths added to linear maps (LoRA).
    """

    def __init__(
        self,
        sites: Sequence[str],
        capture: str | Iterable[str] | None = None,
        interventions: Mapping[str, Any] | None = None,
        constrain: Callable[[str, jax.Array], jax.Array] | None = None,
        adapters: Mapping[str, Any] | None = None,
    ):
        self.sites = tuple(sites)
        self.constrain = constrain
        self.adapters = dict(adapters or {})
        self._site_set = frozenset(self.sites)
        self.capture = frozenset(resolve_sites(capture, self.sites))
        if interventions is not None and not isinstance(interventions, Mapping):
            raise TypeError(
                f"interventions must be a mapping {{site or glob: intervention}}, got {type(interventions).__name__}"
                f" (wrap a list as {{'<site>': [...]}})"
            )
        self.interventions: dict[str, list[Any]] = {}
        layers: dict[int, None] = {}
        for name in self.sites:
            layer, _ = split_layer_site(name)
            if layer is not None:
                layers[layer] = None
        self.n_layers = len(layers)
        # Per-layer view: suffix -> [(layers or None for all, item)] in mapping order.
        self._layer_items: dict[str, list[tuple[Optional[frozenset], Any]]] = {}
        for pattern, value in (interventions or {}).items():
            if not isinstance(pattern, str):
                raise TypeError(f"intervention keys must be site names or globs, got {type(pattern).__name__}")
            items = _as_list(value)
            for item in items:
                if not (hasattr(item, "apply") or callable(item)):
                    raise TypeError(
                        f"intervention for {pattern!r} must have an .apply(x) method or be callable, "
                        f"got {type(item).__name__}"
                    )
            by_suffix: dict[str, set[int]] = {}
            for name in resolve_sites(pattern, self.sites):
                self.interventions.setdefault(name, []).extend(items)
                layer, suffix = split_layer_site(name)
                if layer is not None:
                    by_suffix.setdefault(suffix, set()).add(layer)
            for suffix, hit in by_suffix.items():
                which = None if len(hit) == self.n_layers else frozenset(hit)
                self._layer_items.setdefault(suffix, []).extend((which, item) for item in items)
        self._layer_capture: dict[str, set[int]] = {}
        for name in self.capture:
            layer, suffix = split_layer_site(name)
            if layer is not None:
                self._layer_capture.setdefault(suffix, set()).add(layer)
        self.cache: dict[str, jax.Array] = {}
        self.stacked: dict[str, jax.Array] = {}
        self.visited: list[str] = []
        self._layer_order: list[str] = []

    # top-level sites ------------------------------------------------------------------
    def wants(self, name: str) -> bool:
        """True if ``name`` is captured or intervened on (ports use it to skip optional work)."""
        return name in self.capture or name in self.interventions

    def __call__(self, name: str, x: jax.Array) -> jax.Array:
        if name not in self._site_set:  # a port bug, not a user error
            raise AssertionError(f"port emitted site {name!r} that is not in model.sites")
        self.visited.append(name)
        if self.constrain is not None:
            x = self.constrain(name, x)
        for item in self.interventions.get(name, ()):
            x = apply_intervention(item, x, name)
        if self.constrain is not None and name in self.interventions:
            x = self.constrain(name, x)
        if name in self.capture:
            self.cache[name] = x
        return x

    # layers ---------------------------------------------------------------------------
    def wants_layer(self, suffix: str) -> bool:
        """True if ``blocks.{i}.<suffix>`` is captured or intervened on at any layer."""
        return suffix in self._layer_capture or suffix in self._layer_items

    def layer_items(self, suffix: str) -> list[tuple[Optional[frozenset], Any]]:
        return self._layer_items.get(suffix, [])

    def captured_suffixes(self) -> frozenset:
        return frozenset(self._layer_capture)

    def at_layer(self, layer) -> "LayerSites":
        """The ``sites`` object a block uses at ``layer`` (an int, or a tracer inside ``scan``)."""
        self._layer_order = []
        return LayerSites(self, layer, self._layer_order)

    def finish_layers(self, stacked: Mapping[str, jax.Array], n_run: Optional[int] = None) -> None:
        """Record the scan's stacked captures ``{suffix: [L, ...]}`` as ``blocks.{i}.<suffix>``
        (``n_run``: layers that ran, when a call stops early)."""
        n_run = self.n_layers if n_run is None else n_run
        for i in range(n_run):
            self.visited.extend(f"blocks.{i}.{s}" for s in self._layer_order)
        for suffix, layers in self._layer_capture.items():
            if len(layers) == n_run == self.n_layers:
                self.stacked[suffix] = stacked[suffix]  # every layer: kept stacked, sliced on access
                continue
            for i in sorted(layers):
                self.cache[f"blocks.{i}.{suffix}"] = stacked[suffix][i]

    def result(self) -> Cache:
        """The captures as a ``Cache`` (names in the model's site order)."""
        have = set(self.cache) | {f"blocks.{i}.{s}" for s in self.stacked for i in range(self.n_layers)}
        return Cache(self.cache, self.stacked, [s for s in self.sites if s in have])


class LayerSites:
    """``sites`` inside one block: ``sites("attn.z", x)`` taps ``blocks.{layer}.attn.z``."""

    def __init__(self, ctx: SiteContext, layer, order: list[str]):
        self.ctx = ctx
        self.layer = layer
        self.static = isinstance(layer, (int, np.integer))
        self.captured: dict[str, jax.Array] = {}
        self._order = order

    def _name(self, suffix: str) -> str:
        return f"blocks.{self.layer if self.static else '*'}.{suffix}"

    def wants(self, suffix: str) -> bool:
        if self.static:
            name = f"blocks.{self.layer}.{suffix}"
            return self.ctx.wants(name)
        return self.ctx.wants_layer(suffix)

    def __call__(self, suffix: str, x: jax.Array) -> jax.Array:
        name = self._name(suffix)
        if self.static and name not in self.ctx._site_set:
            raise AssertionError(f"port emitted site {name!r} that is not in model.sites")
        self._order.append(suffix)
        constrain = self.ctx.constrain
        items = self.ctx.layer_items(suffix)
        if constrain is not None:
            x = constrain(name, x)
        for layers, item in items:
            per_layer = getattr(item, "at_layer", None)  # ji.ByLayer: leaves stacked on a layer axis
            if per_layer is not None:
                item = per_layer(self.layer)
            if layers is None:
                x = apply_intervention(item, x, name)
            elif self.static:
                if self.layer in layers:
                    x = apply_intervention(item, x, name)
            else:
                member = np.zeros(self.ctx.n_layers, bool)
                member[sorted(layers)] = True
                where = _layers_name(layers, suffix)  # error messages name the layers the item acts on
                x = jax.lax.cond(jnp.asarray(member)[self.layer],
                                 lambda v, item=item, where=where: apply_intervention(item, v, where), lambda v: v, x)
        if constrain is not None and items:
            x = constrain(name, x)
        if suffix in self.ctx._layer_capture:
            self.captured[suffix] = x
        return x

    def adapt(self, projection: str, x: jax.Array, y: jax.Array) -> jax.Array:
        """``y`` plus the adapter side path of ``projection`` at this layer (LoRA), if any."""
        adapter = self.ctx.adapters.get(projection)
        if adapter is None:
            return y
        return y + adapter(x, self.layer).astype(y.dtype)


def _layers_name(layers: frozenset, suffix: str) -> str:
    """``blocks.3.attn.z`` for one layer, ``blocks.{1,4}.attn.z`` for several."""
    ids = sorted(layers)
    return f"blocks.{ids[0]}.{suffix}" if len(ids) == 1 else f"blocks.{{{','.join(map(str, ids))}}}.{suffix}"


def apply_intervention(item: Any, x: jax.Array, site: str) -> jax.Array:
    """Validate and apply one intervention (object with ``apply`` or a callable)."""
    validate = getattr(item, "validate", None)
    if validate is not None:
        validate(x, site)
    fn: Callable[[jax.Array], jax.Array] = item.apply if hasattr(item, "apply") else item
    y = fn(x)
    if not hasattr(y, "shape") or tuple(y.shape) != tuple(x.shape):
        raise ValueError(
            f"intervention {type(item).__name__} at site {site!r} returned shape "
            f"{getattr(y, 'shape', type(y).__name__)}, expected the site's shape {tuple(x.shape)}"
        )
    if y.dtype != x.dtype:
        raise TypeError(
            f"intervention {type(item).__name__} at site {site!r} returned dtype {y.dtype}, "
            f"expected the site's dtype {x.dtype}"
        )
    return y
