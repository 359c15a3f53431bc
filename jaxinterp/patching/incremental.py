"""The incremental causal-tracing engine: compute only what a restoration can change.

A restoration at token ``t`` starting at layer ``s`` leaves every layer below ``s`` and every
position before ``t`` equal to the corrupted run (causal masking). So for each ``t`` the
engine runs the port's own blocks on the suffix ``[t, T)`` of the corrupted rows only, from
the first layer any cell restores, with the keys and values of positions ``< t`` taken
from the corrupted run; cells join the batch at their first layer (so layer ``j`` runs only
the cells that started at or before it), and the unembedding runs at the last position.

The blocks are the port's Flax modules applied to their parameter subtree with a small
``sites`` object that prepends the cached prefix keys/values (``causal_attention`` accepts
``Tk > Tq``) and patches the restored / frozen sites. Supported: families whose blocks are
position-independent given their input (GPT-2: learned positions are added at ``embed``).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.interventions import Add
from jaxinterp.model import Model, run

__all__ = ["SUPPORTED", "supports", "incremental_table"]


def _gpt2_block(model: Model, layer: int, x, sites):
    from jaxinterp.models.gpt2.model import Block

    return Block(model.config, layer).apply({"params": model.params[f"h_{layer}"]}, x, sites)


def _gpt2_head(model: Model, x):
    """Final LayerNorm + unembedding of ``x [..., D]``."""
    from jaxinterp.models.common import LayerNorm

    h = LayerNorm(model.config.ln_eps).apply({"params": model.params["ln_f"]}, x)
    if model.config.tie_embeddings:
        return jnp.einsum("...d,vd->...v", h, model.params["wte"])
    return h @ model.params["lm_head"]["kernel"]


# family -> (block(model, layer, x, sites), head(model, x), attention key/value site suffixes)
_STEPPERS: dict[str, tuple[Callable, Callable, tuple[str, ...]]] = {
    "gpt2": (_gpt2_block, _gpt2_head, ("attn.k", "attn.v")),
}
SUPPORTED = tuple(_STEPPERS)


def supports(model: Model) -> bool:
    """Whether the incremental engine handles ``model`` (others fall back to the full engine).

    Conservative: GPT-2 variants with per-layer attention scaling are not covered by its tests.
    """
    if model.family not in _STEPPERS:
        return False
    return not getattr(model.config, "scale_attn_by_inverse_layer_idx", False)


class _SuffixSites:
    """``sites`` for a block run on ``C`` cells x ``N`` rows of the positions ``[s0, T)``.

    ``prefix``: {site: [N, s0, ...]} prepended along the sequence axis (cached keys/values).
    ``patches``: {site: (mask [C] bool numpy, values broadcastable to [C, N, 1, ...])} written at
    the restored token (``onehot [S]`` over the suffix) of the cells where ``mask`` is true.
    """

    def __init__(self, n_cells: int, n_rows: int, onehot, prefix: dict, patches: dict):
        self.c, self.n, self.onehot = n_cells, n_rows, onehot
        self.prefix, self.patches = prefix, patches

    def wants(self, name: str) -> bool:
        return name in self.prefix or name in self.patches

    def __call__(self, name: str, x):
        if name in self.prefix:
            p = self.prefix[name]  # [N, s0, ...]
            p = jnp.broadcast_to(p[None], (self.c,) + p.shape).reshape((self.c * self.n,) + p.shape[1:])
            return jnp.concatenate([p.astype(x.dtype), x], axis=1)
        if name in self.patches:
            mask, values = self.patches[name]
            xr = x.reshape((self.c, self.n) + x.shape[1:])  # [C, N, S, ...]
            sel = jnp.asarray(mask)[:, None, None] & self.onehot[None, None, :]  # [C, 1, S]
            sel = sel.reshape(sel.shape + (1,) * (xr.ndim - 3))
            return jnp.where(sel, values.astype(x.dtype), xr).reshape(x.shape)
        return x


# Sites whose value at token t influences no other position within the same layer.
_PER_POSITION = ("attn_out", "mlp_out", "resid_mid", "ln2", "mlp.pre", "mlp.post")


def _first_layer_token(model, layer, t, kind, clean, bad, n_rows):
    """Block output at token t of the first restored layer ``[N, D]`` (window kinds)."""
    block = _STEPPERS[model.family][0]
    at_t = lambda v, axis: jnp.take(v, t, axis=axis)  # noqa: E731
    x = at_t(bad[f"blocks.{layer}.resid_pre"], 1)[:, None]  # [N, 1, D]
    # The attention output at t is the corrupted run's (its inputs are unchanged) unless restored.
    patches = {f"blocks.{layer}.attn_out": (np.ones(1, bool), at_t(bad[f"blocks.{layer}.attn_out"], 1)[None, :, None])}
    patches[f"blocks.{layer}.{kind}"] = (np.ones(1, bool), at_t(clean[f"blocks.{layer}.{kind}"], 0)[None, None, None])
    sites = _SuffixSites(1, n_rows, jnp.ones((1,), bool), {}, patches)
    return block(model, layer, x, sites)[:, 0]


def _cells(kind: str, freeze, window: int, n_layers: int):
    """Per cell layer ``l``: (start layer, restore layers, frozen layers, injected layer or None)."""
    from jaxinterp.patching.causal_trace import layer_window

    cells = []
    for l in range(n_layers):
        restore = set(layer_window(l, window, n_layers))
        frozen = set(range(l + 1, n_layers)) if freeze else set()
        first = min(restore)
        if kind == "resid_post":
            # The block output at min(restore) is injected directly: start one layer later.
            cells.append((first + 1, restore - {first}, frozen, ("resid", first)))
        elif kind in _PER_POSITION:
            # At the first restored layer only token t changes (its own attention reads the
            # unchanged corrupted keys/values): one position computed, suffix starts a layer later.
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
    block, head, kv = _STEPPERS[model.family]
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
        prefix = {f"blocks.{j}.{s}": bad[f"blocks.{j}.{s}"][:, :s0] for s in kv} if s0 > 0 else {}
        patches = {}
        mask = np.array([j in cells[g[0]][1] for g in groups])
        if mask.any():
            v = at_t(clean[f"blocks.{j}.{kind}"], 0)  # [...]
            patches[f"blocks.{j}.{kind}"] = (mask, v[None, None, None])
        if freeze:
            fmask = np.array([j in cells[g[0]][2] for g in groups])
            if fmask.any():
                v = at_t(bad[f"blocks.{j}.{freeze}"], 1)  # [N, ...]
                patches[f"blocks.{j}.{freeze}"] = (fmask, v[None, :, None])
        sites = _SuffixSites(c, n_rows, onehot, prefix, patches)
        x = state.reshape((c * n_rows,) + state.shape[2:])
        state = block(model, j, x, sites).reshape(state.shape)
    enter(n_layers)
    logits = head(model, state[:, :, -1])  # [groups, N, V]
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., answer].mean(1)  # [groups]
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
    _, _, kv = _STEPPERS[model.family]
    n_layers, seq = int(model.config.n_layers), tokens.shape[-1]
    n_rows = corruption.tokens.shape[0]
    every = [f"blocks.*.{kind}"]
    clean = run(model, tokens[None], capture=every, logits_at=-1)
    top = jnp.argmax(clean.logits[0, -1])
    answer = jnp.where(answer < 0, top, answer)
    p_clean = jax.nn.softmax(clean.logits[0, -1].astype(jnp.float32))[answer]
    capture = ["blocks.*.resid_pre", "blocks.*.resid_post", "blocks.*.attn_out"] + [f"blocks.*.{s}" for s in kv]
    if freeze:
        capture.append(f"blocks.*.{freeze}")
    bad = run(model, corruption.tokens, capture=capture, interventions={"embed": Add(corruption.delta)},
              logits_at=-1)
    p_corrupt = jax.nn.softmax(bad.logits[:, -1].astype(jnp.float32), axis=-1)[:, answer].mean()
    clean_rows = {k: v[0] for k, v in clean.cache.items()}
    cells = _cells(kind, freeze, window, n_layers)
    rows = [jnp.broadcast_to(p_corrupt, (min(skip_before, seq), n_layers))]
    for ts in position_buckets(min(skip_before, seq), seq, buckets):
        s0 = int(ts[0])
        one = lambda t: _suffix_probs(model, s0, t, cells, clean_rows, bad.cache, answer, kind, freeze, n_rows)  # noqa: E731
        rows.append(jax.vmap(one)(jnp.asarray(ts)))
    return jnp.concatenate(rows), p_clean, p_corrupt, answer
