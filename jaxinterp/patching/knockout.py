"""Attention knockout, its Mamba analogue, and Mamba path blocking.

* ``attention_knockout`` (Geva et al. 2023, as used with ROME): block the attention edges
  from a set of source positions to the last token in a window of layers (scores set to the
  dtype's minimum on ``blocks.{l}.attn.scores``), for every window centre; read the
  probability of the answer.
* ``mean_ablation_knockout`` (Sen Sharma et al. 2024, Mamba): mean-ablate a site (default
  ``mixer.in_x``, the SSM-path input) at the source positions in a window of layers, other
  positions clean.
* ``path_blocking``: restore the residual at ``(t, l)`` while a path (``mixer.ssm_out``,
  ``mixer.gate`` or ``mixer_out``) at ``t`` in later layers stays corrupted; the severed
  causal trace with that path frozen.

Each sweep over window centres is one compiled program (``lax.map`` over layer masks).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.interventions import ByLayer, MeanAblate, Patch
from jaxinterp.model import Model, run
from jaxinterp.patching.causal_trace import TraceConfig, TraceResult, layer_window, trace

__all__ = ["KnockoutResult", "attention_knockout", "mean_ablation_knockout", "path_blocking", "site_means"]


@dataclasses.dataclass(frozen=True)
class KnockoutResult:
    """``probs [L]``: answer probability with the window centred on each layer; ``p_base`` without."""

    probs: np.ndarray
    p_base: float
    answer: np.ndarray
    sources: tuple[int, ...]
    window: int

    @property
    def relative_change(self) -> np.ndarray:
        """(p - p_base) / p_base per window centre (the papers' plotted quantity)."""
        return (self.probs - self.p_base) / self.p_base

    def to_dict(self) -> dict:
        return {"probs": self.probs.tolist(), "p_base": self.p_base, "sources": list(self.sources),
                "window": self.window, "relative_change": self.relative_change.tolist()}


def _window_masks(n_layers: int, window: int) -> np.ndarray:
    """``[L centres, L layers]``: layer j is knocked out when centred at c."""
    masks = np.zeros((n_layers, n_layers), bool)
    for c in range(n_layers):
        masks[c, list(layer_window(c, window, n_layers))] = True
    return masks


def _positions(sources: Sequence[int], seq: int) -> np.ndarray:
    src = np.atleast_1d(np.asarray(sources, np.int64))
    if src.size == 0 or np.any((src < -seq) | (src >= seq)):
        raise ValueError(f"source positions {src.tolist()} must be non-empty and lie in [-{seq}, {seq})")
    return np.unique(src % seq)


def _answers(logits_last, answer):
    top = jnp.argmax(logits_last, axis=-1)  # [B]
    return jnp.where(answer < 0, top, answer)


def _prob(logits_last, answers):
    p = jax.nn.softmax(logits_last.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(p, answers[:, None], axis=1).mean()


@functools.partial(jax.jit, static_argnames=("chunk",))
def _attention_jit(model, tokens, answer, edge_mask, layer_masks, *, chunk):
    base = run(model, tokens, logits_at=-1).logits  # [B, V]
    answers = _answers(base, answer)
    n_layers = model.config.n_layers
    blocked = jnp.full((n_layers,), jnp.finfo(jnp.float32).min, jnp.float32)

    def one(layers):  # layers [L] bool
        mask = edge_mask[None] & layers.reshape((n_layers,) + (1,) * edge_mask.ndim)  # [L, 1, 1, Tq, Tk]
        ivs = {"blocks.*.attn.scores": ByLayer(Patch(blocked, mask=mask))}
        return _prob(run(model, tokens, interventions=ivs, logits_at=-1).logits, answers)

    return jax.lax.map(one, layer_masks, batch_size=chunk), _prob(base, answers), answers


def attention_knockout(model: Model, tokens, sources: Sequence[int], *, window: int = 10, target: int = -1,
                       answer=None, chunk: int = 8) -> KnockoutResult:
    """Block attention from ``sources`` to ``target`` (default the last token) in a window of layers.

    Args:
      tokens: ``[B, T]`` prompts (same source positions in each).
      answer: token id(s) ``[B]`` whose probability is read (default: the unblocked top token).
    """
    tokens = jnp.asarray(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if "blocks.0.attn.scores" not in model.sites:
        raise ValueError(f"attention_knockout needs attention sites (blocks.{{l}}.attn.scores); a {model.family} "
                         f"model has none: use mean_ablation_knockout")
    seq, n_layers = tokens.shape[1], model.config.n_layers
    src = _positions(sources, seq)
    edge = np.zeros((1, 1, seq, seq), bool)  # [B, H, Tq, Tk]
    edge[0, 0, target % seq, src] = True
    ans = jnp.full((tokens.shape[0],), -1, jnp.int32) if answer is None \
        else jnp.broadcast_to(jnp.asarray(answer, jnp.int32), (tokens.shape[0],))
    probs, p_base, answers = _attention_jit(model, tokens, ans, jnp.asarray(edge),
                                            jnp.asarray(_window_masks(n_layers, window)), chunk=chunk)
    return KnockoutResult(np.asarray(probs), float(p_base), np.asarray(answers), tuple(src.tolist()), window)


def site_means(model: Model, tokens, site: str) -> jax.Array:
    """Per-layer mean of ``blocks.{l}.<site>`` over batch and positions: ``[L, ...]``."""
    cache = run(model, jnp.asarray(tokens), capture=f"blocks.*.{site}").cache
    return jnp.stack([cache[f"blocks.{j}.{site}"].mean(axis=(0, 1)) for j in range(model.config.n_layers)])


@functools.partial(jax.jit, static_argnames=("site", "chunk"))
def _mean_jit(model, tokens, answer, pos_mask, means, layer_masks, *, site, chunk):
    base = run(model, tokens, logits_at=-1).logits  # [B, V]
    answers = _answers(base, answer)
    n_layers = model.config.n_layers

    def one(layers):
        mask = pos_mask[None] & layers.reshape((n_layers,) + (1,) * pos_mask.ndim)  # [L, 1, T]
        ivs = {f"blocks.*.{site}": ByLayer(MeanAblate(means, mask=mask))}
        return _prob(run(model, tokens, interventions=ivs, logits_at=-1).logits, answers)

    return jax.lax.map(one, layer_masks, batch_size=chunk), _prob(base, answers), answers


def mean_ablation_knockout(model: Model, tokens, sources: Sequence[int], *, site: str = "mixer.in_x",
                           means=None, window: int = 10, answer=None, chunk: int = 8) -> KnockoutResult:
    """Mean-ablate ``blocks.{l}.<site>`` at ``sources`` in a window of layers, per window centre.

    ``means`` ``[L, ...]`` (default ``site_means`` over ``tokens`` themselves; pass means over a
    dataset to follow the paper).
    """
    tokens = jnp.asarray(tokens)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if f"blocks.0.{site}" not in model.sites:
        valid = sorted({s.split(".", 2)[2] for s in model.sites if s.startswith("blocks.0.")})
        raise ValueError(f"unknown site {site!r} for a {model.family} model; valid: {valid}")
    seq, n_layers = tokens.shape[1], model.config.n_layers
    src = _positions(sources, seq)
    pos = np.zeros((1, seq), bool)
    pos[0, src] = True
    means = site_means(model, tokens, site) if means is None else jnp.asarray(means)
    ans = jnp.full((tokens.shape[0],), -1, jnp.int32) if answer is None \
        else jnp.broadcast_to(jnp.asarray(answer, jnp.int32), (tokens.shape[0],))
    probs, p_base, answers = _mean_jit(model, tokens, ans, jnp.asarray(pos), means,
                                       jnp.asarray(_window_masks(n_layers, window)), site=site, chunk=chunk)
    return KnockoutResult(np.asarray(probs), float(p_base), np.asarray(answers), tuple(src.tolist()), window)


def path_blocking(model: Model, tokens, subject: Sequence[int], *, path: str = "mixer.ssm_out",
                  config: TraceConfig = TraceConfig(), **corruption) -> TraceResult:
    """Residual restoration at every ``(t, l)`` with ``path`` at ``t`` frozen corrupted in later layers.

    ``corruption``: ``sigma=`` (with optional ``noise=``) or ``alt_subjects=``, as ``trace``.
    """
    return trace(model, tokens, subject, kind="resid_post", freeze=path, config=config, **corruption)
