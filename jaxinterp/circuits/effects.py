"""Node effects: attribution patching and integrated gradients over SAE features, errors and neurons.

    effects = node_effects(model, {"blocks.1.mlp_out": sae1, "blocks.1.resid_post": sae2}, clean_tokens,
                           logit_diff, patch=corrupt_tokens, metric_args=(good_ids, bad_ids))
    effects.features["blocks.1.mlp_out"]   # [F]: the effect on the metric of patching each feature
    effects.errors["blocks.1.mlp_out"]     # []: the same for the SAE's error term

The metric ``m`` is a scalar function of the last-position logits ``[B, V]`` (each row's last real
token under an ``attention_mask``), or of the value of a ``readout`` site (e.g. a linear probe on a
residual stream); pass a module-level function (it keys the compiled program). A node's effect is
the first-order estimate of ``m(patched) - m(clean)`` when the node alone takes its patch value:

* ``method="atp"`` (attribution patching): ``grad m |clean . (patch - clean)``, every site from one
  forward and one backward pass (zero probes at every site);
* ``method="ig"`` (integrated gradients, Marks et al. 2024): at each site separately, the mean
  gradient at ``steps`` points ``clean + alpha (patch - clean)``, ``alpha = 0, 1/N, ..., (N-1)/N``,
  times ``patch - clean``; the other sites compute as usual. By the completeness of integrated
  gradients, a site's effects sum to the exact effect of patching the whole site as N grows.

Patch values (``patch``): counterfactual tokens of the clean tokens' shape, ``"zero"``, or explicit
node values ``{site: (features, error)}`` broadcastable to the clean ones (``mean_nodes`` gives
mean-ablation values). Everything -- clean run, patch run, the gradients of every site at every
step -- is one compiled program; a ``lax.scan`` walks the (site, step) pairs, the site being
chosen inside one traced forward by a ``select`` flag.

Effects are summed over the batch (so a metric that averages over rows gives the mean effect per
row) and over positions (``per_position=True`` keeps ``[T, F]``); padding never counts.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.model import run
from jaxinterp.sites import resolve_sites, split_layer_site

from .nodes import NodeProbe, NodeValues, Sites, encode_nodes, has_error_node

__all__ = ["METHODS", "Node", "Effects", "Program", "node_effects", "exact_effects", "forward", "last_real",
           "check_metric", "patch_states"]

METHODS = ("ig", "atp")
ERROR = -1  # the index of a site's error node


class Node(NamedTuple):
    """A circuit node: feature ``index`` (``ERROR`` = -1 for the error term) of ``site``, at ``pos``
    (None: summed over positions)."""

    site: str
    index: int
    pos: int | None = None

    @property
    def is_error(self) -> bool:
        return self.index == ERROR

    def __str__(self) -> str:
        where = self.site if self.pos is None else f"{self.site}@{self.pos}"
        return f"{where}/{'err' if self.is_error else self.index}"


@dataclasses.dataclass(frozen=True)
class Program:
    """The static description of a circuit program: sites (model order), metric, readout."""

    sites: tuple[str, ...]
    metric: Callable
    readout: str | None
    n_layers: int

    def stop_at(self, site: str | None) -> int | None:
        """``stop_at`` running the model through ``site`` (None: the whole model)."""
        if site is None or site == "final_norm":
            return None
        layer, _ = split_layer_site(site)
        return max(1, min(self.n_layers, 1 if layer is None else layer + 1))


def last_real(mask, shape) -> jax.Array:
    """Each row's last real position ``[B]`` (the last position without a mask)."""
    if mask is None:
        return jnp.full(shape[:1], shape[1] - 1, jnp.int32)
    return jnp.max(jnp.where(mask, jnp.arange(shape[1]), -1), axis=1).astype(jnp.int32)


def forward(model, tokens, mask, interventions, prog: Program, capture=(), upto: str | None = None):
    """``(value, cache)``: ``value`` is the last-position logits ``[B, V]``, or the ``readout`` site
    (or ``upto``, running the model only that far)."""
    last = upto or prog.readout
    capture = list(dict.fromkeys(capture))
    if last is None:
        out = run(model, tokens, capture=capture or None, interventions=interventions, attention_mask=mask,
                  logits_at=last_real(mask, tokens.shape))
        return out.logits, out.cache
    out = run(model, tokens, capture=list(dict.fromkeys([last, *capture])), interventions=interventions,
              attention_mask=mask, stop_at=prog.stop_at(last))
    return out.cache[last], out.cache


def _metric_value(model, tokens, mask, ivs, prog: Program, args):
    value, _ = forward(model, tokens, mask, ivs, prog)
    return prog.metric(value, *args)


def _states(model, dicts, tokens, mask, prog: Program, args):
    """``(metric, ((features, error) per site))`` of an unmodified run."""
    value, cache = forward(model, tokens, mask, None, prog, capture=prog.sites)
    return prog.metric(value, *args), tuple(encode_nodes(d, cache[s]) for s, d in zip(prog.sites, dicts))


def _all_values(prog: Program, dicts, states, select=None) -> dict:
    return {s: NodeValues(d, f, e, None if select is None else select == i)
            for i, (s, d, (f, e)) in enumerate(zip(prog.sites, dicts, states))}


def _ig_grads(model, dicts, tokens, mask, args, clean, patch, prog: Program, steps: int):
    """Mean gradients over the straight path from ``clean`` to ``patch``, each site on its own."""
    deltas = jax.tree_util.tree_map(jnp.subtract, patch, clean)

    def metric_at(values, s):
        return _metric_value(model, tokens, mask, _all_values(prog, dicts, values, select=s), prog, args)

    grad_fn = jax.grad(metric_at)

    def body(acc, item):
        s, alpha = item
        values = jax.tree_util.tree_map(lambda c, d: c + alpha * d, clean, deltas)
        return jax.tree_util.tree_map(jnp.add, acc, grad_fn(values, s)), None

    n = len(prog.sites)
    sites = jnp.repeat(jnp.arange(n), steps)
    alphas = jnp.tile(jnp.arange(steps, dtype=jnp.float32) / steps, n)
    total, _ = jax.lax.scan(body, jax.tree_util.tree_map(jnp.zeros_like, clean), (sites, alphas))
    return jax.tree_util.tree_map(lambda g: g / steps, total)


def _atp_grads(model, dicts, tokens, mask, args, clean, prog: Program):
    """Gradients at the clean run with respect to every node at once (zero probes)."""

    def metric_at(probes):
        ivs = {s: NodeProbe(d, pf, pe) for s, d, (pf, pe) in zip(prog.sites, dicts, probes)}
        return _metric_value(model, tokens, mask, ivs, prog, args)

    return jax.grad(metric_at)(jax.tree_util.tree_map(jnp.zeros_like, clean))


@functools.partial(jax.jit, static_argnames=("prog", "method", "steps"))
def _program(model, dicts, tokens, mask, args, patch_tokens, given, *, prog: Program, method: str, steps: int):
    m_clean, clean = _states(model, dicts, tokens, mask, prog, args)
    if patch_tokens is not None:
        m_patch, patch = _states(model, dicts, patch_tokens, mask, prog, args)
    else:
        patch = jax.tree_util.tree_map(lambda g, c: jnp.broadcast_to(g, c.shape).astype(c.dtype), given, clean)
        m_patch = _metric_value(model, tokens, mask, _all_values(prog, dicts, patch), prog, args)
    if method == "ig":
        grads = _ig_grads(model, dicts, tokens, mask, args, clean, patch, prog, steps)
    else:
        grads = _atp_grads(model, dicts, tokens, mask, args, clean, prog)
    deltas = jax.tree_util.tree_map(jnp.subtract, patch, clean)
    return m_clean, m_patch, clean, grads, deltas


@dataclasses.dataclass(frozen=True)
class Effects:
    """Node effects of one circuit program.

    ``features[site]``: ``[F]`` (``[T, F]`` per position); ``errors[site]``: ``[]`` (``[T]``), 0 for
    ``Neurons``; ``m_clean`` the metric on the clean run, ``m_patch`` with every node patched (the patch
    run for counterfactual tokens). ``grads``/``deltas``/``clean``: per site ``(features, error)``
    arrays ``[B, T, ...]`` that edges reuse.
    """

    sites: tuple[str, ...]
    features: dict
    errors: dict
    has_error: dict
    m_clean: float
    m_patch: float
    method: str
    steps: int
    per_position: bool
    grads: tuple = dataclasses.field(repr=False)
    deltas: tuple = dataclasses.field(repr=False)
    clean: tuple = dataclasses.field(repr=False)

    def nodes(self) -> dict[Node, float]:
        """Every node and its effect (error nodes only where the dictionary has one)."""
        out = {}
        for site in self.sites:
            feats = self.features[site]
            if self.per_position:
                for t, i in zip(*np.nonzero(np.ones(feats.shape, bool))):
                    out[Node(site, int(i), int(t))] = float(feats[t, i])
                if self.has_error[site]:
                    out.update({Node(site, ERROR, t): float(v) for t, v in enumerate(self.errors[site])})
            else:
                out.update({Node(site, i, None): float(v) for i, v in enumerate(feats)})
                if self.has_error[site]:
                    out[Node(site, ERROR, None)] = float(self.errors[site])
        return out

    def ranked(self) -> list[tuple[Node, float]]:
        """Nodes by decreasing ``|effect|`` (ties in model order)."""
        items = list(self.nodes().items())
        order = np.argsort(-np.abs(np.array([v for _, v in items])), kind="stable")
        return [items[i] for i in order]

    def site_total(self, site: str) -> float:
        """The sum of a site's node effects (integrated gradients: ~ the effect of patching the whole site)."""
        return float(np.sum(self.features[site]) + np.sum(self.errors[site]))


def check_metric(model, tokens, mask, prog: Program, args) -> None:
    """The metric must map the readout to a scalar (traced once, nothing computed)."""
    shape = jax.eval_shape(lambda m, t: _metric_value(m, t, mask, None, prog, args), model, tokens).shape
    if shape != ():
        raise ValueError(f"the metric must return a scalar (e.g. a mean over the batch), got shape {tuple(shape)}")


def _check_tokens(tokens, what: str = "tokens") -> jax.Array:
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"{what} must be an int array [batch, seq], got {tokens.dtype} {tuple(tokens.shape)}")
    return tokens


def make_program(model, dictionaries: Mapping[str, Any], metric: Callable, readout: str | None):
    """``(Program, dictionaries in model order)``, every input checked."""
    sites, dicts = Sites.build(model, dictionaries)
    if readout is not None:
        resolve_sites(readout, model.sites)
        order = {s: i for i, s in enumerate(model.sites)}
        late = [s for s in sites.names if order[s] > order[readout]]
        if late:
            raise ValueError(f"readout {readout!r} comes before the circuit sites {late}; read out at or after "
                             f"the last circuit site")
    if not callable(metric):
        raise TypeError(f"metric must be a function of the readout (logits [B, V] or the readout site), got "
                        f"{type(metric).__name__}")
    return Program(sites.names, metric, readout, model.config.n_layers), dicts


def patch_states(patch, prog: Program, dicts, mask) -> tuple[Any, Any]:
    """``(patch tokens or None, explicit patch node values or None)`` from the ``patch`` argument."""
    if isinstance(patch, str):
        if patch != "zero":
            raise ValueError(f"patch must be counterfactual tokens, 'zero' or {{site: (features, error)}}; got "
                             f"{patch!r}")
        return None, tuple((jnp.zeros(()), jnp.zeros(())) for _ in prog.sites)
    if isinstance(patch, Mapping):
        missing = [s for s in prog.sites if s not in patch]
        extra = sorted(set(patch) - set(prog.sites))
        if missing or extra:
            raise ValueError(f"patch values must name exactly the circuit sites; missing {missing}, unknown {extra}")
        return None, tuple((jnp.asarray(patch[s][0], jnp.float32), jnp.asarray(patch[s][1], jnp.float32))
                           for s in prog.sites)
    return _check_tokens(patch, "patch tokens"), None


def node_effects(model, dictionaries: Mapping[str, Any], tokens, metric: Callable, *, patch="zero",
                 method: str = "ig", steps: int = 10, metric_args: tuple = (), attention_mask=None,
                 readout: str | None = None, per_position: bool = False) -> Effects:
    """Effects of every node (SAE features, SAE errors, neurons) at every site on a scalar ``metric``.

    Args:
      dictionaries: ``{site: SAE or Neurons}`` (concrete site names; widths are checked).
      tokens: clean inputs ``[B, T]``.
      metric: ``(readout, *metric_args) -> scalar``; the readout is the last-position logits ``[B, V]``
        or, with ``readout``, that site's value ``[B, T, ...]``.
      patch: counterfactual tokens (same shape), ``"zero"`` or ``{site: (features, error)}`` values.
      method: ``"ig"`` (``steps`` points per site) or ``"atp"``.
      attention_mask: ``[B, T]`` for padded inputs (both runs share it).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    tokens = _check_tokens(tokens)
    prog, dicts = make_program(model, dictionaries, metric, readout)
    mask = None if attention_mask is None else jnp.asarray(attention_mask, bool)
    args = tuple(metric_args)
    check_metric(model, tokens, mask, prog, args)
    patch_tokens, given = patch_states(patch, prog, dicts, mask)
    if patch_tokens is not None and patch_tokens.shape != tokens.shape:
        raise ValueError(f"patch tokens must have the clean tokens' shape {tuple(tokens.shape)}, got "
                         f"{tuple(patch_tokens.shape)}")
    m_clean, m_patch, clean, grads, deltas = _program(model, dicts, tokens, mask, args, patch_tokens, given,
                                                      prog=prog, method=method, steps=steps)
    real = jnp.ones(tokens.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
    features, errors = {}, {}
    for site, (gf, ge), (df, de) in zip(prog.sites, grads, deltas):
        f = np.asarray(((gf * df) * real[..., None]).sum(0))  # [T, F]
        e = np.asarray(((ge * de).sum(-1) * real).sum(0))  # [T]
        features[site], errors[site] = (f, e) if per_position else (f.sum(0), e.sum(0))
    has_error = {s: has_error_node(d) for s, d in zip(prog.sites, dicts)}
    return Effects(prog.sites, features, errors, has_error, float(m_clean), float(m_patch), method, steps,
                   per_position, grads, deltas, clean)


@functools.partial(jax.jit, static_argnames=("prog", "site"))
def _one_site_metric(model, dictionary, tokens, mask, args, features, error, *, prog: Program, site: str):
    return _metric_value(model, tokens, mask, {site: NodeValues(dictionary, features, error)}, prog, args)


def exact_effects(model, dictionaries: Mapping[str, Any], tokens, metric: Callable, effects: Effects, nodes, *,
                  metric_args: tuple = (), attention_mask=None, readout: str | None = None) -> dict[Node, float]:
    """``m(node alone at its patch value) - m(clean)`` for each node: a plain loop of forward passes (the
    quantity attribution patching and integrated gradients estimate)."""
    prog, dicts = make_program(model, dictionaries, metric, readout)
    if prog.sites != effects.sites:
        raise ValueError(f"effects were computed for sites {list(effects.sites)}, not {list(prog.sites)}")
    tokens = _check_tokens(tokens)
    mask = None if attention_mask is None else jnp.asarray(attention_mask, bool)
    out = {}
    for node in nodes:
        i = prog.sites.index(node.site)
        (f, e), (df, de) = effects.clean[i], effects.deltas[i]
        pos = jnp.ones(tokens.shape[1], bool) if node.pos is None else jnp.arange(tokens.shape[1]) == node.pos
        if node.is_error:
            e = e + de * pos[None, :, None]
        else:
            f = f.at[..., node.index].add(df[..., node.index] * pos[None, :])
        m = _one_site_metric(model, dicts[i], tokens, mask, tuple(metric_args), f, e, prog=prog, site=node.site)
        out[node] = float(m) - effects.m_clean
    return out
