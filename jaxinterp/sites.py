"""Named intermediate activations ("sites") and the per-call context that taps them.

Every port calls ``sites(name, x)`` at each named intermediate. The context applies the
interventions registered for that name (in order), records the result if it was asked
for, and returns the (possibly modified) array. A context lives for exactly one traced
call of a model: nothing is stored on modules, so ``jit``/``vmap``/``grad`` see a pure
function of (params, tokens, intervention arrays).

Axis vocabulary used across the project (parameters, activations and sharding rules):
``batch, seq, embed, heads, kv_heads, head_dim, mlp, vocab, layers, latents, d_inner,
ssm_state, conv``. Activation layouts are documented per site in the ports.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax

__all__ = ["SiteContext", "resolve_sites", "close_matches", "UnknownSiteError"]


class UnknownSiteError(KeyError):
    """A site name or glob that matches none of the model's sites."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
        return str(self.args[0])


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
    wanted: set[str] = set()
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"site patterns must be strings, got {type(pattern).__name__}: {pattern!r}")
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


class SiteContext:
    """Applies interventions and records captures for one forward call.

    Args:
      sites: every site name of the model (``model.sites``).
      capture: names/globs to record, ``"all"``, or None.
      interventions: mapping from site name or glob to an intervention, a plain callable
        ``x -> x``, or a list of them (applied in order). A site matched by several keys
        gets the interventions of every key, in the mapping's order.
      constrain: optional ``(site, x) -> x`` applied to every site value before and after
        its interventions (``jaxinterp.sharding`` passes activation sharding constraints).
    """

    def __init__(
        self,
        sites: Sequence[str],
        capture: str | Iterable[str] | None = None,
        interventions: Mapping[str, Any] | None = None,
        constrain: Callable[[str, jax.Array], jax.Array] | None = None,
    ):
        self.sites = tuple(sites)
        self.constrain = constrain  # optional (site, x) -> x, e.g. a sharding constraint
        self._site_set = frozenset(self.sites)
        self.capture = frozenset(resolve_sites(capture, self.sites))
        self.interventions: dict[str, list[Any]] = {}
        for pattern, value in (interventions or {}).items():
            items = _as_list(value)
            for item in items:
                if not (hasattr(item, "apply") or callable(item)):
                    raise TypeError(
                        f"intervention for {pattern!r} must have an .apply(x) method or be callable, "
                        f"got {type(item).__name__}"
                    )
            for name in resolve_sites(pattern, self.sites):
                self.interventions.setdefault(name, []).extend(items)
        self.cache: dict[str, jax.Array] = {}
        self.visited: list[str] = []

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
