"""The incremental causal-tracing engine: compute only what a restoration can change.

A restoration at token ``t`` starting at layer ``s`` leaves every layer below ``s`` and every
position before ``t`` equal to the corrupted run (causal masking, or the recurrence of a state
space model). So for each ``t`` the engine runs the family's own layers, one at a time, on the
suffix ``[t, T)`` of the corrupted rows only, from the first layer any cell restores; the
positions before the suffix enter through the layer's state (the corrupted run's keys and values
for attention, its convolution window and SSM state for Mamba), taken from the family's
``Stepper``. Cells join the batch at their first layer (so layer ``j`` runs only the cells that
started at or before it), cells whose computation so far is identical share a row, and the
unembedding runs at the last position only.

Every family with a ``Stepper`` is supported: GPT-2, GPT-NeoX (both residual modes), the
Llama family and Mamba; results equal the full engine's (tests compare them cell by cell).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.families import get_family
from jaxinterp.interventions import Add
from jaxinterp.model import Model, run
from jaxinterp.patching.cells import answer_prob, layer_window

__all__ = ["supports", "incremental_table", "position_buckets"]


def supports(model: Model) -> bool:
    """Whether the incremental engine handles ``model`` (its family declares a stepper)."""
    return get_family(model.family).stepper is not None


class _SuffixSites:
    """``sites`` for one layer run on ``C`` cells x ``N`` rows of the positions ``[s0, T)``.

    ``patches``: {site suffix: (mask [C] bool numpy, values broadcastable to [C, N, 1, ...])}
    written at the restored token (``onehot [S]`` over the suffix) of the cells where ``mask`` is true.
    """

    captured: dict = {}

    def __init__(self, n_cells: int, n_rows: int, onehot, patches: dict):
        self.c, self.n, self.onehot, self.patches = n_cells, n_rows, onehot, patches

    def at_layer(self, layer):
        return self

    def wants(self, suffix: str) -> bool:
        return suffix in self.patches

    def adapt(self, projection, x, y):
        return y

    def __call__(self, suffix: str, x):
        if suffix not in self.patches:
            return x
        mask, values = self.patches[suffix]
        xr = x.reshape((self.c, self.n) + x.shape[1:])  # [C, N, S, ...]
        sel = jnp.asarray(mask)[:, None, None] & self.onehot[None, None, :]  # [C, 1, S]
        sel = sel.reshape(sel.shape + (1,) * (xr.ndim - 3))
        return jnp.where(sel, values.astype(x.dtype), xr).reshape(x.shape)


def _tile(state, copies: int):
    """A layer state of ``N`` rows repeated for ``copies`` cells: ``[copies * N, ...]``."""
    return jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a[None], (copies,) + a.shape).reshape(
        (copies * a.shape[0],) + a.shape[1:]), state)


def _states(model, bad: dict, layer: int, s0: int):
    stepper = get_family(model.family).stepper
    captures = {s: bad[f"blocks.{layer}.{s}"] for s in stepper.state_sites}
    return stepper.prefix_state(model.config, captures, s0)


def _first_layer_token(model, layer, t, kind, clean, bad, n_rows):
    """Layer output at token ``t`` of the first restored layer, ``[N, D]`` (per-position kinds).

    Only token ``t`` changes there: the layer runs on that one token, continuing from the
    corrupted run's state before it, with ``kind`` restored.
    """
    stepper = get_family(model.family).stepper
    x = jnp.take(bad[f"blocks.{layer}.resid_pre"], t, axis=1)[:, None]  # [N, 1, D]
    value = jnp.take(clean[f"blocks.{layer}.{kind}"], t, axis=0)
    sites = _SuffixSites(1, n_rows, jnp.ones((1,), bool), {kind: (np.ones(1, bool), value[None, None, None])})
    return stepper.layer(model, layer, x, sites, _states(model, bad, layer, t), t)[:, 0]


def _cells(kind: str, freeze, window: int, n_layers: int, per_position):
    """Per cell layer ``l``: (start layer, restore layers, frozen layers, injected layer or None)."""
    cells = []
    for l in range(n_layers):
        restore = set(layer_window(l, window, n_layers))
        frozen = set(range(l + 1, n_layers)) if freeze else set()
        first = min(restore)
        if kind == "resid_post":
            # The block output at min(restore) is injected directly: start one layer later.
            cells.append((first + 1, restore - {first}, frozen, ("resid", first)))
        elif kind in per_position:
            # At the first restored layer only token t changes (its own mixing reads the unchanged
            # corrupted state): one position computed, suffix starts a layer later.
            cells.append((first + 1, restore - {first}, frozen, ("module", first)))
        else:
            cells.append((first, restore, frozen, None))
    return cells


def _suffix_probs(model, s0, t, cells, clean, bad, answer, kind, freeze, n_rows):
    """Restored scores of the cells ``(t, l)`` for every ``l`` (``t >= s0`` traced); ``[L]``.

    Each state row is a group of cells whose computation so far is identical (same entry,
    same restored / frozen layers up to now); a group splits where its cells' next
    layers differ, so shared prefixes of windows are computed once.
    """
    stepper = get_family(model.family).stepper
    n_layers, seq = len(cells), bad["blocks.0.resid_pre"].shape[1]
    onehot = jnp.arange(seq - s0) == t - s0  # [S]
    at_t = lambda v, axis: jnp.take(v, t, axis=axis)  # noqa: E731
    groups: list[list[int]] = []
    first_token: dict = {}  # first restored layer -> its output at token t (shared by cells)
    state = None  # [groups, N, S, D]

    def entry_state(j, inject):
        if inject is None:
            return bad[f"blocks.{j}.resid_pre"][:, s0:]
        how, layer = inject  # corrupted block output with token t's value replaced
        if how == "resid":
            value = at_t(clean[f"blocks.{layer}.resid_post"], 0)
        else:
            if layer not in first_token:
                first_token[layer] = _first_layer_token(model, layer, t, kind, clean, bad, n_rows)
            value = first_token[layer][:, None]  # [N, 1, D]
        return jnp.where(onehot[None, :, None], value, bad[f"blocks.{layer}.resid_post"][:, s0:])

    def enter(j):
        nonlocal state
        by_inject: dict = {}
        for l, c in enumerate(cells):
            if c[0] == j:
                by_inject.setdefault(c[3], []).append(l)
        if not by_inject:
            return
        parts = [entry_state(j, inject)[None] for inject in by_inject]
        groups.extend(by_inject.values())
        state = jnp.concatenate(([state] if state is not None else []) + parts, axis=0)

    def split(j):
        nonlocal state, groups
        new_groups, src = [], []
        for row, g in enumerate(groups):
            parts: dict = {}
            for l in g:
                parts.setdefault((j in cells[l][1], j in cells[l][2]), []).append(l)
            for members in parts.values():
                new_groups.append(members)
                src.append(row)
        if len(new_groups) != len(groups):
            state = state[np.asarray(src)]
        groups = new_groups

    for j in range(n_layers):
        enter(j)
        if state is None:
            continue
        split(j)
        c = len(groups)
        patches = {}
        mask = np.array([j in cells[g[0]][1] for g in groups])
        if mask.any():
            patches[kind] = (mask, at_t(clean[f"blocks.{j}.{kind}"], 0)[None, None, None])
        if freeze:
            fmask = np.array([j in cells[g[0]][2] for g in groups])
            if fmask.any():
                patches[freeze] = (fmask, at_t(bad[f"blocks.{j}.{freeze}"], 1)[None, :, None])
        sites = _SuffixSites(c, n_rows, onehot, patches)
        x = state.reshape((c * n_rows,) + state.shape[2:])
        layer_state = _tile(_states(model, bad, j, s0), c)
        state = stepper.layer(model, j, x, sites, layer_state, s0).reshape(state.shape)
    enter(n_layers)
    probs = answer_prob(stepper.head(model, state[:, :, -1]), answer)  # [groups]
    row_of = {l: row for row, g in enumerate(groups) for l in g}
    return probs[np.asarray([row_of[l] for l in range(n_layers)])]


def position_buckets(first: int, seq: int, n_buckets: int) -> list[np.ndarray]:
    """Split the restored tokens ``[first, seq)`` into contiguous groups sharing one suffix.

    ``n_buckets = 0`` gives one group per token (least compute, largest program).
    """
    ts = np.arange(first, seq)
    if ts.size == 0:
        return []
    n = ts.size if n_buckets <= 0 else min(n_buckets, ts.size)
    edges = np.unique(np.round(np.linspace(first, seq, n + 1)).astype(int))  # padding waste ~ group size^2
    return [ts[(ts >= a) & (ts < b)] for a, b in zip(edges[:-1], edges[1:]) if ((ts >= a) & (ts < b)).any()]


def incremental_table(model: Model, tokens, corruption, answer, *, kind: str, freeze, window: int,
                      skip_before: int = 0, buckets: int = 4):
    """``(probs [T, L], p_clean, p_corrupt, answer)``, identical to the full engine's tables.

    Rows ``t < skip_before`` (before the subject: clean equals corrupted there) are
    ``p_corrupt`` without computation.
    """
    stepper = get_family(model.family).stepper
    n_layers, seq = int(model.config.n_layers), tokens.shape[-1]
    n_rows = corruption.tokens.shape[0]
    clean = run(model, tokens[None], capture=[f"blocks.*.{kind}", "blocks.*.resid_post"], logits_at=-1)
    top = jnp.argmax(clean.logits[0])
    answer = jnp.where(answer < 0, top, answer)
    p_clean = jax.nn.softmax(clean.logits[0].astype(jnp.float32))[answer]
    capture = ["blocks.*.resid_pre", "blocks.*.resid_post"] + [f"blocks.*.{s}" for s in stepper.state_sites]
    if freeze:
        capture.append(f"blocks.*.{freeze}")
    bad = run(model, corruption.tokens, capture=capture, interventions={"embed": Add(corruption.delta)},
              logits_at=-1)
    p_corrupt = answer_prob(bad.logits, answer)
    clean_rows = {k: v[0] for k, v in clean.cache.items()}
    cells = _cells(kind, freeze, window, n_layers, stepper.per_position)
    rows = [jnp.broadcast_to(p_corrupt, (min(skip_before, seq), n_layers))]
    for ts in position_buckets(min(skip_before, seq), seq, buckets):
        s0 = int(ts[0])
        one = lambda t: _suffix_probs(model, s0, t, cells, clean_rows, bad.cache, answer, kind, freeze, n_rows)  # noqa: E731
        rows.append(jax.vmap(one)(jnp.asarray(ts)))
    return jnp.concatenate(rows), p_clean, p_corrupt, answer
