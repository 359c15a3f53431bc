"""Mamba-2's ``Family`` declaration: checkpoint mapping, axes, projections and the per-layer stepper
(Mamba's, run with the Mamba-2 mixer)."""

from __future__ import annotations

import numpy as np

from jaxinterp.families import Family, Projection, register_family
from jaxinterp.models.common import params_from_hf, params_to_hf
from jaxinterp.models.mamba.convert import canonical_tensors
from jaxinterp.models.mamba.family import MambaStepper, mixer_projections, param_shapes as mamba_param_shapes
from . import convert
from .config import Mamba2Config
from .model import Mamba2, Mixer, site_names

AXES_TABLE = [
    (r"^embed$", ("vocab", "embed")),
    (r"mixer/norm/scale$", ("d_inner",)),  # the gated norm's weight [Di]
    (r"(^|/)(norm|final_norm)/scale$", ("embed",)),
    (r"mixer/in_proj/kernel$", ("embed", "d_inner")),  # [D, Di + Cc + H]: z | x B C | dt
    (r"mixer/in_proj/bias$", ("d_inner",)),
    (r"mixer/conv1d/kernel$", ("conv", "d_inner")),  # depthwise conv taps [K, Cc]
    (r"mixer/conv1d/bias$", ("d_inner",)),
    (r"mixer/(dt_bias|A_log|D)$", ("heads",)),
    (r"mixer/out_proj/kernel$", ("d_inner", "embed")),
    (r"mixer/out_proj/bias$", ("embed",)),
    (r"^lm_head/kernel$", ("embed", "vocab")),
]


def param_shapes(cfg: Mamba2Config):
    return mamba_param_shapes(cfg, Mamba2(cfg), site_names(cfg))


def from_hf(cfg: Mamba2Config, tensors, dtype=np.float32, placer=None):
    renamed = canonical_tensors("mamba2", tensors, cfg.tie_embeddings)
    return params_from_hf("mamba2", convert.entries(cfg), param_shapes(cfg), renamed, cfg.n_layers, dtype,
                          placer=placer)


def to_hf(cfg: Mamba2Config, params):
    return params_to_hf(convert.entries(cfg), params, cfg.n_layers)


def projections(cfg: Mamba2Config) -> dict[str, Projection]:
    """``in_proj``'s columns are z | x B C | dt: ``in_proj_z`` writes ``in_z``, ``in_proj_x`` the
    convolution input ``in_x``; the dt columns are reachable through the whole ``in_proj`` only."""
    di = cfg.d_inner
    return mixer_projections(cfg, (di, di + cfg.conv_dim), (0, di))


FAMILY = register_family(Family(
    name="mamba2",
    config_cls=Mamba2Config,
    hf_model_types=("mamba2",),
    module=lambda cfg: Mamba2(cfg),
    site_names=site_names,
    from_hf=from_hf,
    to_hf=to_hf,
    param_axes=tuple(AXES_TABLE),
    projections=projections,
    rome_targets=lambda cfg: ("mixer.out_proj", "mixer.in_proj_x", "mixer.in_proj_z"),
    embedding=lambda params: params["embed"],
    attention=False,
    stepper=MambaStepper(mixer=Mixer, per_position=("mixer.in_z", "mixer.heads", "mixer.ssm_out", "mixer.gate",
                                                    "mixer.gated", "mixer_out")),
    trace_kinds=("resid_post", "mixer_out", "mixer.ssm_out", "mixer.gate"),
    trace_freeze=("mixer.ssm_out", "mixer.gate", "mixer_out"),
))
