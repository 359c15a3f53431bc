"""What the views show, computed in one forward pass: attention patterns and logit-lens top-k."""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.families import get_family
from jaxinterp.lens.logit import apply_head, residual_sites
from jaxinterp.model import Model, run

__all__ = ["ViewData", "view_data", "single_sequence", "token_labels"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ViewData:
    """One sequence's views: ``tokens [T]`` ids, ``labels`` their strings, ``patterns [L, H, T, T]``
    (None without attention), ``lens_sites`` (``embed`` + each layer's ``resid_post``), ``lens_ids`` /
    ``lens_probs [n, T, k]`` the logit lens's top-k predictions, ``vocab`` a string per predicted id."""

    tokens: np.ndarray
    labels: list[str]
    patterns: Optional[np.ndarray]
    lens_sites: tuple[str, ...]
    lens_ids: np.ndarray
    lens_probs: np.ndarray
    vocab: dict[int, str]


def single_sequence(model: Model, tokens) -> np.ndarray:
    """``[T]`` token ids from a string, 1-D ids or a ``[1, T]`` array (views show one sequence)."""
    if isinstance(tokens, str):
        ids, mask = model.to_tokens(tokens)
        return np.asarray(ids)[0][np.asarray(mask)[0]]
    ids = np.asarray(tokens)
    if ids.ndim == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise ValueError(f"views show one sequence: pass a string, token ids [T] or [1, T]; got shape {ids.shape}")
    return ids.astype(np.int32)


def token_labels(model: Model, ids: Sequence[int]) -> list[str]:
    """Each id as its token string (``#id`` without a tokenizer)."""
    ids = [int(i) for i in ids]
    if model.tokenizer is None:
        return [f"#{i}" for i in ids]
    return [str(s) for s in model.to_str_tokens(np.asarray(ids, np.int32))]


@jax.jit
def _forward(model: Model, tokens):
    attention = get_family(model.family).attention
    sites = residual_sites(model, embed=True)
    capture = list(sites) + (["blocks.*.attn.pattern"] if attention else [])
    out = run(model, tokens[None], capture=capture)
    resid = jnp.stack([out.cache[s][0] for s in sites])  # [n, T, D]
    probs = jax.nn.softmax(apply_head(model, resid).astype(jnp.float32), -1)  # [n, T, V]
    patterns = None
    if attention:
        patterns = jnp.stack([out.cache[f"blocks.{i}.attn.pattern"][0] for i in range(model.config.n_layers)])
    return patterns, probs


def view_data(model: Model, tokens, *, top_k: int = 5) -> ViewData:
    """Patterns and logit-lens top-``top_k`` of one sequence (string, ``[T]`` or ``[1, T]`` ids)."""
    if not 1 <= top_k <= model.config.vocab_size:
        raise ValueError(f"top_k must lie in [1, {model.config.vocab_size}], got {top_k}")
    ids = single_sequence(model, tokens)
    patterns, probs = _forward(model, jnp.asarray(ids))
    top_p, top_i = jax.lax.top_k(probs, top_k)  # [n, T, k]
    top_i = np.asarray(top_i)
    vocab_ids = sorted(set(top_i.ravel().tolist()))
    return ViewData(tokens=ids, labels=token_labels(model, ids),
                    patterns=None if patterns is None else np.asarray(patterns, np.float32),
                    lens_sites=residual_sites(model, embed=True), lens_ids=top_i, lens_probs=np.asarray(top_p),
                    vocab=dict(zip(vocab_ids, token_labels(model, vocab_ids))))
