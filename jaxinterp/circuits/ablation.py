"""Running a model with only a circuit's nodes: mean ablation outside it, faithfulness and completeness.

    means = mean_nodes(model, dictionaries, tokens)            # per position for aligned, unpadded inputs
    curve = faithfulness_curve(model, dictionaries, tokens, metric, effects, counts=(1, 10, 100), means=means)
    curve["faithfulness"]    # (m(C_n) - m(empty)) / (m(M) - m(empty)) for the top-n nodes C_n
    curve["completeness"]    # the same for the complement M \\ C_n (near 0 when C_n holds the mechanism)

Every site of the circuit is spliced (``x = decode(f) + e``); a node outside the kept set takes its
mean value (``mean_nodes``: over the batch, and over positions unless ``per_position``); ``m(M)``
keeps everything (the model itself), ``m(empty)`` keeps nothing. The circuits of a curve -- the
top-n nodes by ``|effect|`` for every n -- run as one compiled program (``lax.map`` over their keep
masks). ``ablation_interventions`` gives the same edits as interventions for any other use (SHIFT
reads a classifier head through them).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.model import run

from .effects import Effects, Node, Program, _check_tokens, _metric_value, check_metric, make_program
from .nodes import NodeAblate, Sites, encode_nodes

__all__ = ["mean_nodes", "ablation_interventions", "keep_masks", "ablated_metrics", "faithfulness_curve"]


def mean_nodes(model, dictionaries: Mapping[str, Any], tokens, *, attention_mask=None,
               per_position: bool | None = None, batch: int = 64) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{site: (mean features, mean error)}``: ``[T, F]``, ``[T, D]`` per position (default without an
    ``attention_mask``: aligned inputs), else ``[F]``, ``[D]`` over every real token."""
    sites, dicts = Sites.build(model, dictionaries)
    tokens = np.asarray(_check_tokens(tokens))
    per_position = attention_mask is None if per_position is None else per_position
    mask = np.ones(tokens.shape, bool) if attention_mask is None else np.asarray(attention_mask, bool)
    stop = Program(sites.names, None, None, model.config.n_layers).stop_at(sites.names[-1])
    sums, count = None, None
    for i in range(0, len(tokens), batch):
        t, k = jnp.asarray(tokens[i:i + batch]), jnp.asarray(mask[i:i + batch])
        states = _site_states(model, dicts, t, None if attention_mask is None else k, names=sites.names,
                              stop=stop)
        w = k.astype(jnp.float32)[..., None]
        part = [((f * w).sum(0), (e * w).sum(0)) for f, e in states]  # [T, .]
        sums = part if sums is None else [(a + c, b + d) for (a, b), (c, d) in zip(sums, part)]
        count = w.sum(0) if count is None else count + w.sum(0)  # [T, 1]
    out = {}
    for s, (f, e) in zip(sites.names, sums):
        if per_position:
            out[s] = (np.asarray(f / jnp.maximum(count, 1)), np.asarray(e / jnp.maximum(count, 1)))
        else:
            n = jnp.maximum(count.sum(), 1)
            out[s] = (np.asarray(f.sum(0) / n), np.asarray(e.sum(0) / n))
    return out


@functools.partial(jax.jit, static_argnames=("names", "stop"))
def _site_states(model, dicts, tokens, mask, *, names: tuple, stop: int | None):
    cache = run(model, tokens, capture=list(names), attention_mask=mask, stop_at=stop).cache
    return tuple(encode_nodes(d, cache[s]) for s, d in zip(names, dicts))


def ablation_interventions(dictionaries: Mapping[str, Any], keep: Mapping[str, tuple],
                           means: Mapping[str, tuple]) -> dict:
    """``{site: NodeAblate}``: ``keep[site] = (keep_f [F] or [T, F], keep_e [] or [T])`` (bools)."""
    return {s: NodeAblate(d, jnp.asarray(keep[s][0]), jnp.asarray(means[s][0], jnp.float32), jnp.asarray(keep[s][1]),
                          jnp.asarray(means[s][1], jnp.float32)) for s, d in dictionaries.items()}


def keep_masks(effects: Effects, kept: Sequence[Sequence[Node]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Stacked keep masks ``{site: ([K, (T,) F], [K, (T,)])}`` of K node sets."""
    out = {}
    for site in effects.sites:
        shape_f = np.shape(effects.features[site])
        shape_e = np.shape(effects.errors[site])
        kf = np.zeros((len(kept), *shape_f), bool)
        ke = np.zeros((len(kept), *shape_e), bool)
        if not effects.has_error[site]:
            ke[:] = True  # no error term: nothing to ablate
        out[site] = (kf, ke)
    for k, nodes in enumerate(kept):
        for n in nodes:
            kf, ke = out[n.site]
            where = (k,) if n.pos is None else (k, n.pos)
            if n.is_error:
                ke[where] = True
            else:
                kf[where + (n.index,)] = True
    return out


@functools.partial(jax.jit, static_argnames=("prog", "chunk"))
def _ablated(model, dicts, tokens, mask, args, keeps, means, *, prog: Program, chunk: int):
    def one(keep):
        ivs = {s: NodeAblate(d, kf, mf, ke, me)
               for s, d, (kf, ke), (mf, me) in zip(prog.sites, dicts, keep, means)}
        return _metric_value(model, tokens, mask, ivs, prog, args)

    return jax.lax.map(one, keeps, batch_size=chunk)


def ablated_metrics(model, dictionaries: Mapping[str, Any], tokens, metric: Callable, keeps: Mapping[str, tuple],
                    means: Mapping[str, tuple], *, metric_args: tuple = (), attention_mask=None,
                    readout: str | None = None, chunk: int = 4) -> np.ndarray:
    """The metric ``[K]`` with each of K node sets kept (``keep_masks``) and the rest mean-ablated."""
    tokens = _check_tokens(tokens)
    prog, dicts = make_program(model, dictionaries, metric, readout)
    mask = None if attention_mask is None else jnp.asarray(attention_mask, bool)
    check_metric(model, tokens, mask, prog, tuple(metric_args))
    missing = [s for s in prog.sites if s not in means or s not in keeps]
    if missing:
        raise ValueError(f"keep masks and means must cover every circuit site; missing {missing}")
    stacked = tuple((jnp.asarray(keeps[s][0]), jnp.asarray(keeps[s][1])) for s in prog.sites)
    mvals = tuple((jnp.asarray(means[s][0], jnp.float32), jnp.asarray(means[s][1], jnp.float32)) for s in prog.sites)
    return np.asarray(_ablated(model, dicts, tokens, mask, tuple(metric_args), stacked, mvals, prog=prog, chunk=chunk))


def faithfulness_curve(model, dictionaries: Mapping[str, Any], tokens, metric: Callable, effects: Effects,
                       counts: Sequence[int], *, means: Mapping[str, tuple], metric_args: tuple = (),
                       attention_mask=None, readout: str | None = None, chunk: int = 4) -> dict:
    """Faithfulness and completeness of the top-n nodes of ``effects`` (by ``|effect|``) for n in ``counts``.

    Returns ``counts`` (clipped to the number of nodes), ``m_full`` (everything kept), ``m_empty``
    (nothing kept), ``m_circuit`` / ``m_complement`` per count and ``faithfulness`` /
    ``completeness`` = ``(m - m_empty) / (m_full - m_empty)``.
    """
    ranked = [n for n, _ in effects.ranked()]
    counts = sorted({min(int(c), len(ranked)) for c in counts if int(c) >= 0})
    if not counts:
        raise ValueError("counts must hold at least one non-negative node count")
    sets = [[], ranked] + [ranked[:c] for c in counts] + [ranked[c:] for c in counts]
    keeps = keep_masks(effects, sets)
    m = ablated_metrics(model, dictionaries, tokens, metric, keeps, means, metric_args=metric_args,
                        attention_mask=attention_mask, readout=readout, chunk=chunk)
    m_empty, m_full = float(m[0]), float(m[1])
    k = len(counts)
    circuit, complement = m[2:2 + k], m[2 + k:]
    denom = m_full - m_empty
    return {"counts": counts, "n_nodes": len(ranked), "m_full": m_full, "m_empty": m_empty,
            "m_circuit": circuit.tolist(), "m_complement": complement.tolist(),
            "faithfulness": ((circuit - m_empty) / denom).tolist(),
            "completeness": ((complement - m_empty) / denom).tolist()}
