"""Mamba-1 (and Falcon-Mamba: ``MambaConfig.mixer_norm_eps``) as a Flax module that emits every named site.

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
                                                  (Falcon-Mamba: delta's x_proj input, B and C are
                                                  RMS-normalised without weight first; the sites
                                                  hold the normalised B and C the scan uses)
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
``[Di, N]``; see ``scan.py``. With an attention mask, padded positions' SSM inputs are zeroed (as
Hugging Face does: before the convolution and after its activation), so left padding leaves the
state at zero and the real tokens' outputs equal the unpadded run's. Sites hold the activation dtype except ``resid_pre``,
``resid_post`` and ``final_norm``, which are float32 when ``residual_in_fp32``.

Parameter tree (per-layer parameters stacked on a leading ``layers`` axis): ``embed [V, D]``,
``layers/{norm/scale, mixer/{in_proj/kernel [D, 2Di] (+bias), conv1d/{kernel [K, Di], bias [Di]},
x_proj/kernel [Di, R + 2N], dt_proj/{kernel [R, Di], bias [Di]}, A_log [Di, N], D [Di],
out_proj/kernel [Di, D] (+bias)}}``, ``final_norm/scale``, and ``lm_head/kernel [D, V]`` when untied.

``Mamba.__call__`` returns ``(logits, cache)``; a cache holds per layer the last ``K - 1``
convolution inputs ``conv [L, B, K-1, Di]`` and the SSM state ``ssm [L, B, Di, N]`` after the last
token, so a later call continues the sequence (generation, incremental causal tracing).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxinterp.models.common import ACTIVATIONS, INIT, RMSNorm, gather_positions
from jaxinterp.models.transformer.model import scan_layers
from .config import MambaConfig
from .scan import readout, ssm_outputs, ssm_states

MIXER_SITES = ("in_x", "in_z", "conv_out", "ssm_in", "delta", "B", "C", "ssm_state", "ssm_out", "gate", "gated")


def site_names(cfg: MambaConfig) -> tuple[str, ...]:
    per_layer = ["resid_pre", "norm", *(f"mixer.{s}" for s in MIXER_SITES), "mixer_out", "resid_post"]
    return ("embed", *(f"blocks.{i}.{s}" for i in range(cfg.n_layers) for s in per_layer), "final_norm")


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


def dt_bias_init(key, shape, dtype=jnp.float32, dt_min=1e-3, dt_max=0.1, floor=1e-4):
    log_dt = jax.random.uniform(key, shape) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
    dt = jnp.maximum(jnp.exp(log_dt), floor)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)  # inverse softplus


def _dt_kernel_init(key, shape, dtype=jnp.float32):
    bound = shape[0] ** -0.5
    return jax.random.uniform(key, shape, dtype, -bound, bound)


# ----------------------------------------------------------------------------- modules


def weightless_rms(x, eps: float):
    """``x / sqrt(mean(x^2) + eps)`` over the last axis, computed in float32 (Falcon-Mamba's mixer norms)."""
    xf = x.astype(jnp.float32)
    return (xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), -1, keepdims=True) + eps)).astype(x.dtype)


class CausalConv(nn.Module):
    """Depthwise causal conv over time: ``out[t] = bias + sum_k kernel[k] * x[t - K + 1 + k]``.

    ``state [B, K-1, Di]``: the inputs before ``x`` (zeros at the start of a sequence). Returns the
    outputs and the last ``K - 1`` inputs (the next call's state).
    """

    width: int
    use_bias: bool

    @nn.compact
    def __call__(self, x, state=None):  # x [B, T, Di]
        d_inner, t = x.shape[-1], x.shape[1]
        kernel = self.param("kernel", nn.initializers.lecun_normal(in_axis=0, out_axis=1), (self.width, d_inner))
        if state is None:
            state = jnp.zeros((x.shape[0], self.width - 1, d_inner), x.dtype)
        xp = jnp.concatenate([state.astype(x.dtype), x], axis=1)  # [B, T + K - 1, Di]
        out = sum(xp[:, k:k + t] * kernel[k].astype(x.dtype) for k in range(self.width))
        if self.use_bias:
            out = out + self.param("bias", nn.initializers.zeros, (d_inner,)).astype(x.dtype)
        return out, xp[:, t:]


class Mixer(nn.Module):
    cfg: MambaConfig

    @nn.compact
    def __call__(self, x, sites, mask, cache):  # x [B, T, D]; mask [B, T] bool
        cfg = self.cfg
        dtype = x.dtype
        dense = lambda n, name, **kw: nn.Dense(n, kernel_init=INIT, name=name, **kw)  # noqa: E731
        xz = sites.adapt("mixer.in_proj", x, dense(2 * cfg.d_inner, "in_proj", use_bias=cfg.use_bias)(x))
        x_in, z = jnp.split(xz, 2, axis=-1)  # [B, T, Di] each
        x_in = sites("mixer.in_x", x_in)
        z = sites("mixer.in_z", z)
        keep = mask[..., None].astype(dtype)  # [B, T, 1]
        conv, conv_state = CausalConv(cfg.d_conv, cfg.use_conv_bias, name="conv1d")(
            x_in * keep, None if cache is None else cache["conv"])
        conv = sites("mixer.conv_out", conv)
        u = sites("mixer.ssm_in", ACTIVATIONS[cfg.activation](conv) * keep)  # [B, T, Di]
        dbc = dense(cfg.dt_rank + 2 * cfg.d_state, "x_proj", use_bias=False)(u)
        dt_low, b_mat, c_mat = jnp.split(dbc, [cfg.dt_rank, cfg.dt_rank + cfg.d_state], axis=-1)
        if cfg.mixer_norm_eps is not None:  # Falcon-Mamba
            dt_low, b_mat, c_mat = (weightless_rms(a, cfg.mixer_norm_eps) for a in (dt_low, b_mat, c_mat))
        dt = nn.Dense(cfg.d_inner, kernel_init=_dt_kernel_init, bias_init=dt_bias_init, name="dt_proj")(dt_low)
        delta = sites("mixer.delta", jax.nn.softplus(dt.astype(jnp.float32)).astype(dtype))  # [B, T, Di]
        b_mat = sites("mixer.B", b_mat)  # [B, T, N]
        c_mat = sites("mixer.C", c_mat)  # [B, T, N]
        a_log = self.param("A_log", _a_log_init, (cfg.d_inner, cfg.d_state))
        d_skip = self.param("D", nn.initializers.ones, (cfg.d_inner,))
        a = -jnp.exp(a_log.astype(jnp.float32))  # [Di, N]
        h0 = None if cache is None else cache["ssm"]
        y, h_last = self._scan(sites, u, delta, a, b_mat, c_mat, h0)  # [B, T, Di] f32
        y = sites("mixer.ssm_out", (y + u.astype(jnp.float32) * d_skip.astype(jnp.float32)).astype(dtype))
        gate = sites("mixer.gate", jax.nn.silu(z))
        gated = sites("mixer.gated", y * gate)
        out = sites.adapt("mixer.out_proj", gated, dense(cfg.d_model, "out_proj", use_bias=cfg.use_bias)(gated))
        new_cache = None if cache is None else {"conv": conv_state.astype(cache["conv"].dtype),
                                                "ssm": h_last.astype(cache["ssm"].dtype)}
        return out, new_cache

    def _scan(self, sites, u, delta, a, b_mat, c_mat, h0):
        cfg = self.cfg
        method = _scan_method(cfg)
        if sites.wants("mixer.ssm_state"):
            states = ssm_states(u, delta, a, b_mat, method=method, chunk=cfg.scan_chunk, h0=h0)  # [B, T, Di, N]
            seen = sites("mixer.ssm_state", states.astype(u.dtype))
            return readout(seen, c_mat), states[:, -1]
        return ssm_outputs(u, delta, a, b_mat, c_mat, method=method, chunk=cfg.scan_chunk, h0=h0)


class Block(nn.Module):
    """One Mamba layer with ``nn.scan``'s signature (see ``models.transformer.model.Block``).

    ``mixer``: the mixer module class, ``(cfg, name=) -> (x, sites, mask, cache) -> (out, cache)``
    (Mamba-1's here; Mamba-2 brings its own and shares the rest of the layer and the model).
    """

    cfg: Any
    sites_ctx: Any
    dtype: Any = jnp.float32  # the activation dtype (the embedding's)
    mixer: Any = Mixer

    @nn.compact
    def __call__(self, x, xs, env):
        cfg = self.cfg
        s = self.sites_ctx.at_layer(xs["layer"])
        resid = s("resid_pre", x)
        h = s("norm", RMSNorm(cfg.norm_eps, name="norm")(resid.astype(self.dtype)))
        out, new_cache = self.mixer(cfg, name="mixer")(h, s, env["mask"], xs.get("cache"))
        out = s("mixer_out", out)
        return s("resid_post", resid + out.astype(resid.dtype)), (s.captured, new_cache)


class Mamba(nn.Module):
    """The Mamba LM. ``n_run``: run only the first ``n_run`` layers (their parameters sliced by the
    caller) and return no logits (``run(..., stop_at=)``). ``mixer``: see ``Block``."""

    cfg: Any
    remat: Optional[str] = None
    n_run: Optional[int] = None
    mixer: Any = Mixer

    @nn.compact
    def __call__(self, tokens, sites, *, positions, k_valid, logits_at=None, cache=None, write_index=0):
        cfg = self.cfg
        emb = self.param("embed", INIT, (cfg.vocab_size, cfg.d_model))
        x = sites("embed", jnp.take(emb, tokens, axis=0))  # [B, T, D]
        if cfg.residual_in_fp32:
            x = x.astype(jnp.float32)
        t = tokens.shape[1]
        mask = k_valid if k_valid.shape[1] == t else jax.lax.dynamic_slice_in_dim(k_valid, write_index, t, axis=1)
        env = {"mask": mask}
        n_run = cfg.n_layers if self.n_run is None else self.n_run
        xs = {"layer": jnp.arange(n_run)}
        if cache is not None:
            xs["cache"] = cache
        layers = scan_layers(Block, n_run, self.remat, cfg=cfg, sites_ctx=sites, dtype=emb.dtype, mixer=self.mixer,
                             name="layers")
        x, (captured, new_cache) = layers(x, xs, env)
        sites.finish_layers(captured, n_run)
        if n_run < cfg.n_layers:
            return None, new_cache
        x = sites("final_norm", RMSNorm(cfg.norm_eps, name="final_norm")(x))
        x = gather_positions(x, logits_at).astype(emb.dtype)
        if cfg.tie_embeddings:
            return jnp.einsum("...d,vd->...v", x, emb), new_cache
        return nn.Dense(cfg.vocab_size, use_bias=False, kernel_init=INIT, name="lm_head")(x), new_cache


def head(cfg, params, x):
    """``final_norm`` + unembedding of ``x [..., D]``."""
    emb = params["embed"]
    h = RMSNorm(cfg.norm_eps).apply({"params": params["final_norm"]}, x).astype(emb.dtype)
    return jnp.einsum("...d,vd->...v", h, emb) if cfg.tie_embeddings else h @ params["lm_head"]["kernel"]
