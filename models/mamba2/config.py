"""Mamba-2 configuration (frozen, keyword-only) and its mapping to/from HF config.json."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

from jaxinterp.hf import ConversionError, check_config_fields
from jaxinterp.models.common import check_activation

_HANDLED = {
    "vocab_size", "hidden_size", "state_size", "num_hidden_layers", "layer_norm_epsilon", "expand", "num_heads",
    "head_dim", "n_groups", "conv_kernel", "use_bias", "use_conv_bias", "hidden_act", "residual_in_fp32",
    "tie_word_embeddings", "time_step_limit", "chunk_size",
}
# Initialisation-only fields; Mamba-2 has no dt_proj, so ``time_step_rank`` is unused by HF's forward too.
_IGNORED = {
    "time_step_rank", "time_step_min", "time_step_max", "time_step_floor", "rescale_prenorm_residual",
}
SCANS = ("auto", "chunked", "sequential")


def _json_float(value) -> float:
    """A float from config.json: a number, or transformers 5's ``{"__float__": "Infinity"}`` for non-finite ones."""
    if isinstance(value, dict) and set(value) == {"__float__"}:
        value = value["__float__"]
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConversionError(f"mamba2: time_step_limit entries must be numbers, got {value!r}") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Mamba2Config:
    """Mamba-2 (SSD) language model.

    Attributes:
      vocab_size, d_model, n_layers: embedding table, residual width, number of blocks.
      d_state: SSM state size N per head channel (HF ``state_size``).
      expand: d_inner = expand * d_model, which must equal n_heads * head_dim.
      n_heads, head_dim: the scan's heads (one scalar decay ``A``, time step and skip ``D`` each)
        and channels per head P.
      n_groups: B / C (and the gated norm) come in this many groups; head h reads group
        ``h // (n_heads / n_groups)``.
      d_conv: causal depthwise convolution width K over the x, B, C channels (HF ``conv_kernel``).
      use_bias: bias in in_proj / out_proj. use_conv_bias: bias in the convolution.
      activation: activation after the convolution (HF ``hidden_act``); the gate is always SiLU.
      norm_eps: epsilon of the block RMSNorms and of the gated RMSNorm before out_proj.
      residual_in_fp32: keep the residual stream in float32. tie_embeddings: unembedding = embedding.
      dt_limit: the time step is clipped to ``[lo, hi]`` after softplus (HF ``time_step_limit``).
      chunk_size: chunk length of the chunked (SSD) scan (HF ``chunk_size``; a whole sequence
        shorter than it is one chunk). It changes float rounding only, never the result.
      scan: ``"auto"`` (sequential on CPU, chunked elsewhere), ``"chunked"`` (the SSD algorithm:
        quadratic attention-like form inside chunks, a recurrence over chunk states between them;
        matmul-heavy, suited to accelerators) or ``"sequential"`` (``lax.scan`` over time holding one
        ``[B, H, P, N]`` state).
    Mamba-2 has no maximum context, so there is no ``max_seq_len``.
    """

    vocab_size: int = 50288
    d_model: int = 768
    n_layers: int = 24
    d_state: int = 128
    expand: int = 2
    n_heads: int = 24
    head_dim: int = 64
    n_groups: int = 1
    d_conv: int = 4
    use_bias: bool = False
    use_conv_bias: bool = True
    activation: str = "silu"
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    tie_embeddings: bool = True
    dt_limit: tuple[float, float] = (0.0, math.inf)
    chunk_size: int = 256
    scan: str = "auto"

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "d_state", "expand", "n_heads", "head_dim", "n_groups",
                     "d_conv", "chunk_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"Mamba2Config.{name} must be a positive int, got {value!r}")
        if self.n_heads * self.head_dim != self.d_inner:
            raise ValueError(f"Mamba2Config: n_heads * head_dim ({self.n_heads} * {self.head_dim}) must equal "
                             f"expand * d_model ({self.expand} * {self.d_model})")
        if self.n_heads % self.n_groups:
            raise ValueError(f"Mamba2Config.n_groups ({self.n_groups}) must divide n_heads ({self.n_heads})")
        if self.norm_eps <= 0:
            raise ValueError(f"Mamba2Config.norm_eps must be positive, got {self.norm_eps}")
        lo, hi = (float(v) for v in self.dt_limit)
        if not 0.0 <= lo <= hi:
            raise ValueError(f"Mamba2Config.dt_limit must be (lo, hi) with 0 <= lo <= hi, got {self.dt_limit!r}")
        object.__setattr__(self, "dt_limit", (lo, hi))
        if self.scan not in SCANS:
            raise ValueError(f"Mamba2Config.scan must be one of {SCANS}, got {self.scan!r}")
        check_activation(self.activation)

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def conv_dim(self) -> int:
        """Channels of the convolution: x (d_inner), B and C (n_groups * d_state each)."""
        return self.d_inner + 2 * self.n_groups * self.d_state

    # presets ---------------------------------------------------------------------------
    @classmethod
    def tiny(cls, **kw) -> "Mamba2Config":
        """A few-layer model for tests: 8 heads of 8 channels in 2 groups."""
        defaults = dict(vocab_size=512, d_model=32, n_layers=2, d_state=8, expand=2, n_heads=8, head_dim=8,
                        n_groups=2, d_conv=4, chunk_size=8)
        return cls(**{**defaults, **kw})

    @classmethod
    def mamba2_130m(cls, **kw) -> "Mamba2Config":
        """state-spaces/mamba2-130m: 24 layers, d_model 768, 24 heads of 64, d_state 128, one group."""
        return cls(**kw)

    # HF --------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> "Mamba2Config":
        check_config_fields("mamba2", d, _HANDLED, _IGNORED)
        expand = d.get("expand", 2)
        if not float(expand).is_integer():
            raise ConversionError(f"mamba2: expand must be an integer, got {expand!r}")
        limit = d.get("time_step_limit", (0.0, math.inf))
        if not isinstance(limit, (list, tuple)) or len(limit) != 2:
            raise ConversionError(f"mamba2: time_step_limit must be [lo, hi], got {limit!r}")
        limit = tuple(_json_float(v) for v in limit)
        try:
            check_activation(d.get("hidden_act", "silu"))
        except ConversionError as err:
            raise ConversionError(f"mamba2: hidden_act: {err}") from None
        try:
            return cls(
                vocab_size=d.get("vocab_size", 32768),
                d_model=d.get("hidden_size", 4096),
                n_layers=d.get("num_hidden_layers", 64),
                d_state=d.get("state_size", 128),
                expand=int(expand),
                n_heads=d.get("num_heads", 128),
                head_dim=d.get("head_dim", 64),
                n_groups=d.get("n_groups", 8),
                d_conv=d.get("conv_kernel", 4),
                use_bias=d.get("use_bias", False),
                use_conv_bias=d.get("use_conv_bias", True),
                activation=d.get("hidden_act", "silu"),
                norm_eps=d.get("layer_norm_epsilon", 1e-5),
                residual_in_fp32=d.get("residual_in_fp32", True),
                tie_embeddings=d.get("tie_word_embeddings", False),
                dt_limit=limit,
                chunk_size=d.get("chunk_size", 256),
            )
        except (TypeError, ValueError) as err:
            if isinstance(err, ConversionError):
                raise
            raise ConversionError(f"mamba2: invalid config.json: {err}") from err

    def to_hf(self) -> dict[str, Any]:
        return {
            "model_type": "mamba2",
            "architectures": ["Mamba2ForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.d_model,
            "num_hidden_layers": self.n_layers,
            "state_size": self.d_state,
            "expand": self.expand,
            "num_heads": self.n_heads,
            "head_dim": self.head_dim,
            "n_groups": self.n_groups,
            "conv_kernel": self.d_conv,
            "use_bias": self.use_bias,
            "use_conv_bias": self.use_conv_bias,
            "hidden_act": self.activation,
            "layer_norm_epsilon": self.norm_eps,
            "residual_in_fp32": self.residual_in_fp32,
            "tie_word_embeddings": self.tie_embeddings,
            "time_step_limit": list(self.dt_limit),
            "chunk_size": self.chunk_size,
        }
