"""Mamba's ``Family`` declaration (Mamba-1 and Falcon-Mamba): checkpoint mapping, axes, projections, the
per-layer stepper. Falcon-Mamba's mixer norms have no weights, so both share every table here."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.families import Family, Projection, layer_slice, register_family
from jaxinterp.models.common import params_from_hf, params_to_hf
from . import convert
from .config import MambaConfig
from .model import Block, Mamba, Mixer, head, site_names

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


def param_shapes(cfg, module=None, sites=None):
    """The params tree of ``module`` (default ``Mamba(cfg)``, whose sites are ``sites``) as
    ShapeDtypeStructs (nothing allocated)."""
    from jaxinterp.sites import SiteContext

    module = Mamba(cfg) if module is None else module
    ctx = SiteContext(site_names(cfg) if sites is None else sites)

    def init():
        return module.init(jax.random.PRNGKey(0), jnp.zeros((1, 2), jnp.int32), ctx,
                           positions=jnp.zeros((1, 2), jnp.int32), k_valid=jnp.ones((1, 2), bool))["params"]

    return jax.eval_shape(init)


def from_hf(cfg: MambaConfig, tensors, dtype=np.float32, placer=None):
    renamed = convert.canonical_tensors(cfg.model_type, tensors, cfg.tie_embeddings)
    return params_from_hf(cfg.model_type, convert.entries(cfg), param_shapes(cfg), renamed, cfg.n_layers, dtype,
                          placer=placer)


def to_hf(cfg: MambaConfig, params):
    return params_to_hf(convert.entries(cfg), params, cfg.n_layers)


def mixer_projections(cfg, x_cols: tuple[int, int], z_cols: tuple[int, int]) -> dict[str, Projection]:
    """The mixer's ``in_proj`` (whole, and its SSM-branch / gate column ranges) and ``out_proj``."""
    m = "backbone.layers.{i}.mixer"
    path = lambda name, part: ("layers", "mixer", name, part)  # noqa: E731
    bias = lambda name: path(name, "bias") if cfg.use_bias else None  # noqa: E731
    in_proj = lambda out_site, cols: Projection(path("in_proj", "kernel"), bias("in_proj"), "norm", out_site,  # noqa: E731
                                                f"{m}.in_proj", cols=cols)
    return {
        "mixer.in_proj": in_proj(None, None),
        "mixer.in_proj_x": in_proj("mixer.in_x", x_cols),
        "mixer.in_proj_z": in_proj("mixer.in_z", z_cols),
        "mixer.out_proj": Projection(path("out_proj", "kernel"), bias("out_proj"), "mixer.gated", "mixer_out",
                                     f"{m}.out_proj"),
    }


def projections(cfg: MambaConfig) -> dict[str, Projection]:
    return mixer_projections(cfg, (0, cfg.d_inner), (cfg.d_inner, 2 * cfg.d_inner))


@dataclasses.dataclass(frozen=True)
class MambaStepper:
    """One layer at a time on positions ``[s0, s0 + S)``, continuing from the reference run's
    convolution inputs and SSM state before ``s0``.

    Any mixer whose ``in_x`` site is the convolution input ``[B, T, channels]``, whose
    ``ssm_state`` site is ``[B, T, Di, N]`` and whose cache is ``{"conv", "ssm"}`` in those layouts
    (Mamba-1, Falcon-Mamba, Mamba-2) runs here; ``mixer`` is its module class and
    ``per_position`` the sites whose value at token t changes no other position of the layer.
    """

    mixer: Any = Mixer
    per_position: tuple[str, ...] = ("mixer.in_z", "mixer.ssm_out", "mixer.gate", "mixer.gated", "mixer_out")
    state_sites: tuple[str, ...] = ("mixer.in_x", "mixer.ssm_state")

    @staticmethod
    def prefix_state(config, captures: Mapping[str, jax.Array], s0) -> dict:
        """Convolution inputs ``[s0 - K + 1, s0)`` and the SSM state after ``s0 - 1`` (``s0`` may be traced)."""
        x_in, states = captures["mixer.in_x"], captures["mixer.ssm_state"]  # [N, T, C], [N, T, Di, Ns]
        k = config.d_conv - 1
        padded = jnp.pad(x_in, ((0, 0), (k, 0), (0, 0)))  # position p sits at p + k
        conv = jax.lax.dynamic_slice_in_dim(padded, s0, k, axis=1)  # [N, K-1, C]
        ssm = jnp.where(s0 > 0, jnp.take(states, jnp.maximum(s0 - 1, 0), axis=1), 0)  # [N, Di, Ns]
        return {"conv": conv, "ssm": ssm.astype(jnp.float32)}

    def layer(self, model, layer: int, x, sites_ctx, state, s0: int):
        params = layer_slice(model.params["layers"], layer)
        env = {"mask": jnp.ones(x.shape[:2], bool)}
        block = Block(model.config, sites_ctx, dtype=model.params["embed"].dtype, mixer=self.mixer)
        out, _ = block.apply({"params": params}, x, {"layer": layer, "cache": state}, env)
        return out

    @staticmethod
    def head(model, x):
        return head(model.config, model.params, x)


FAMILY = register_family(Family(
    name="mamba",
    config_cls=MambaConfig,
    hf_model_types=("mamba", "falcon_mamba"),
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
