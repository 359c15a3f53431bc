"""Behaviours without labels: cluster contexts by the gradient of the model's next-token loss.

Marks et al. 2024 (after Michaud et al.'s "quanta"): for each context, the gradient of the loss of
its next token with respect to the model's parameters; contexts whose gradients point the same way
use the same mechanism. Spectral clustering of the gradients' cosine similarities groups them; a
circuit per cluster (metric: the mean log-probability of each context's next token) shows the
mechanism.

``gradient_sketches`` computes per-context parameter gradients (``vmap`` of ``grad``, in chunks)
and compresses each to ``dim`` numbers with a count sketch (every parameter hashed to one of
``dim`` buckets with a random sign: inner products, hence cosines, are preserved in expectation
with error ~ 1/sqrt(dim)), so N contexts need N x dim floats, not N x n_params.
``spectral_clusters``: normalised-affinity spectral embedding (affinity ``(1 + cos) / 2``) and
k-means++ with restarts, in NumPy; clusters numbered by decreasing size.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxinterp.model import run

from .effects import last_real

__all__ = ["gradient_sketches", "spectral_clusters", "kmeans"]


def _sketch_tables(params, dim: int, seed: int):
    """Per leaf: bucket ``[P]`` and sign ``[P]`` of every parameter (a count sketch)."""
    leaves = jax.tree_util.tree_leaves(params)
    rng = np.random.default_rng(seed)
    return [(jnp.asarray(rng.integers(0, dim, leaf.size), jnp.int32),
             jnp.asarray(rng.choice(np.array([-1.0, 1.0], np.float32), leaf.size))) for leaf in leaves]


@functools.partial(jax.jit, static_argnames=("dim",))
def _chunk_sketch(model, tokens, mask, targets, tables, *, dim: int):
    def loss(params, t, k, y):
        m = model.replace(params=params)
        logits = run(m, t[None], attention_mask=k[None], logits_at=last_real(k[None], (1, t.shape[0]))).logits
        return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y[None])[0]

    grads = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0, 0))(model.params, tokens, mask, targets)
    out = jnp.zeros((tokens.shape[0], dim), jnp.float32)
    for g, (bucket, sign) in zip(jax.tree_util.tree_leaves(grads), tables):
        out = out.at[:, bucket].add(g.reshape(g.shape[0], -1).astype(jnp.float32) * sign)
    return out


def gradient_sketches(model, tokens, targets, *, attention_mask=None, dim: int = 4096, seed: int = 0,
                      chunk: int = 16) -> np.ndarray:
    """``[N, dim]`` count sketches of d loss / d params, the loss of ``targets [N]`` at each context's last
    real token (``tokens [N, T]``, left padding under ``attention_mask``)."""
    tokens = np.asarray(tokens)
    targets = np.asarray(targets)
    if tokens.ndim != 2 or targets.shape != tokens.shape[:1]:
        raise ValueError(f"tokens must be [N, T] and targets [N], got {tokens.shape} and {targets.shape}")
    if dim < 1 or chunk < 1:
        raise ValueError(f"dim and chunk must be positive, got {dim}, {chunk}")
    mask = np.ones(tokens.shape, bool) if attention_mask is None else np.asarray(attention_mask, bool)
    tables = _sketch_tables(model.params, dim, seed)
    n = len(tokens)
    pad = -n % chunk  # fixed chunk shape: one compiled program
    tokens_p = np.concatenate([tokens, np.repeat(tokens[:1], pad, 0)])
    mask_p = np.concatenate([mask, np.repeat(mask[:1], pad, 0)])
    targets_p = np.concatenate([targets, np.repeat(targets[:1], pad, 0)])
    parts = [np.asarray(_chunk_sketch(model, jnp.asarray(tokens_p[i:i + chunk]), jnp.asarray(mask_p[i:i + chunk]),
                                      jnp.asarray(targets_p[i:i + chunk]), tables, dim=dim))
             for i in range(0, len(tokens_p), chunk)]
    return np.concatenate(parts)[:n]


def kmeans(x: np.ndarray, k: int, *, seed: int = 0, n_init: int = 10, iters: int = 100) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding, the best of ``n_init`` restarts (lowest inertia)."""
    rng = np.random.default_rng(seed)
    best, best_inertia = None, np.inf
    for _ in range(n_init):
        centres = [x[rng.integers(len(x))]]
        for _ in range(1, k):
            d2 = np.min(((x[:, None, :] - np.array(centres)[None]) ** 2).sum(-1), axis=1)
            p = d2 / d2.sum() if d2.sum() > 0 else np.full(len(x), 1 / len(x))
            centres.append(x[rng.choice(len(x), p=p)])
        c = np.array(centres)
        for _ in range(iters):
            labels = np.argmin(((x[:, None, :] - c[None]) ** 2).sum(-1), axis=1)
            new = np.array([x[labels == j].mean(0) if np.any(labels == j) else c[j] for j in range(k)])
            if np.allclose(new, c):
                break
            c = new
        inertia = ((x - c[labels]) ** 2).sum()
        if inertia < best_inertia:
            best, best_inertia = labels, inertia
    return best


def spectral_clusters(x: np.ndarray, k: int, *, seed: int = 0, n_init: int = 10) -> np.ndarray:
    """Cluster labels ``[N]`` (0 = largest cluster) of the rows of ``x [N, d]`` by cosine similarity."""
    x = np.asarray(x, np.float64)
    if not 1 <= k <= len(x):
        raise ValueError(f"k must lie in [1, {len(x)}] (the number of rows), got {k}")
    xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    affinity = (1.0 + xn @ xn.T) / 2.0
    d = 1.0 / np.sqrt(affinity.sum(1))
    _, vecs = np.linalg.eigh(d[:, None] * affinity * d[None, :])
    emb = vecs[:, -k:]
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    labels = kmeans(emb, k, seed=seed, n_init=n_init)
    order = np.argsort(-np.bincount(labels, minlength=k), kind="stable")
    rank = np.empty(k, int)
    rank[order] = np.arange(k)
    return rank[labels]
