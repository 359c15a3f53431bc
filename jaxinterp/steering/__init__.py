"""Steering vectors (contrastive activation addition, Rimsky et al. 2024; Turner et al. 2023).

    v = ji.steering.mean_difference(model, positive, negative, "blocks.1.resid_post")
    out = ji.generate(model, prompts, max_new_tokens=8,
                      interventions={"blocks.1.resid_post": ji.Steer(v, scale=4.0, where="all")})

``mean_difference`` is the mean activation of a site over the positive examples minus its mean
over the negative ones, read at each example's last token (CAA reads the token that states the
behaviour, e.g. the answer) or averaged over its tokens.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.generate import prompt_batch
from jaxinterp.model import Model, run
from jaxinterp.sites import resolve_sites, split_layer_site

__all__ = ["mean_difference", "site_mean", "POSITIONS"]

POSITIONS = ("last", "mean")
_NOT_PER_POSITION = ("attn.scores", "attn.pattern")


def _check_site(model: Model, site: str) -> None:
    try:
        sites = resolve_sites(site, model.sites) if isinstance(site, str) else None
    except KeyError as err:  # UnknownSiteError: its message names close sites
        raise ValueError(err.args[0]) from None
    if sites != [site]:
        raise ValueError(f"site must be one site name of this model (not a glob), got {site!r}")
    if site.endswith(_NOT_PER_POSITION):
        raise ValueError(f"{site!r} is laid out [B, H, Tq, Tk]; steering vectors live at per-position sites "
                         f"such as blocks.0.resid_post")


@functools.partial(jax.jit, static_argnames=("site", "position", "stop_at"))
def _sum(model: Model, tokens, mask, site: str, position: str, stop_at: Optional[int]):
    acts = run(model, tokens, capture=site, attention_mask=mask, stop_at=stop_at).cache[site]  # [B, T, ...]
    acts = acts.astype(jnp.float32)
    if position == "last":  # left-padded: every row's last token is the last column
        return acts[:, -1].sum(0)
    weight = mask.reshape(mask.shape + (1,) * (acts.ndim - 2)).astype(jnp.float32)  # [B, T, 1...]
    return ((acts * weight).sum(1) / weight.sum(1)).sum(0)


def site_mean(model: Model, examples, site: str, *, position: str = "last", batch_size: int = 64) -> jax.Array:
    """Mean of ``site`` over ``examples`` (texts or token-id lists) at each one's last token
    (``position="last"``) or over its tokens (``"mean"``): one position's shape, float32."""
    _check_site(model, site)
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tokens, mask = prompt_batch(model, examples)
    layer, _ = split_layer_site(site)
    stop_at = None if layer is None or layer + 1 == model.config.n_layers else layer + 1
    total = sum(_sum(model, jnp.asarray(tokens[i:i + batch_size]), jnp.asarray(mask[i:i + batch_size]), site,
                     position, stop_at) for i in range(0, len(tokens), batch_size))
    return total / len(tokens)


def mean_difference(model: Model, positive: Sequence, negative: Sequence, site: str, *, position: str = "last",
                    batch_size: int = 64) -> jax.Array:
    """The contrastive steering vector ``mean(site | positive) - mean(site | negative)``.

    Args:
      model: any ``Model``.
      positive, negative: examples of the behaviour and of its absence: texts, or token-id lists
        (not necessarily paired, of any lengths).
      site: one per-position site (``blocks.{i}.resid_post``, ``blocks.{i}.attn.z``, ...).
      position: ``"last"`` (each example's last token) or ``"mean"`` (the mean over its tokens).

    Returns:
      float32 array of one position's shape (``[D]`` for the residual stream), for ``ji.Steer``.
    """
    for name, examples in (("positive", positive), ("negative", negative)):
        if isinstance(examples, str) or len(examples) == 0:
            raise ValueError(f"{name} must be a non-empty list of examples (texts or token-id lists)")
    return site_mean(model, positive, site, position=position, batch_size=batch_size) - \
        site_mean(model, negative, site, position=position, batch_size=batch_size)
