"""Gradients with respect to named activations.

``site_grads`` differentiates a scalar metric of the model's output with respect to the
activations at any set of sites, in one forward and one backward pass: it adds a zero
``Add`` intervention at each site and differentiates with respect to those zeros (the
derivative of ``f(x + v)`` in ``v`` at 0 is the derivative in ``x``). Attribution patching,
integrated gradients and saliency build on it.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from jaxinterp.interventions import Add
from jaxinterp.model import Model, RunOutput, run
from jaxinterp.sites import resolve_sites

__all__ = ["site_grads", "site_shapes"]


def site_shapes(model: Model, tokens, sites, **run_kw) -> dict[str, jax.ShapeDtypeStruct]:
    """Shapes/dtypes of the given sites for ``tokens`` (no FLOPs spent)."""
    names = resolve_sites(sites, model.sites)
    out = jax.eval_shape(lambda m, t: run(m, t, capture=names, **run_kw).cache, model, jnp.asarray(tokens))
    return dict(out)


def site_grads(
    model: Model,
    tokens,
    sites,
    metric: Callable[[RunOutput], jax.Array],
    interventions: Mapping[str, Any] | None = None,
    **run_kw,
) -> tuple[jax.Array, dict[str, jax.Array], dict[str, jax.Array]]:
    """Value of ``metric(run(...))``, the activations at ``sites``, and d metric / d activation.

    Args:
      model, tokens: as for ``run``.
      sites: names or globs of the sites to differentiate at.
      metric: ``RunOutput -> scalar``.
      interventions: applied as usual (before the zero probes at the same site).
      run_kw: further ``run`` arguments (``attention_mask``, ``logits_at``, ...).

    Returns:
      ``(value, activations, grads)`` with ``activations[s]`` and ``grads[s]`` of the site's shape.
    """
    tokens = jnp.asarray(tokens)
    names = resolve_sites(sites, model.sites)
    shapes = site_shapes(model, tokens, names, **run_kw)
    probes = {n: jnp.zeros(s.shape, s.dtype) for n, s in shapes.items()}

    def f(probes):
        merged: dict[str, list] = {}
        for pattern, value in (interventions or {}).items():
            for name in resolve_sites(pattern, model.sites):
                merged.setdefault(name, []).extend(value if isinstance(value, (list, tuple)) else [value])
        for name, p in probes.items():
            merged.setdefault(name, []).append(Add(p))
        out = run(model, tokens, capture=names, interventions=merged, **run_kw)
        return metric(out), out.cache

    (value, cache), grads = jax.value_and_grad(f, has_aux=True)(probes)
    return value, cache, grads
