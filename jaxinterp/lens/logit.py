"""The logit lens: read every layer's residual stream through the model's own head.

``logit_lens(model, tokens, layers)`` applies the family's final norm and unembedding
(``Family.stepper.head``) to ``blocks.{i}.resid_post`` of each requested layer (nostalgebraist, 2020).
The last layer's lens is the model's own output; earlier layers show what the residual stream
would predict if the network stopped there. ``kl_to_final`` scores a lens by the KL divergence
from the model's final distribution (Belrose et al., 2023, "Eliciting latent predictions from
transformers with the tuned lens").
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.families import get_family
from jaxinterp.model import Model, prepare_inputs, run
from jaxinterp.sites import resolve_sites

__all__ = ["residual_sites", "capture_residuals", "apply_head", "logit_lens", "kl_to_final", "gather",
           "jit_when_arrays", "prepare"]


def residual_sites(model: Model, layers: Optional[Sequence[int]] = None, *, embed: bool = False) -> tuple[str, ...]:
    """``blocks.{i}.resid_post`` for ``layers`` (default: every layer), ``embed`` first when asked.

    Negative layers count from the end; an out-of-range layer is refused naming the valid range.
    """
    n = model.config.n_layers
    layers = range(n) if layers is None else layers
    out = ["embed"] if embed else []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not -n <= layer < n:
            raise ValueError(f"layers must be ints in [{-n}, {n}) for a {n}-layer model, got {layer!r}")
        out.append(f"blocks.{layer % n}.resid_post")
    return tuple(out)


def gather(x: jax.Array, at: Optional[jax.Array]) -> jax.Array:
    """``x [B, T, ...]`` at prepared positions ``at`` (None: all, ``[B]``: one per row, ``[B, P]``)."""
    if at is None:
        return x
    idx = at if at.ndim == 2 else at[:, None]  # [B, 1 or P]
    out = jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)  # [B, 1 or P, ...]
    return out[:, 0] if at.ndim == 1 else out


def jit_when_arrays(fn: Callable, static_argnames: Sequence[str] = ()) -> Callable:
    """``fn(model, ..., interventions=..., **static)`` compiled as one program (``jax.jit``) when the
    interventions are arrays only (pytrees of arrays, or None); run eagerly when they hold plain Python
    callables, which ``jit`` cannot take as inputs."""
    compiled = jax.jit(fn, static_argnames=tuple(static_argnames))

    @functools.wraps(fn)
    def call(*args, interventions=None, **kw):
        leaves = jax.tree_util.tree_leaves(interventions)
        arrays = all(isinstance(x, (jax.Array, np.ndarray)) for x in leaves)
        return (compiled if arrays else fn)(*args, interventions=interventions, **kw)

    return call


def _residuals(model: Model, tokens, mask, positions, at, *, interventions, sites: tuple[str, ...]):
    out = run(model, tokens, capture=list(sites), interventions=interventions, attention_mask=mask,
              positions=positions, logits_at=at)
    resid = jnp.stack([gather(out.cache[s], at) for s in sites])  # [n, B, (P|T), D]
    return resid, out.logits


def _lens(model: Model, tokens, mask, positions, at, *, interventions, sites: tuple[str, ...]):
    return apply_head(model, _residuals(model, tokens, mask, positions, at, interventions=interventions,
                                        sites=sites)[0])


_residuals_program = jit_when_arrays(_residuals, ("sites",))
_lens_program = jit_when_arrays(_lens, ("sites",))


def prepare(model: Model, tokens, sites: Sequence[str], attention_mask=None, positions=None, logits_at=None):
    """``ji.run``'s input checks, and ``sites`` checked against the model's (closest names on a miss)."""
    bad = [s for s in sites if s not in model.sites]
    if bad:
        resolve_sites(bad, model.sites)  # raises, naming the closest sites
    return prepare_inputs(model, tokens, attention_mask, positions, logits_at)


def capture_residuals(model: Model, tokens, sites: Sequence[str], *, attention_mask=None, positions=None,
                      logits_at=None, interventions=None) -> tuple[jax.Array, jax.Array]:
    """``(residuals [n, B, (P|T), D], final logits [B, (P|T), V])`` of one forward pass (one compiled
    program). Residuals are taken at the same positions as the logits (``logits_at`` as in ``ji.run``)."""
    inputs = prepare(model, tokens, sites, attention_mask, positions, logits_at)
    return _residuals_program(model, *inputs, interventions=interventions, sites=tuple(sites))


def apply_head(model: Model, x: jax.Array) -> jax.Array:
    """The family's final norm + unembedding of ``x [..., D]`` -> logits ``[..., V]``."""
    stepper = get_family(model.family).stepper
    if stepper is None:
        raise ValueError(f"model family {model.family!r} declares no stepper, so its head cannot be applied alone")
    return stepper.head(model, x)


def logit_lens(model: Model, tokens, layers: Optional[Sequence[int]] = None, *, embed: bool = False,
               attention_mask=None, positions=None, logits_at=None, interventions=None) -> jax.Array:
    """Logit-lens logits ``[n_layers, B, T, V]`` (``[n, B, V]`` / ``[n, B, P, V]`` with ``logits_at``).

    Row ``j`` is the head applied to ``blocks.{layers[j]}.resid_post`` (``embed`` first when
    ``embed=True``); ``layers`` default to every layer, so the last row equals the model's logits.
    Inputs are those of ``ji.run`` (token ids or text, mask, positions, ``logits_at``, interventions).
    """
    sites = residual_sites(model, layers, embed=embed)
    inputs = prepare(model, tokens, sites, attention_mask, positions, logits_at)
    return _lens_program(model, *inputs, interventions=interventions, sites=sites)


def kl_to_final(lens_logits: jax.Array, final_logits: jax.Array) -> jax.Array:
    """``KL(p_final || p_lens)`` in nats, per lens row and position: ``[n, ...]`` from ``[n, ..., V]``
    and ``[..., V]``."""
    log_p = jax.nn.log_softmax(final_logits.astype(jnp.float32), axis=-1)
    log_q = jax.nn.log_softmax(lens_logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
