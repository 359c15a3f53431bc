"""The Mamba-2 (SSD) scan: per head h, with scalar ``A_h < 0`` and time step ``dt_t``,

    h_t = exp(dt_t A_h) h_{t-1} + dt_t x_t B_t^T        (state [P, N] per head)
    y_t = h_t C_t                                        (output [P] per head, without the D skip)

Layouts (per layer): x ``[B, T, H, P]``, dt ``[B, T, H]``, A ``[H]`` (already ``-exp(A_log)``),
B, C ``[B, T, G, N]`` (head h reads group ``h // (H / G)``), states ``[B, T, H, P, N]``, outputs
``[B, T, H, P]``. Everything runs in float32 whatever the model dtype. A step with ``dt = 0``
leaves the state unchanged (decay 1, input 0): padding and chunk padding rely on it.

Two interchangeable algorithms (``method``):

- ``"chunked"``: the state-space-duality form (Dao & Gu 2024). Inside a chunk of c steps the
  outputs are an attention-like product ``y_l = sum_{s<=l} (C_l . B_s) exp(a_{s+1} + ... + a_l) dt_s x_s``
  (``a = dt A``); each chunk's contribution to the state after it is one contraction, and a
  recurrence over the T / c chunk states carries the state across chunks. Matmul-heavy, O(T c)
  work per head channel. Every step's state (``ssd_states``) comes from an associative scan
  instead: the chunked form would cost c times more for them.
- ``"sequential"``: ``lax.scan`` over time, one ``[B, H, P, N]`` state in the carry.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["ssd_outputs", "ssd_states", "ssd_readout", "METHODS"]

METHODS = ("chunked", "sequential")


def _grouped(x, dt, A, n_groups: int):
    """Heads split as ``[G, R]`` (R heads per group), in float32: x ``[B, T, G, R, P]``, dt ``[B, T, G, R]``,
    A ``[G, R]``."""
    b, t, h, p = x.shape
    r = h // n_groups
    return (x.astype(jnp.float32).reshape(b, t, n_groups, r, p), dt.astype(jnp.float32).reshape(b, t, n_groups, r),
            A.astype(jnp.float32).reshape(n_groups, r))


def _h0(x, n_state: int, h0):
    b, _, h, p = x.shape
    return jnp.zeros((b, h, p, n_state), jnp.float32) if h0 is None else h0.astype(jnp.float32)


def _check(method: str, chunk: int, x, B) -> None:
    if method not in METHODS:
        raise ValueError(f"SSD scan method must be one of {METHODS}, got {method!r}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0:
        raise ValueError(f"SSD chunk must be a positive int, got {chunk!r}")
    if x.shape[2] % B.shape[2]:
        raise ValueError(f"{B.shape[2]} groups do not divide {x.shape[2]} heads")


def ssd_readout(states, C):
    """``y_t = h_t C_t`` per head: ``[B, T, H, P, N] x [B, T, G, N] -> [B, T, H, P]`` (float32)."""
    b, t, h, p, n = states.shape
    g = C.shape[2]
    s = states.astype(jnp.float32).reshape(b, t, g, h // g, p, n)
    return jnp.einsum("btgrpn,btgn->btgrp", s, C.astype(jnp.float32)).reshape(b, t, h, p)


# ----------------------------------------------------------------------------- sequential


def _sequential(x, dt, A, B, C, h0, emit):
    """``lax.scan`` over time; ``emit(h [B, G, R, P, N], C_t [B, G, N])`` per step. ``(outputs, last state)``."""
    b, _, g, r, p = x.shape
    xs = tuple(jnp.moveaxis(a, 1, 0) for a in (x, dt, B.astype(jnp.float32), C.astype(jnp.float32)))

    def step(h, inp):
        x_t, dt_t, b_t, c_t = inp  # [B, G, R, P], [B, G, R], [B, G, N], [B, G, N]
        decay = jnp.exp(dt_t * A)[..., None, None]  # [B, G, R, 1, 1]
        h = decay * h + (dt_t[..., None] * x_t)[..., None] * b_t[:, :, None, None, :]
        return h, emit(h, c_t)

    h_last, out = jax.lax.scan(step, h0.reshape(b, g, r, p, -1), xs)
    return jnp.moveaxis(out, 0, 1), h_last


# ----------------------------------------------------------------------------- chunked (SSD)


def _segment_sums(a):
    """``out[..., l, s] = a[..., s+1] + ... + a[..., l]`` for ``l >= s`` (0 on the diagonal), -inf above it.

    Summed as a masked cumulative sum rather than a difference of prefix sums, so long chunks lose
    no precision to cancellation.
    """
    c = a.shape[-1]
    strictly_lower = jnp.tril(jnp.ones((c, c), bool), -1)  # [l, s]: l > s
    terms = jnp.where(strictly_lower, a[..., :, None], 0.0)  # [..., k, s] = a_k for k > s
    sums = jnp.cumsum(terms, axis=-2)  # [..., l, s] = sum_{s < k <= l} a_k
    return jnp.where(jnp.tril(jnp.ones((c, c), bool)), sums, -jnp.inf)


def _to_chunks(a, chunk: int):
    """``[B, T, ...] -> [B, T/c, c, ...]``, zero-padding time (dt = 0 there: the state is unchanged)."""
    pad = -a.shape[1] % chunk
    a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
    return a.reshape(a.shape[0], -1, chunk, *a.shape[2:])


def _chunked(x, dt, A, B, C, h0, chunk: int):
    """``(y [B, T, G, R, P], last state [B, G, R, P, N])`` by the SSD chunked algorithm."""
    b, t, g, r, p = x.shape
    xdt = x * dt[..., None]  # [B, T, G, R, P]
    xdt_c, a_c, b_c, c_c = (_to_chunks(v, chunk) for v in (xdt, dt * A, B.astype(jnp.float32),
                                                            C.astype(jnp.float32)))
    a_c = jnp.moveaxis(a_c, 2, -1)  # [B, Z, G, R, c]: log decay of each step
    decay = jnp.exp(_segment_sums(a_c))  # [B, Z, G, R, l, s]: from after step s to step l
    # 1. Inside each chunk: y_l = sum_{s <= l} (C_l . B_s) decay[l, s] dt_s x_s.
    scores = jnp.einsum("bzlgn,bzsgn->bzgls", c_c, b_c)  # [B, Z, G, l, s]
    y = jnp.einsum("bzgrls,bzsgrp->bzlgrp", decay * scores[:, :, :, None], xdt_c)
    # 2. Each chunk's own contribution to the state after its last step.
    local = jnp.einsum("bzgrs,bzsgrp,bzsgn->bzgrpn", decay[..., -1, :], xdt_c, b_c)  # [B, Z, G, R, P, N]
    # 3. Carry the state across chunks: h_end(z) = exp(sum of a over chunk z) h_end(z - 1) + local(z).
    whole = jnp.exp(jnp.sum(a_c, axis=-1))  # [B, Z, G, R]

    def step(h, inp):
        w, loc = inp
        return w[..., None, None] * h + loc, h  # emits the state before the chunk

    h_last, h_start = jax.lax.scan(step, h0.reshape(b, g, r, p, -1),
                                   (jnp.moveaxis(whole, 1, 0), jnp.moveaxis(local, 1, 0)))
    h_start = jnp.moveaxis(h_start, 0, 1)  # [B, Z, G, R, P, N]
    # 4. The state before the chunk, decayed to step l and read out by C_l.
    from_start = jnp.exp(jnp.cumsum(a_c, axis=-1))  # [B, Z, G, R, l]
    y = y + jnp.einsum("bzlgn,bzgrpn->bzlgrp", c_c, h_start) * jnp.moveaxis(from_start, -1, 2)[..., None]
    return y.reshape(b, -1, g, r, p)[:, :t], h_last


def _associative_states(x, dt, A, B, h0):
    """Every state ``[B, T, G, R, P, N]`` by ``lax.associative_scan`` over (decay, input) pairs."""
    b, _, g, r, p = x.shape
    decay = jnp.exp(dt * A)[..., None, None]  # [B, T, G, R, 1, 1]
    inp = (dt[..., None] * x)[..., None] * B.astype(jnp.float32)[:, :, :, None, None, :]  # [B, T, G, R, P, N]

    def combine(left, right):
        return left[0] * right[0], right[0] * left[1] + right[1]

    cum_decay, cum_inp = jax.lax.associative_scan(combine, (decay, inp), axis=1)
    return cum_decay * h0.reshape(b, 1, g, r, p, -1) + cum_inp


# ----------------------------------------------------------------------------- API


def ssd_outputs(x, dt, A, B, C, *, method: str = "chunked", chunk: int = 256, h0=None):
    """``(y [B, T, H, P], h_last [B, H, P, N])`` (float32, no D skip) from ``h0`` (default zeros),
    never holding every step's state."""
    _check(method, chunk, x, B)
    b, t, h, p = x.shape
    h0 = _h0(x, B.shape[-1], h0)
    xg, dtg, ag = _grouped(x, dt, A, B.shape[2])
    if method == "sequential":
        y, h_last = _sequential(xg, dtg, ag, B, C, h0, lambda s, c: jnp.einsum("bgrpn,bgn->bgrp", s, c))
    else:
        y, h_last = _chunked(xg, dtg, ag, B, C, h0, min(chunk, t))
    return y.reshape(b, t, h, p), h_last.reshape(h0.shape)


def ssd_states(x, dt, A, B, *, method: str = "chunked", chunk: int = 256, h0=None):
    """Every state ``h_t`` ``[B, T, H, P, N]`` (float32) from ``h0`` (default zeros)."""
    _check(method, chunk, x, B)
    b, t, h, p = x.shape
    h0 = _h0(x, B.shape[-1], h0)
    xg, dtg, ag = _grouped(x, dt, A, B.shape[2])
    if method == "sequential":
        states = _sequential(xg, dtg, ag, B, B, h0, lambda s, c: s)[0]
    else:
        states = _associative_states(xg, dtg, ag, B, h0)
    return states.reshape(b, t, h, p, -1)
