"""The Mamba-2 mixer as a Flax module that emits every named site; the layer around it, the LM
shell, the cache handling and the per-layer stepper are Mamba's (``models.mamba``).

Site layouts (per block ``i``; B batch, T seq, D d_model, Di d_inner = expand * D = H * P,
H heads, P head_dim, G n_groups, N d_state, Cc = Di + 2 G N convolution channels, V vocab).
Head h owns channels ``[h P, (h + 1) P)`` of every ``Di``-wide site and reads B / C group
``h // (H / G)``, whose N entries are ``[g N, (g + 1) N)`` of the ``G N``-wide sites:

  embed                               [B, T, D]     token embeddings
  blocks.{i}.resid_pre                [B, T, D]     residual stream entering the block (float32
                                                    when ``residual_in_fp32``, as in HF)
  blocks.{i}.norm                     [B, T, D]     RMSNorm output (mixer input)
  blocks.{i}.mixer.in_x               [B, T, Cc]    convolution branch of in_proj: x | B | C
  blocks.{i}.mixer.in_z               [B, T, Di]    gate branch of in_proj (z)
  blocks.{i}.mixer.conv_out           [B, T, Cc]    causal depthwise conv1d (+ bias), before activation
  blocks.{i}.mixer.ssm_in             [B, T, Di]    x = act(conv_out)[:Di], the scan input
  blocks.{i}.mixer.delta              [B, T, H]     time step per head: softplus(dt + dt_bias)
                                                    clipped to ``dt_limit`` (dt: in_proj's last H
                                                    outputs); 0 at padded positions
  blocks.{i}.mixer.B / .C             [B, T, G N]   act(conv_out)'s B and C parts
  blocks.{i}.mixer.ssm_state          [B, T, Di, N] h_t after step t (h_{-1} = 0), each head's
                                                    [P, N] state at its channels; emitted only when
                                                    captured or intervened on, and then the output
                                                    is read from it: y_t = h_t C_t
  blocks.{i}.mixer.heads              [B, T, H, P]  y + D_h x per head (the scan output with skip)
  blocks.{i}.mixer.ssm_out            [B, T, Di]    ``heads`` with the heads flattened
  blocks.{i}.mixer.gate               [B, T, Di]    SiLU(in_z)
  blocks.{i}.mixer.gated              [B, T, Di]    RMSNorm over each of the G channel groups of
                                                    ssm_out * gate, times the norm weight (HF's
                                                    gate-then-norm, ``norm_before_gate=False``);
                                                    the input of out_proj
  blocks.{i}.mixer_out                [B, T, D]     out_proj output
  blocks.{i}.resid_post               [B, T, D]     resid_pre + mixer_out
  final_norm                          [B, T, D]     norm_f output (HF's last hidden state)

Names and ranks are Mamba-1's (per-channel sites are ``Di`` wide, the state ``[Di, N]``), so
tools written for Mamba read Mamba-2 unchanged; ``heads`` is the per-head view (masks
``[B, T, H]`` select heads) and ``delta`` is per head because Mamba-2's time step is.

HF parity: ``Mamba2Model`` records the embedding and then each block's output, with the last
entry replaced by ``norm_f``'s: ``hidden_states[0]`` = ``embed``, ``[i + 1]`` =
``blocks.{i}.resid_post`` for i < L - 1, ``[L]`` = ``final_norm`` (the transformer convention;
Mamba-1's differs).

Intervening on ``ssm_state`` changes the readout ``y_t = h_t C_t`` at the patched steps only (to
change what later steps remember, intervene on ``delta``, ``B`` or ``ssm_in``). With an attention
mask, padded positions' convolution inputs and activated outputs are zeroed (as HF does) and their
time step is 0, so a padded step leaves the state exactly as it was: left padding keeps it at zero
and the real tokens' outputs equal the unpadded run's. Sites hold the activation dtype except
``resid_pre``, ``resid_post`` and ``final_norm`` (float32 when ``residual_in_fp32``).

Parameter tree (per-layer parameters stacked on a leading ``layers`` axis): ``embed [V, D]``,
``layers/{norm/scale, mixer/{in_proj/kernel [D, Di + Cc + H] (columns z | x B C | dt) (+bias),
conv1d/{kernel [K, Cc], bias [Cc]}, dt_bias [H], A_log [H], D [H], norm/scale [Di],
out_proj/kernel [Di, D] (+bias)}}``, ``final_norm/scale``, and ``lm_head/kernel [D, V]`` when
untied. The cache is Mamba's: ``conv [L, B, K-1, Cc]`` (the last convolution inputs) and
``ssm [L, B, Di, N]`` (the state after the last token, heads flattened).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxinterp.models.common import ACTIVATIONS, INIT
from jaxinterp.models.mamba.model import CausalConv, Mamba, dt_bias_init
from .config import Mamba2Config
from .scan import ssd_outputs, ssd_readout, ssd_states

MIXER_SITES = ("in_x", "in_z", "conv_out", "ssm_in", "delta", "B", "C", "ssm_state", "heads", "ssm_out", "gate",
               "gated")


def site_names(cfg: Mamba2Config) -> tuple[str, ...]:
    per_layer = ["resid_pre", "norm", *(f"mixer.{s}" for s in MIXER_SITES), "mixer_out", "resid_post"]
    return ("embed", *(f"blocks.{i}.{s}" for i in range(cfg.n_layers) for s in per_layer), "final_norm")


def scan_method(cfg: Mamba2Config) -> str:
    """Resolve ``scan="auto"``: sequential on CPU (measured faster there), chunked on accelerators."""
    if cfg.scan != "auto":
        return cfg.scan
    return "sequential" if jax.default_backend() == "cpu" else "chunked"


def _a_log_init(key, shape, dtype=jnp.float32):
    return jnp.log(jnp.arange(1, shape[0] + 1, dtype=jnp.float32)).astype(dtype)  # A = -[1 .. H], as HF


class GatedRMSNorm(nn.Module):
    """``RMSNorm(y * SiLU(z))`` over ``groups`` equal channel groups, times ``scale`` (float32 inside)."""

    eps: float
    groups: int

    @nn.compact
    def __call__(self, y, gate):  # [B, T, Di] each
        scale = self.param("scale", nn.initializers.ones, (y.shape[-1],))
        v = y.astype(jnp.float32) * gate.astype(jnp.float32)
        v = v.reshape(*v.shape[:-1], self.groups, -1)
        v = v * jax.lax.rsqrt(jnp.mean(jnp.square(v), -1, keepdims=True) + self.eps)
        return v.reshape(y.shape).astype(y.dtype) * scale.astype(y.dtype)


class Mixer(nn.Module):
    cfg: Mamba2Config

    @nn.compact
    def __call__(self, x, sites, mask, cache):  # x [B, T, D]; mask [B, T] bool
        cfg = self.cfg
        dtype = x.dtype
        b, t, _ = x.shape
        di, cc, h, gn = cfg.d_inner, cfg.conv_dim, cfg.n_heads, cfg.n_groups * cfg.d_state
        proj = nn.Dense(di + cc + h, use_bias=cfg.use_bias, kernel_init=INIT, name="in_proj")(x)
        proj = sites.adapt("mixer.in_proj", x, proj)
        z, xbc, dt = jnp.split(proj, [di, di + cc], axis=-1)  # [B, T, Di], [B, T, Cc], [B, T, H]
        xbc = sites("mixer.in_x", xbc)
        z = sites("mixer.in_z", z)
        keep = mask[..., None].astype(dtype)  # [B, T, 1]
        conv, conv_state = CausalConv(cfg.d_conv, cfg.use_conv_bias, name="conv1d")(
            xbc * keep, None if cache is None else cache["conv"])
        conv = sites("mixer.conv_out", conv)
        u, b_mat, c_mat = jnp.split(ACTIVATIONS[cfg.activation](conv) * keep, [di, di + gn], axis=-1)
        u = sites("mixer.ssm_in", u)  # [B, T, Di]
        dt_bias = self.param("dt_bias", dt_bias_init, (h,))
        lo, hi = cfg.dt_limit
        delta = jnp.clip(jax.nn.softplus(dt.astype(jnp.float32) + dt_bias.astype(jnp.float32)), lo, hi)
        delta = sites("mixer.delta", (delta * mask[..., None]).astype(dtype))  # [B, T, H]
        b_mat = sites("mixer.B", b_mat).reshape(b, t, cfg.n_groups, cfg.d_state)  # [B, T, G, N]
        c_mat = sites("mixer.C", c_mat).reshape(b, t, cfg.n_groups, cfg.d_state)
        a = -jnp.exp(self.param("A_log", _a_log_init, (h,)).astype(jnp.float32))  # [H]
        d_skip = self.param("D", nn.initializers.ones, (h,)).astype(jnp.float32)
        u_heads = u.reshape(b, t, h, cfg.head_dim)  # [B, T, H, P]
        h0 = None if cache is None else cache["ssm"].reshape(b, h, cfg.head_dim, cfg.d_state)
        y, h_last = self._scan(sites, u_heads, delta, a, b_mat, c_mat, h0)  # [B, T, H, P] f32
        heads = sites("mixer.heads", (y + u_heads.astype(jnp.float32) * d_skip[:, None]).astype(dtype))
        ssm_out = sites("mixer.ssm_out", heads.reshape(b, t, di))
        gate = sites("mixer.gate", jax.nn.silu(z))
        gated = sites("mixer.gated", GatedRMSNorm(cfg.norm_eps, cfg.n_groups, name="norm")(ssm_out, gate))
        out = nn.Dense(cfg.d_model, use_bias=cfg.use_bias, kernel_init=INIT, name="out_proj")(gated)
        out = sites.adapt("mixer.out_proj", gated, out)
        new_cache = None if cache is None else {"conv": conv_state.astype(cache["conv"].dtype),
                                                "ssm": h_last.reshape(b, di, -1).astype(cache["ssm"].dtype)}
        return out, new_cache

    def _scan(self, sites, u, delta, a, b_mat, c_mat, h0):
        cfg = self.cfg
        method = scan_method(cfg)
        if sites.wants("mixer.ssm_state"):
            b, t, h, p = u.shape
            states = ssd_states(u, delta, a, b_mat, method=method, chunk=cfg.chunk_size, h0=h0)  # [B, T, H, P, N]
            seen = sites("mixer.ssm_state", states.reshape(b, t, h * p, -1).astype(u.dtype))
            return ssd_readout(seen.reshape(states.shape), c_mat), states[:, -1]
        return ssd_outputs(u, delta, a, b_mat, c_mat, method=method, chunk=cfg.chunk_size, h0=h0)


def Mamba2(cfg: Mamba2Config, **kw) -> Any:
    """The Mamba-2 LM: Mamba's layer and shell around the Mamba-2 mixer."""
    return Mamba(cfg, mixer=Mixer, **kw)
