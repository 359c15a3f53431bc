"""Edges between the nodes of consecutive sites, by the same linearisation as the node effects.

Marks et al. 2024: the effect of upstream node ``u`` on the metric through downstream node ``d`` is

    IE(u -> d) = grad_d m . (d d / d u) . delta_u

with ``grad_d m`` the downstream gradients of the node-effect computation (the mean over the
integrated-gradients path, or the clean gradient for attribution patching), ``delta_u`` the
upstream patch-minus-clean values, and ``d d / d u`` the Jacobian at the clean run with a
stop-gradient at every circuit site between ``u`` and ``d`` (so an edge is a direct effect:
resid_{l-1} -> mlp_l excludes the path through attn_l, which the edges resid_{l-1} -> attn_l ->
mlp_l carry). Which sites are joined: ``Sites.edge_pairs`` (no residual-stream site strictly
between).

One vector-Jacobian product per selected downstream node (the cotangent ``grad_d m`` restricted
to that node), vmapped: an upstream pair's edges to all of them come from one compiled program
(``lax.map`` in chunks bounds memory). Summed over positions (``per_position=False``) a
downstream node is feature ``i`` at every position and an upstream node's edge sums over its
positions too. Edges into ``"y"`` (the metric) are the upstream node effects where nothing lies
between, else the clean gradient with stop-gradients, times ``delta_u``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .effects import Effects, Node, Program, _metric_value, forward, make_program
from .nodes import NodeValues, Sites, encode_nodes, stop_gradient

__all__ = ["edge_effects", "Y"]

Y = Node("y", 0, None)  # the metric node


def _no_metric(value):
    return jnp.zeros(())


def _bucket(k: int) -> int:
    """Pad a node count to a multiple of 8 (fewer distinct shapes, fewer compiles)."""
    return max(8, -(-k // 8) * 8)


def _cotangents(nodes: Sequence[Node], grads, shape_f, shape_e, per_position: bool):
    """Cotangents ``[K, B, T, F]``, ``[K, B, T, D]``: each downstream node's gradient alone."""
    k = _bucket(len(nodes))
    b, t, f = shape_f
    onehot = np.zeros((k, f), np.float32)
    pos = np.zeros((k, t), np.float32)
    err = np.zeros((k,), np.float32)
    feat = np.zeros((k,), np.float32)
    for j, n in enumerate(nodes):
        if n.is_error:
            err[j] = 1.0
        else:
            onehot[j, n.index], feat[j] = 1.0, 1.0
        pos[j] = 1.0 if n.pos is None else np.eye(t, dtype=np.float32)[n.pos]
    gf, ge = grads
    cot_f = gf[None] * (onehot * feat[:, None])[:, None, None, :] * pos[:, None, :, None]
    cot_e = ge[None] * (pos * err[:, None])[:, None, :, None]
    return cot_f, cot_e


@functools.partial(jax.jit, static_argnames=("prog", "up", "down", "between", "chunk", "per_position"))
def _pair_program(model, du, dd, tokens, mask, clean_u, delta_u, cot_f, cot_e, *, prog: Program, up: str, down: str,
                  between: tuple, chunk: int, per_position: bool):
    """Edges ``[K, T?, F_u]`` and ``[K, T?]`` from every upstream node to K downstream nodes."""

    def phi(values):
        ivs = {up: NodeValues(du, *values), **{s: stop_gradient for s in between}}
        _, cache = forward(model, tokens, mask, ivs, prog, capture=[down], upto=down)
        return encode_nodes(dd, cache[down])

    _, vjp = jax.vjp(phi, clean_u)
    (g_f, g_e), = jax.lax.map(lambda c: vjp(c), (cot_f, cot_e), batch_size=chunk)  # [K, B, T, ...]
    real = jnp.ones(tokens.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    e_f = (g_f * delta_u[0][None] * real[None, ..., None]).sum(1)  # [K, T, F_u]
    e_e = ((g_e * delta_u[1][None]).sum(-1) * real[None]).sum(1)  # [K, T]
    return (e_f, e_e) if per_position else (e_f.sum(1), e_e.sum(1))


@functools.partial(jax.jit, static_argnames=("prog", "up", "between", "per_position"))
def _y_program(model, du, tokens, mask, args, clean_u, delta_u, *, prog: Program, up: str, between: tuple,
               per_position: bool):
    """Direct effects of every node of ``up`` on the metric with stop-gradients at ``between``."""

    def metric_at(values):
        ivs = {up: NodeValues(du, *values), **{s: stop_gradient for s in between}}
        return _metric_value(model, tokens, mask, ivs, prog, args)

    g_f, g_e = jax.grad(metric_at)(clean_u)
    real = jnp.ones(tokens.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    e_f = (g_f * delta_u[0] * real[..., None]).sum(0)
    e_e = ((g_e * delta_u[1]).sum(-1) * real).sum(0)
    return (e_f, e_e) if per_position else (e_f.sum(0), e_e.sum(0))


def _upstream_weights(e_f, e_e, up_nodes: Sequence[Node]) -> np.ndarray:
    """``[..., U]``: the edge of each selected upstream node from the full ``[..., (T,) F]`` arrays."""
    e_f, e_e = np.asarray(e_f), np.asarray(e_e)
    cols = []
    for n in up_nodes:
        if n.is_error:
            cols.append(e_e[..., n.pos] if n.pos is not None else e_e)
        else:
            cols.append(e_f[..., n.pos, n.index] if n.pos is not None else e_f[..., n.index])
    return np.stack(cols, -1) if cols else np.zeros(e_e.shape + (0,))


def edge_effects(model, dictionaries: Mapping[str, Any], tokens, effects: Effects, nodes: Sequence[Node], *,
                 metric: Callable | None = None, metric_args: tuple = (), attention_mask=None,
                 readout: str | None = None, chunk: int = 16) -> dict[tuple[Node, Node], float]:
    """``{(upstream, downstream): IE}`` between the given ``nodes`` (and into ``Y``, the metric).

    ``effects`` must come from ``node_effects`` on the same model, dictionaries and tokens (its
    gradients and deltas are reused); ``metric`` is needed for edges into ``Y`` that pass a site.
    """
    prog, dicts = make_program(model, dictionaries, metric or _no_metric, readout)
    pair_prog = Program(prog.sites, _no_metric, None, prog.n_layers)  # pairs never read the metric: one cache
    if prog.sites != effects.sites:
        raise ValueError(f"effects were computed for sites {list(effects.sites)}, not {list(prog.sites)}")
    unknown = [str(n) for n in nodes if n.site not in prog.sites]
    if unknown:
        raise ValueError(f"nodes {unknown[:3]} are not at the circuit sites {list(prog.sites)}")
    by_site = {s: [n for n in nodes if n.site == s] for s in prog.sites}
    index = {s: i for i, s in enumerate(prog.sites)}
    mask = None if attention_mask is None else jnp.asarray(attention_mask, bool)
    tokens = jnp.asarray(tokens)
    edges: dict[tuple[Node, Node], float] = {}
    for up, down, between in Sites(prog.sites).edge_pairs():
        ups = by_site[up]
        if not ups or (down != "y" and not by_site[down]):
            continue
        iu = index[up]
        if down == "y":
            if between:
                if metric is None:
                    raise ValueError(f"edges from {up!r} into the metric pass {list(between)}: give the metric")
                e_f, e_e = _y_program(model, dicts[iu], tokens, mask, tuple(metric_args), effects.clean[iu],
                                      effects.deltas[iu], prog=prog, up=up, between=between,
                                      per_position=effects.per_position)
            else:
                e_f, e_e = effects.features[up], effects.errors[up]
            for n, w in zip(ups, _upstream_weights(e_f, e_e, ups)):
                edges[(n, Y)] = float(w)
            continue
        downs, idown = by_site[down], index[down]
        cot_f, cot_e = _cotangents(downs, effects.grads[idown], effects.clean[idown][0].shape,
                                   effects.clean[idown][1].shape, effects.per_position)
        e_f, e_e = _pair_program(model, dicts[iu], dicts[idown], tokens, mask, effects.clean[iu], effects.deltas[iu],
                                 cot_f, cot_e, prog=pair_prog, up=up, down=down, between=between, chunk=chunk,
                                 per_position=effects.per_position)
        weights = _upstream_weights(e_f, e_e, ups)  # [K_padded, U]
        for j, d in enumerate(downs):
            for n, w in zip(ups, weights[j]):
                edges[(n, d)] = float(w)
    return edges
