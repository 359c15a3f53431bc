"""Mamba's ``Family`` declaration: checkpoint mapping, axes, projections, the per-layer stepper."""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.families import Family, Projection, layer_slice, register_family
from jaxinterp.hf import ConversionError
from jaxinterp.models.common import params_from_hf, params_to_hf
from . import convert
from .config import MambaConfig
from .model import Block, Mamba, head, site_names

AXES_TABLE = [
    (r"^embed$", ("vocab", "embed")),
    (r"(^|/)(norm|final_norm)/scale$", ("embed",)),
    (r"mixer/in_proj/kernel$", ("embed", "d_inner")),
    (r"mixer/in_proj/bias$", ("d_inner",)),
    (r"mixer/conv1d/kernel$", ("conv", "d_inner")),  # depthwise conv taps [K, Di]
    (r"mixer/conv1d/bias$", ("d_inner",)),
    (r"mixer/x_proj/kernel$", ("d_inner", None)),  # [Di, dt_rank + 2N]
    (r"mixer/dt_proj/kernel$", (None, "d_inner")),  # [dt_rank, Di]
    (r"mixer/dt_proj/bias$", ("d_inner",)),
    (r"mixer/A_log$", ("d_inner", "ssm_state")),
    (r"mixer/D$", ("d_inner",)),
    (r"mixer/out_proj/kernel$", ("d_inner", "embed")),
    (r"mixer/out_proj/bias$", ("embed",)),
    (r"^lm_head/kernel$", ("embed", "vocab")),
]


def param_shapes(cfg: MambaConfig):
    from jaxinterp.sites import SiteContext

    def init():
        return Mamba(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32), SiteContext(site_names(cfg)),
                               positions=jnp.zeros((1, 2), jnp.int32), k_valid=jnp.ones((1, 2), bool))["params"]

    return jax.eval_shape(init)


def from_hf(cfg: MambaConfig, tensors, dtype=np.float32, placer=None):
    renamed = {}
    for k, v in tensors.items():
        if convert.canonical(k) in renamed:
            raise ConversionError(f"mamba checkpoint holds two names for {convert.canonical(k)!r}; expected one")
        renamed[convert.canonical(k)] = v
    if cfg.tie_embeddings:
        renamed.pop("lm_head.weight", None)  # some exports write the tied copy explicitly
    return params_from_hf("mamba", convert.entries(cfg), param_shapes(cfg), renamed, cfg.n_layers, dtype,
                          placer=placer)


def to_hf(cfg: MambaConfig, params):
    return params_to_hf(convert.entries(cfg), params, cfg.n_layers)


def projections(cfg: MambaConfig) -> dict[str, Projection]:
    m, di = "backbone.layers.{i}.mixer", cfg.d_inner
    path = lambda name, part: ("layers", "mixer", name, part)  # noqa: E731
    bias = lambda name: path(name, "bias") if cfg.use_bias else None  # noqa: E731
    return {
        "mixer.in_proj": Projection(path("in_proj", "kernel"), bias("in_proj"), "norm", None, f"{m}.in_proj"),
        "mixer.in_proj_x": Projection(path("in_proj", "kernel"), bias("in_proj"), "norm", "mixer.in_x",
                                      f"{m}.in_proj", cols=(0, di)),
        "mixer.in_proj_z": Projection(path("in_proj", "kernel"), bias("in_proj"), "norm", "mixer.in_z",
                                      f"{m}.in_proj", cols=(di, 2 * di)),
        "mixer.out_proj": Projection(path("out_proj", "kernel"), bias("out_proj"), "mixer.gated", "mixer_out",
                                     f"{m}.out_proj"),
    }


class MambaStepper:
    """One layer at a time on positions ``[s0, s0 + S)``, continuing from the reference run's
    convolution inputs and SSM state before ``s0``."""

    state_sites = ("mixer.in_x", "mixer.ssm_state")
    # Restoring these at token t changes no other position of the same layer.
    per_position = ("mixer.in_z", "mixer.ssm_out", "mixer.gate", "mixer.gated", "mixer_out")

    @staticmethod
    def prefix_state(config: MambaConfig, captures: Mapping[str, jax.Array], s0) -> dict:
        """Convolution inputs ``[s0 - K + 1, s0)`` and the SSM state after ``s0 - 1`` (``s0`` may be traced)."""
        x_in, states = captures["mixer.in_x"], captures["mixer.ssm_state"]  # [N, T, Di], [N, T, Di, Ns]
        k = config.d_conv - 1
        padded = jnp.pad(x_in, ((0, 0), (k, 0), (0, 0)))  # position p sits at p + k
        conv = jax.lax.dynamic_slice_in_dim(padded, s0, k, axis=1)  # [N, K-1, Di]
        ssm = jnp.where(s0 > 0, jnp.take(states, jnp.maximum(s0 - 1, 0), axis=1), 0)  # [N, Di, Ns]
        return {"conv": conv, "ssm": ssm.astype(jnp.float32)}

    @staticmethod
    def layer(model, layer: int, x, sites_ctx, state, s0: int):
        params = layer_slice(model.params["layers"], layer)
        env = {"mask": jnp.ones(x.shape[:2], bool)}
        block = Block(model.config, sites_ctx, dtype=model.params["embed"].dtype)
        out, _ = block.apply({"params": params}, x, {"layer": layer, "cache": state}, env)
        return out

    @staticmethod
    def head(model, x):
        return head(model.config, model.params, x)


FAMILY = register_family(Family(
    name="mamba",
    config_cls=MambaConfig,
    hf_model_types=("mamba",),
    module=lambda cfg: Mamba(cfg),
    site_names=site_names,
    from_hf=from_hf,
    to_hf=to_hf,
    param_axes=tuple(AXES_TABLE),
    projections=projections,
    rome_targets=lambda cfg: ("mixer.out_proj", "mixer.in_proj_x", "mixer.in_proj_z"),
    embedding=lambda params: params["embed"],
    attention=False,
    stepper=MambaStepper(),
    trace_kinds=("resid_post", "mixer_out", "mixer.ssm_out", "mixer.gate"),
    trace_freeze=("mixer.ssm_out", "mixer.gate", "mixer_out"),
))
