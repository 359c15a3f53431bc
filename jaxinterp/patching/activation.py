"""Activation patching and attribution patching with one API.

* ``activation_patching``: for every cell (a position, a head at a position, or the whole
  site) of each site, run the corrupted input with the clean activation patched in and read
  ``metric``; one compiled program (``lax.map`` over cell masks per site).
* ``attribution_patching``: the first-order estimate of the same numbers,
  ``metric(corrupt) + sum grad * (clean - corrupt)`` over the cell, for every cell of every
  site from one corrupted forward + one backward (gradients with respect to zero ``Add``
  interventions, ``jaxinterp.grads.site_grads``) and one clean forward.

``metric`` maps the last-position logits ``[B, V]`` to a scalar (e.g. a mean logit
difference); with an ``attention_mask`` (padded prompts of different lengths) the last position
is each row's last real token. Granularity ``per``: ``"position"`` (sites laid out
``[B, T, ...]``), ``"head"`` (``[B, T, H, Dh]`` sites: ``attn.q/k/v/z``, ``mixer.heads``) or ``"site"``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.grads import site_grads
from jaxinterp.interventions import Patch
from jaxinterp.model import Model, run
from jaxinterp.sharding.axes import site_axes
from jaxinterp.sites import resolve_sites

__all__ = ["PatchingResult", "activation_patching", "attribution_patching", "PER"]

PER = ("position", "head", "site")
_QK_LAYOUT = (".scores", ".pattern")  # [B, H, Tq, Tk]: only whole-site patching
# Sites patched per head: laid out [B, T, H, Dh] (attention q/k/v/z, an SSD mixer's per-head output).
_HEAD_LAYOUTS = (("batch", "seq", "heads", "head_dim"), ("batch", "seq", "kv_heads", "head_dim"))


@dataclasses.dataclass(frozen=True)
class PatchingResult:
    """``effects[site]``: metric with the clean value patched in per cell (``[T]``, ``[T, H]`` or ``[]``)."""

    effects: dict
    clean: float
    corrupt: float
    per: str

    def normalized(self) -> dict:
        """(effect - corrupt) / (clean - corrupt): 0 = no recovery, 1 = full recovery."""
        denom = self.clean - self.corrupt
        return {k: (np.asarray(v) - self.corrupt) / denom for k, v in self.effects.items()}


def _check(model: Model, sites, per: str) -> list[str]:
    if per not in PER:
        raise ValueError(f"per must be one of {PER}, got {per!r}")
    names = resolve_sites(sites, model.sites)
    for n in names:
        if per != "site" and n.endswith(_QK_LAYOUT):
            raise ValueError(f"site {n!r} is laid out [B, H, Tq, Tk]; patch it with per='site'")
        if per == "head" and site_axes(n) not in _HEAD_LAYOUTS:
            raise ValueError(f"per='head' needs a [B, T, H, Dh] site (attn.q/k/v/z, mixer.heads), got {n!r}")
    return names


def _cell_masks(shape: tuple, per: str) -> np.ndarray:
    """Masks ``[C, 1, T(, H)]`` selecting one cell each (``[1]`` with per='site')."""
    if per == "site":
        return np.ones((1, 1), bool)
    if per == "position":
        return np.eye(shape[1], dtype=bool)[:, None, :]
    t, h = shape[1], shape[2]
    return np.eye(t * h, dtype=bool).reshape(t * h, 1, t, h)


def _last_real(mask, shape) -> jax.Array:
    """Each row's last real position (``[B]``); the last position when there is no mask."""
    if mask is None:
        return jnp.full(shape[:1], shape[1] - 1, jnp.int32)
    return jnp.max(jnp.where(mask, jnp.arange(shape[1]), -1), axis=1).astype(jnp.int32)


def _last_logits(model, tokens, interventions, mask):
    return run(model, tokens, interventions=interventions, attention_mask=mask,
               logits_at=_last_real(mask, tokens.shape)).logits  # [B, V]


@functools.partial(jax.jit, static_argnames=("names", "metric", "per", "chunk"))
def _activation_jit(model, clean_tokens, corrupt_tokens, corrupt_ivs, metric_args, mask, *, names, metric, per,
                    chunk):
    clean = run(model, clean_tokens, capture=list(names), attention_mask=mask,
                logits_at=_last_real(mask, clean_tokens.shape))
    corrupt_ivs = dict(corrupt_ivs)
    m_clean = metric(clean.logits, *metric_args)
    m_corrupt = metric(_last_logits(model, corrupt_tokens, corrupt_ivs, mask), *metric_args)
    effects = {}
    for name in names:
        value = clean.cache[name]
        masks = jnp.asarray(_cell_masks(value.shape, per))

        def one(cell, name=name, value=value):
            ivs = {**corrupt_ivs, name: [*_as_list(corrupt_ivs.get(name)), Patch(value, mask=cell)]}
            return metric(_last_logits(model, corrupt_tokens, ivs, mask), *metric_args)

        out = jax.lax.map(one, masks, batch_size=chunk)
        effects[name] = out.reshape(value.shape[1:3]) if per == "head" else (out[0] if per == "site" else out)
    return effects, m_clean, m_corrupt


def _as_list(v) -> list:
    if v is None:
        return []
    return list(v) if isinstance(v, (list, tuple)) else [v]


def activation_patching(model: Model, clean_tokens, corrupt_tokens, sites, metric: Callable[[jax.Array], jax.Array],
                        *, per: str = "position", corrupt_interventions: Optional[Mapping[str, Any]] = None,
                        metric_args: tuple = (), chunk: int = 16, attention_mask=None) -> PatchingResult:
    """Clean -> corrupted interchange at every cell of every site (one compiled program).

    Args:
      clean_tokens, corrupt_tokens: ``[B, T]`` (the same shape).
      sites: names or globs (e.g. ``"blocks.*.resid_pre"``, ``"blocks.3.attn.z"``).
      metric: ``logits [B, V] at the last position -> scalar``; pass a module-level
        function (it is a static argument of the compiled program).
      per: ``"position"``, ``"head"`` or ``"site"``.
      corrupt_interventions: applied to the corrupted run (e.g. noise on ``embed``); keys
        must be concrete site names.
      metric_args: arrays passed to ``metric`` after the logits (e.g. per-row answer ids),
        traced inputs, so changing them does not recompile.
      attention_mask: ``[B, T]`` for padded prompts (both runs share it); the metric reads each row's
        last real token.
    """
    names = tuple(_check(model, sites, per))
    clean_tokens, corrupt_tokens = jnp.asarray(clean_tokens), jnp.asarray(corrupt_tokens)
    if clean_tokens.shape != corrupt_tokens.shape:
        raise ValueError(f"clean and corrupted tokens must have the same shape, got {clean_tokens.shape} and "
                         f"{corrupt_tokens.shape}")
    mask = None if attention_mask is None else jnp.asarray(attention_mask, bool)
    effects, m_clean, m_corrupt = _activation_jit(model, clean_tokens, corrupt_tokens, dict(corrupt_interventions or {}),
                                                  tuple(metric_args), mask, names=names, metric=metric, per=per,
                                                  chunk=chunk)
    return PatchingResult({k: np.asarray(v) for k, v in effects.items()}, float(m_clean), float(m_corrupt), per)


def _reduce_cells(x: jax.Array, per: str) -> jax.Array:
    """Sum an elementwise product ``[B, T, ...]`` into cells."""
    if per == "site":
        return x.sum()
    if per == "position":
        return x.sum(axis=tuple(i for i in range(x.ndim) if i != 1))
    return x.sum(axis=(0, 3))  # [T, H]


@functools.partial(jax.jit, static_argnames=("names", "metric", "per"))
def _attribution_jit(model, clean_tokens, corrupt_tokens, corrupt_ivs, metric_args, mask, *, names, metric, per):
    last = _last_real(mask, clean_tokens.shape)
    clean = run(model, clean_tokens, capture=list(names), attention_mask=mask, logits_at=last)
    m_clean = metric(clean.logits, *metric_args)
    value, acts, grads = site_grads(model, corrupt_tokens, list(names), lambda out: metric(out.logits, *metric_args),
                                    interventions=dict(corrupt_ivs), attention_mask=mask, logits_at=last)
    effects = {n: value + _reduce_cells(grads[n] * (clean.cache[n] - acts[n]), per) for n in names}
    return effects, m_clean, value


def attribution_patching(model: Model, clean_tokens, corrupt_tokens, sites, metric: Callable[[jax.Array], jax.Array],
                         *, per: str = "position", corrupt_interventions: Optional[Mapping[str, Any]] = None,
                         metric_args: tuple = (), attention_mask=None) -> PatchingResult:
    """First-order (gradient x activation difference) estimate of ``activation_patching``.

    Same arguments and result layout; one clean forward, one corrupted forward + backward.
    """
    names = tuple(_check(model, sites, per))
    mask = None if attention_mask is None else jnp.asarray(attention_mask, bool)
    effects, m_clean, m_corrupt = _attribution_jit(model, jnp.asarray(clean_tokens), jnp.asarray(corrupt_tokens),
                                                   dict(corrupt_interventions or {}), tuple(metric_args), mask,
                                                   names=names, metric=metric, per=per)
    return PatchingResult({k: np.asarray(v) for k, v in effects.items()}, float(m_clean), float(m_corrupt), per)
