"""Mamba-1 / Falcon-Mamba configuration (frozen, keyword-only) and its mapping to/from HF config.json.

Falcon-Mamba (``model_type: falcon_mamba``) is Mamba-1 with weightless RMS normalisation of the
time-step input, B and C inside the mixer: one flag (``mixer_norm_eps``), not a separate port.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from jaxinterp.hf import ConversionError, check_config_fields
from jaxinterp.models.common import check_activation

_HANDLED = {
    "vocab_size", "hidden_size", "state_size", "num_hidden_layers", "layer_norm_epsilon", "expand",
    "intermediate_size", "conv_kernel", "use_bias", "use_conv_bias", "hidden_act", "residual_in_fp32",
    "time_step_rank", "tie_word_embeddings",
}
# Initialisation-only fields, and HF's choice among equivalent torch scan implementations: none of
# them changes what the forward pass computes.
_IGNORED = {
    "time_step_scale", "time_step_min", "time_step_max", "time_step_init_scheme", "time_step_floor",
    "rescale_prenorm_residual", "use_mambapy", "use_associative_scan",
}
SCANS = ("auto", "associative", "sequential")
MODEL_TYPES = ("mamba", "falcon_mamba")
# Falcon-Mamba adds the mixer norms' epsilon; ``use_falcon_mambapy`` picks a torch scan implementation.
_FALCON_HANDLED = {"mixer_rms_eps"}
_FALCON_IGNORED = {"use_falcon_mambapy"}
_ARCHITECTURES = {"mamba": "MambaForCausalLM", "falcon_mamba": "FalconMambaForCausalLM"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class MambaConfig:
    """Mamba-1 language model (and Falcon-Mamba, with ``mixer_norm_eps`` set).

    Attributes:
      vocab_size, d_model, n_layers: embedding table, residual width, number of blocks.
      d_state: SSM state size N per channel (HF ``state_size``).
      expand: d_inner = expand * d_model (HF ``intermediate_size``).
      d_conv: causal depthwise convolution width K (HF ``conv_kernel``).
      dt_rank: rank R of the time-step projection; ``"auto"`` resolves to ceil(d_model / 16).
      use_bias: bias in in_proj / out_proj. use_conv_bias: bias in the convolution.
      activation: activation after the convolution (HF ``hidden_act``); the gate is always SiLU.
      norm_eps: RMSNorm epsilon. residual_in_fp32: keep the residual stream in float32.
      tie_embeddings: the unembedding is the embedding matrix.
      scan: ``"auto"`` (sequential on CPU, where it measured ~6x faster, associative on
        GPU/TPU), ``"associative"`` (``lax.associative_scan`` over time; parallel, keeps per-step
        decay/input pairs) or ``"sequential"`` (``lax.scan``; never holds more than one state
        per sequence unless ``ssm_state`` is captured or intervened on).
      scan_chunk: with an associative scan, scan chunks of this many steps one after another
        (memory O(chunk) instead of O(T)); None scans the whole sequence at once.
      mixer_norm_eps: Falcon-Mamba (HF ``mixer_rms_eps``): the mixer RMS-normalises, without a
        weight and in float32, the time-step input (x_proj's first ``dt_rank`` outputs, before
        dt_proj), B and C, each over its last axis, with this epsilon. None: Mamba-1 (no norms).
        It also decides the HF model type written by ``to_hf`` (``model_type``).
    Mamba has no maximum context, so there is no ``max_seq_len``.
    """

    vocab_size: int = 50280
    d_model: int = 768
    n_layers: int = 24
    d_state: int = 16
    expand: int = 2
    d_conv: int = 4
    dt_rank: int | str = "auto"
    use_bias: bool = False
    use_conv_bias: bool = True
    activation: str = "silu"
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    tie_embeddings: bool = True
    scan: str = "auto"
    scan_chunk: int | None = None
    mixer_norm_eps: float | None = None

    def __post_init__(self):
        if self.dt_rank == "auto":
            object.__setattr__(self, "dt_rank", math.ceil(self.d_model / 16))
        if isinstance(self.dt_rank, bool) or not isinstance(self.dt_rank, int):
            raise ValueError(f"MambaConfig.dt_rank must be a positive int or 'auto', got {self.dt_rank!r}")
        for name in ("vocab_size", "d_model", "n_layers", "d_state", "expand", "d_conv", "dt_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"MambaConfig.{name} must be a positive int, got {value!r}")
        if self.norm_eps <= 0:
            raise ValueError(f"MambaConfig.norm_eps must be positive, got {self.norm_eps}")
        if self.scan not in SCANS:
            raise ValueError(f"MambaConfig.scan must be one of {SCANS}, got {self.scan!r}")
        if self.scan_chunk is not None and (not isinstance(self.scan_chunk, int) or self.scan_chunk <= 0):
            raise ValueError(f"MambaConfig.scan_chunk must be None or a positive int, got {self.scan_chunk!r}")
        if self.mixer_norm_eps is not None and not self.mixer_norm_eps > 0:
            raise ValueError(f"MambaConfig.mixer_norm_eps must be None or positive, got {self.mixer_norm_eps!r}")
        check_activation(self.activation)

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def model_type(self) -> str:
        """The HF ``model_type``: ``falcon_mamba`` when the mixer norms are on, else ``mamba``."""
        return "mamba" if self.mixer_norm_eps is None else "falcon_mamba"

    # presets ---------------------------------------------------------------------------
    @classmethod
    def tiny(cls, **kw) -> "MambaConfig":
        """A few-layer model for tests and the embedded toy checkpoints."""
        defaults = dict(vocab_size=512, d_model=64, n_layers=2, d_state=8, expand=2, d_conv=4)
        return cls(**{**defaults, **kw})

    @classmethod
    def falcon_tiny(cls, **kw) -> "MambaConfig":
        """``tiny`` with Falcon-Mamba's mixer norms (HF's default epsilon)."""
        return cls.tiny(**{"mixer_norm_eps": 1e-6, **kw})

    @classmethod
    def mamba_130m(cls, **kw) -> "MambaConfig":
        """state-spaces/mamba-130m(-hf): 24 layers, d_model 768, d_state 16, dt_rank 48."""
        return cls(**{**dict(vocab_size=50280, d_model=768, n_layers=24, d_state=16, expand=2, d_conv=4,
                             dt_rank=48), **kw})

    # HF --------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> "MambaConfig":
        model_type = d.get("model_type", "mamba")
        if model_type not in MODEL_TYPES:
            raise ConversionError(f"mamba family reads model types {MODEL_TYPES}, got {model_type!r}")
        falcon = model_type == "falcon_mamba"
        check_config_fields(model_type, d, _HANDLED | (_FALCON_HANDLED if falcon else set()),
                            _IGNORED | (_FALCON_IGNORED if falcon else set()))
        hidden = d.get("hidden_size", 768)
        expand = d.get("expand", 2)
        if not float(expand).is_integer():
            raise ConversionError(f"{model_type}: expand must be an integer, got {expand!r}")
        expand = int(expand)
        inter = d.get("intermediate_size")
        if inter is not None and inter != expand * hidden:
            raise ConversionError(
                f"{model_type}: intermediate_size {inter} != expand * hidden_size = {expand} * {hidden}; "
                f"only intermediate_size == expand * hidden_size is supported"
            )
        try:
            return cls(
                vocab_size=d.get("vocab_size", 50280),
                d_model=hidden,
                n_layers=d.get("num_hidden_layers", 32),
                d_state=d.get("state_size", 16),
                expand=expand,
                d_conv=d.get("conv_kernel", 4),
                dt_rank=d.get("time_step_rank", "auto"),
                use_bias=d.get("use_bias", False),
                use_conv_bias=d.get("use_conv_bias", True),
                activation=d.get("hidden_act", "silu"),
                norm_eps=d.get("layer_norm_epsilon", 1e-5),
                residual_in_fp32=d.get("residual_in_fp32", True),
                tie_embeddings=d.get("tie_word_embeddings", True),
                mixer_norm_eps=d.get("mixer_rms_eps", 1e-6) if falcon else None,
            )
        except ValueError as err:
            if isinstance(err, ConversionError):
                raise
            raise ConversionError(f"{model_type}: invalid config.json: {err}") from err

    def to_hf(self) -> dict[str, Any]:
        out = {
            "model_type": self.model_type,
            "architectures": [_ARCHITECTURES[self.model_type]],
            "vocab_size": self.vocab_size,
            "hidden_size": self.d_model,
            "num_hidden_layers": self.n_layers,
            "state_size": self.d_state,
            "expand": self.expand,
            "intermediate_size": self.d_inner,
            "conv_kernel": self.d_conv,
            "time_step_rank": self.dt_rank,
            "use_bias": self.use_bias,
            "use_conv_bias": self.use_conv_bias,
            "hidden_act": self.activation,
            "layer_norm_epsilon": self.norm_eps,
            "residual_in_fp32": self.residual_in_fp32,
            "tie_word_embeddings": self.tie_embeddings,
            "use_mambapy": False,
        }
        if self.mixer_norm_eps is not None:
            out["mixer_rms_eps"] = self.mixer_norm_eps
        return out
