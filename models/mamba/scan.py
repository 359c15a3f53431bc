"""Selective scan of Mamba-1: h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t, y_t = C_t . h_t.

Layouts (per layer): u, delta ``[B, T, Di]``; A ``[Di, N]`` (already ``-exp(A_log)``);
B, C ``[B, T, N]``; states ``[B, T, Di, N]``; outputs ``[B, T, Di]``. Everything runs in
float32 whatever the model dtype, like the reference kernels.

Two interchangeable algorithms (``method``):

- ``"associative"``: ``lax.associative_scan`` over time on the (decay, input) pairs with
  (a1, b1) . (a2, b2) = (a1 a2, a2 b1 + b2). O(log T) depth; holds the ``[B, T, Di, N]`` pairs,
  or ``[B, chunk, Di, N]`` when ``chunk`` is set (chunks are then scanned one after another,
  carrying the state between them).
- ``"sequential"``: ``lax.scan`` over time. ``ssm_outputs`` then keeps a single ``[B, Di, N]``
  state and never materialises the per-step states.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["discretize", "ssm_states", "ssm_outputs", "readout"]


def discretize(u, delta, A, B):
    """Zero-order-hold decay ``exp(delta A)`` and Euler input ``delta B u``, both ``[..., Di, N]``."""
    u, delta, A, B = (a.astype(jnp.float32) for a in (u, delta, A, B))
    decay = jnp.exp(delta[..., None] * A)  # [..., Di, N]
    inp = (delta * u)[..., None] * B[..., None, :]  # [..., Di, N]
    return decay, inp


def readout(states, C):
    """``y_t = sum_n states_t[:, n] C_t[n]``: ``[B, T, Di, N] x [B, T, N] -> [B, T, Di]`` (float32)."""
    return jnp.einsum("btdn,btn->btd", states.astype(jnp.float32), C.astype(jnp.float32))


def _combine(left, right):
    a_l, b_l = left
    a_r, b_r = right
    return a_l * a_r, a_r * b_l + b_r


def _associative_chunk(decay, inp, h0):
    """States of one chunk ``[B, c, Di, N]`` given the state ``h0 [B, Di, N]`` before it."""
    cum_decay, cum_inp = jax.lax.associative_scan(_combine, (decay, inp), axis=1)
    return cum_decay * h0[:, None] + cum_inp


def _pad_time(x, multiple):
    pad = -x.shape[1] % multiple
    return jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))


def _chunked(u, delta, A, B, C, chunk, emit, h0):
    """Scan chunks of ``chunk`` steps in sequence; ``emit(states, C_chunk)`` is what each returns.

    Padded steps have delta = 0 (decay 1, input 0), so they leave the state unchanged.
    Returns ``(outputs, last state)``.
    """
    b, t, d = u.shape
    to_chunks = lambda x: jnp.moveaxis(_pad_time(x, chunk).reshape(b, -1, chunk, *x.shape[2:]), 1, 0)  # noqa: E731
    xs = tuple(to_chunks(x) for x in (u, delta, B, C))  # each [nc, B, c, ...]

    def step(h, x):
        u_c, dt_c, b_c, c_c = x
        states = _associative_chunk(*discretize(u_c, dt_c, A, b_c), h)  # [B, c, Di, N]
        return states[:, -1], emit(states, c_c)

    h_last, out = jax.lax.scan(step, h0, xs)
    out = jnp.moveaxis(out, 0, 1)  # [B, nc, c, ...]
    return out.reshape(b, -1, *out.shape[3:])[:, :t], h_last


def _sequential(u, delta, A, B, C, emit, h0):
    """``lax.scan`` over time; ``emit(h_t, C_t)`` is what each step returns. ``(outputs, last state)``."""
    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (u, delta, B, C))  # each [T, B, ...]

    def step(h, x):
        u_t, dt_t, b_t, c_t = x
        decay, inp = discretize(u_t, dt_t, A, b_t)  # [B, Di, N]
        h = decay * h + inp
        return h, emit(h, c_t)

    h_last, out = jax.lax.scan(step, h0, xs)
    return jnp.moveaxis(out, 0, 1), h_last


def _check_method(method: str, chunk) -> None:
    if method not in ("associative", "sequential"):
        raise ValueError(f"scan method must be 'associative' or 'sequential', got {method!r}")
    if chunk is not None and (not isinstance(chunk, int) or chunk <= 0):
        raise ValueError(f"scan chunk must be None or a positive int, got {chunk!r}")


def _h0(u, A, h0):
    return jnp.zeros((u.shape[0], *A.shape), jnp.float32) if h0 is None else h0.astype(jnp.float32)


def ssm_states(u, delta, A, B, *, method: str = "associative", chunk: int | None = None, h0=None):
    """Every state ``h_t`` (``[B, T, Di, N]``, float32), starting from ``h0`` (default h_{-1} = 0)."""
    _check_method(method, chunk)
    h0 = _h0(u, A, h0)
    C = jnp.zeros_like(B)  # unused by the state-emitting paths
    if method == "sequential":
        return _sequential(u, delta, A, B, C, lambda h, c: h, h0)[0]
    if chunk is not None and chunk < u.shape[1]:
        return _chunked(u, delta, A, B, C, chunk, lambda s, c: s, h0)[0]
    return _associative_chunk(*discretize(u, delta, A, B), h0)


def ssm_outputs(u, delta, A, B, C, *, method: str = "associative", chunk: int | None = None, h0=None):
    """``(y, h_last)``: ``y_t = C_t . h_t`` (``[B, T, Di]``, float32, without the D skip) and the last
    state ``[B, Di, N]``, holding as few states as the method allows."""
    _check_method(method, chunk)
    h0 = _h0(u, A, h0)
    if method == "sequential":
        return _sequential(u, delta, A, B, C, lambda h, c: jnp.einsum("bdn,bn->bd", h, c.astype(jnp.float32)), h0)
    if chunk is not None and chunk < u.shape[1]:
        return _chunked(u, delta, A, B, C, chunk, lambda s, c: readout(s, c), h0)
    states = ssm_states(u, delta, A, B, method=method, h0=h0)
    return readout(states, C), states[:, -1]
