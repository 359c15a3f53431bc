"""Mamba-1 as a Flax module that emits every named site.

Site layouts (per block ``i``; B batch, T seq, D d_model, Di d_inner = expand * D,
N d_state, V vocab):

  embed                               [B, T, D]   token embeddings
  blocks.{i}.resid_pre                [B, T, D]   residual stream entering the block (float32
                                                  when ``residual_in_fp32``, as in HF)
  blocks.{i}.norm                     [B, T, D]   RMSNorm output (mixer input)
  blocks.{i}.mixer.in_x               [B, T, Di]  first half of in_proj (SSM branch)
  blocks.{i}.mixer.in_z               [B, T, Di]  second half of in_proj (gate branch)
  blocks.{i}.mixer.conv_out           [B, T, Di]  causal depthwise conv1d (+ bias), before activation
  blocks.{i}.mixer.ssm_in             [B, T, Di]  u = SiLU(conv_out), the scan input
  blocks.{i}.mixer.delta              [B, T, Di]  softplus(dt_proj(x_proj(u)[:R]))
  blocks.{i}.mixer.B / .C             [B, T, N]   input-dependent SSM matrices
  blocks.{i}.mixer.ssm_state          [B, T, Di, N] h_t after step t (h_{-1} = 0); emitted only
                                                  when captured or intervened on, and then the
                                                  output is read from it: y_t = C_t . h_t
  blocks.{i}.mixer.ssm_out            [B, T, Di]  y + D * u (before gating)
  blocks.{i}.mixer.gate               [B, T, Di]  SiLU(in_z)
  blocks.{i}.mixer.gated              [B, T, Di]  ssm_out * gate (input of out_proj)
  blocks.{i}.mixer_out                [B, T, D]   out_proj output
  blocks.{i}.resid_post               [B, T, D]   resid_pre + mixer_out
  final_norm                          [B, T, D]   norm_f output (HF's last hidden state)

HF parity: Hugging Face's ``MambaModel`` records ``hidden_states`` after every block and then
after ``norm_f`` with no embedding entry, so ``blocks.{i}.resid_post`` equals HF's
``hidden_states[i]`` for every layer (the last one included) and ``final_norm`` equals
``hidden_states[n_layers]`` (transformer ports are shifted by one: their index 0 is the embedding).

Intervening on ``ssm_state`` changes the readout ``y_t = C_t . h_t`` at the patched steps; the
recurrence itself is not re-run from the patched state (to change what later steps remember,
intervene on ``delta``, ``B`` or ``ssm_in``).

The recurrence is h_t = exp(delta_t A) * h_{t-1} + delta_t B_t u_t with A = -exp(A_log)
``[Di, N]``; see ``scan.py``. Sites hold the activation dtype except ``resid_pre``,
``resid_post`` and ``final_norm``, which are float32 when ``residual_in_fp32``.

Parameter tree (mirrors HF names): ``embeddings [V, D]``, ``layers_{i}/{norm/scale,
mixer/{in_proj/kernel [D, 2Di] (+bias), conv1d/{kernel [K, Di], bias [Di]}, x_proj/kernel
[Di, R + 2N], dt_proj/{kernel [R, Di], bias [Di]}, A_log [Di, N], D [Di], out_proj/kernel
[Di, D] (+bias)}}``, ``norm_f/scale``, and ``lm_head/kernel [D, V]`` when untied.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxinterp.models.common import ACTIVATIONS, RMSNorm, unembed
from .config import MambaConfig
from .scan import readout, ssm_outputs, ssm_states

_init = nn.initializers.normal(0.02)
MIXER_SITES = ("in_x", "in_z", "conv_out", "ssm_in", "delta", "B", "C", "ssm_state", "ssm_out", "gate", "gated")


def site_names(cfg: MambaConfig) -> tuple[str, ...]:
    names = ["embed"]
    for i in range(cfg.n_layers):
        b = f"blocks.{i}"
        names += [f"{b}.resid_pre", f"{b}.norm", *(f"{b}.mixer.{s}" for s in MIXER_SITES), f"{b}.mixer_out",
                  f"{b}.resid_post"]
    names.append("final_norm")
    return tuple(names)


# ----------------------------------------------------------------------------- initialisers
# Mamba's own scheme (S4D-real A, D = 1, dt bias = softplus^-1 of a log-uniform step in
# [1e-3, 0.1]) so that ``ji.init`` gives a trainable model; loading ignores them.


def _scan_method(cfg: MambaConfig) -> str:
    """Resolve ``scan="auto"``: the sequential scan is much faster on CPU, the associative one on accelerators."""
    if cfg.scan != "auto":
        return cfg.scan
    return "sequential" if jax.default_backend() == "cpu" else "associative"


def _a_log_init(key, shape, dtype=jnp.float32):
    d_inner, n = shape
    return jnp.log(jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.float32), (d_inner, n))).astype(dtype)


def _dt_bias_init(key, shape, dtype=jnp.float32, dt_min=1e-3, dt_max=0.1, floor=1e-4):
    log_dt = jax.random.uniform(key, shape) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    dt = jnp.maximum(jnp.exp(log_dt), floor)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)  # inverse softplus


def _dt_kernel_init(key, shape, dtype=jnp.float32):
    bound = shape[0] ** -0.5
    return jax.random.uniform(key, shape, dtype, -bound, bound)


# ----------------------------------------------------------------------------- modules


class CausalConv(nn.Module):
    """Depthwise causal conv over time: ``out[t] = bias + sum_k kernel[k] * x[t - K + 1 + k]``."""

    width: int
    use_bias: bool

    @nn.compact
    def __call__(self, x):  # x [B, T, Di]
        d_inner, t = x.shape[-1], x.shape[1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(in_axis=0, out_axis=1), (self.width, d_inner))
        xp = jnp.pad(x, ((0, 0), (self.width - 1, 0), (0, 0)))  # [B, T + K - 1, Di]
        out = sum(xp[:, k:k + t] * kernel[k].astype(x.dtype) for k in range(self.width))
        if self.use_bias:
            out = out + self.param("bias", nn.initializers.zeros, (d_inner,)).astype(x.dtype)
        return out


class Mixer(nn.Module):
    cfg: MambaConfig
    layer: int

    @nn.compact
    def __call__(self, x, sites):  # x [B, T, D]
        cfg = self.cfg
        p = f"blocks.{self.layer}.mixer"
        dtype = x.dtype
        xz = nn.Dense(2 * cfg.d_inner, use_bias=cfg.use_bias, kernel_init=_init, name="in_proj")(x)  # [B, T, 2Di]
        x_in, z = jnp.split(xz, 2, axis=-1)
        x_in = sites(f"{p}.in_x", x_in)
        z = sites(f"{p}.in_z", z)
        conv = sites(f"{p}.conv_out", CausalConv(cfg.d_conv, cfg.use_conv_bias, name="conv1d")(x_in))
        u = sites(f"{p}.ssm_in", ACTIVATIONS[cfg.activation](conv))  # [B, T, Di]
        dbc = nn.Dense(cfg.dt_rank + 2 * cfg.d_state, use_bias=False, kernel_init=_init, name="x_proj")(u)
        dt_low, b_mat, c_mat = jnp.split(dbc, [cfg.dt_rank, cfg.dt_rank + cfg.d_state], axis=-1)
        dt = nn.Dense(cfg.d_inner, kernel_init=_dt_kernel_init, bias_init=_dt_bias_init, name="dt_proj")(dt_low)
        delta = sites(f"{p}.delta", jax.nn.softplus(dt.astype(jnp.float32)).astype(dtype))  # [B, T, Di]
        b_mat = sites(f"{p}.B", b_mat)  # [B, T, N]
        c_mat = sites(f"{p}.C", c_mat)  # [B, T, N]
        a_log = self.param("A_log", _a_log_init, (cfg.d_inner, cfg.d_state))
        d_skip = self.param("D", nn.initializers.ones, (cfg.d_inner,))
        a = -jnp.exp(a_log.astype(jnp.float32))  # [Di, N]
        y = self._scan(sites, f"{p}.ssm_state", u, delta, a, b_mat, c_mat)  # [B, T, Di] f32
        y = sites(f"{p}.ssm_out", (y + u.astype(jnp.float32) * d_skip.astype(jnp.float32)).astype(dtype))
        gate = sites(f"{p}.gate", jax.nn.silu(z))
        gated = sites(f"{p}.gated", y * gate)
        return nn.Dense(cfg.d_model, use_bias=cfg.use_bias, kernel_init=_init, name="out_proj")(gated)

    def _scan(self, sites, name, u, delta, a, b_mat, c_mat):
        cfg = self.cfg
        if sites.wants(name):
            states = ssm_states(u, delta, a, b_mat, method=_scan_method(cfg), chunk=cfg.scan_chunk)  # [B, T, Di, N]
            states = sites(name, states.astype(u.dtype))
            return readout(states, c_mat)
        return ssm_outputs(u, delta, a, b_mat, c_mat, method=_scan_method(cfg), chunk=cfg.scan_chunk)


class Block(nn.Module):
    cfg: MambaConfig
    layer: int

    @nn.compact
    def __call__(self, x, sites, dtype):
        b = f"blocks.{self.layer}"
        resid = sites(f"{b}.resid_pre", x.astype(jnp.float32) if self.cfg.residual_in_fp32 else x)
        h = sites(f"{b}.norm", RMSNorm(self.cfg.norm_eps, name="norm")(resid.astype(dtype)))
        out = sites(f"{b}.mixer_out", Mixer(self.cfg, self.layer, name="mixer")(h, sites))
        return sites(f"{b}.resid_post", resid + out.astype(resid.dtype))


class Mamba(nn.Module):
    cfg: MambaConfig

    @nn.compact
    def __call__(self, tokens, sites, logits_at=None):
        cfg = self.cfg
        emb = self.param("embeddings", _init, (cfg.vocab_size, cfg.d_model))
        x = sites("embed", jnp.take(emb, tokens, axis=0))  # [B, T, D]
        for i in range(cfg.n_layers):
            x = Block(cfg, i, name=f"layers_{i}")(x, sites, emb.dtype)
        x = sites("final_norm", RMSNorm(cfg.norm_eps, name="norm_f")(x))
        return unembed(x, emb, logits_at, tied=cfg.tie_embeddings, vocab_size=cfg.vocab_size, kernel_init=_init,
                       name="lm_head")


# ----------------------------------------------------------------------------- sharding

_AXES = {
    "embeddings": ("vocab", "embed"),
    "norm/scale": ("embed",),
    "norm_f/scale": ("embed",),
    "in_proj/kernel": ("embed", "d_inner"),
    "in_proj/bias": ("d_inner",),
    "conv1d/kernel": ("conv", "d_inner"),
    "conv1d/bias": ("d_inner",),
    "x_proj/kernel": ("d_inner", None),
    "dt_proj/kernel": (None, "d_inner"),
    "dt_proj/bias": ("d_inner",),
    "A_log": ("d_inner", "ssm_state"),
    "D": ("d_inner",),
    "out_proj/kernel": ("d_inner", "embed"),
    "out_proj/bias": ("embed",),
    "lm_head/kernel": ("embed", "vocab"),
}


def param_axes(cfg: MambaConfig):
    """Logical axis names of every parameter (same tree as the params)."""
    from jaxinterp.models.common import param_shapes
    from jaxinterp.sites import SiteContext

    shapes = param_shapes(Mamba(cfg), lambda: SiteContext(site_names(cfg)))

    def axes(path, leaf):
        keys = [str(getattr(k, "key", k)) for k in path]
        for n in (2, 1):
            if "/".join(keys[-n:]) in _AXES:
                names = _AXES["/".join(keys[-n:])]
                assert len(names) == leaf.ndim, (keys, names, leaf.shape)
                return names
        raise AssertionError(f"mamba: no logical axes for parameter {'/'.join(keys)}")

    return jax.tree_util.tree_map_with_path(axes, shapes)
