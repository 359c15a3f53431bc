"""Gemma-family configuration (Gemma, Gemma-2, Gemma-3 text) and its mapping to/from HF config.json.

All three: RMSNorm with ``(1 + w)``, embeddings scaled by ``sqrt(hidden_size)``, a GELU-gated MLP,
rotary, grouped-query attention, tied embeddings by default. Gemma-2 adds sandwich norms (a norm
after attention and after the MLP, before each residual add), ``query_pre_attn_scalar``, tanh
soft-capping of attention scores and final logits, and a sliding window on alternate layers.
Gemma-3 (text-only ``Gemma3ForCausalLM``) keeps the sandwich, adds an RMSNorm of each query / key
head, slides on five of every six layers, and gives the sliding layers their own rotary base
(``rope_local_theta``) while the global ones may be scaled (``rope_scaling``, e.g. linear x8).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional

from jaxinterp.hf import ConversionError, build_config, read_model_type
from jaxinterp.models.common import check_activation
from jaxinterp.models.rope import (
    RopeScaling, hf_context, make_rope, read_full_rope, read_scaling, rope_to_hf, usable_context,
)
from jaxinterp.models.transformer.arch import Arch
from jaxinterp.models.transformer.convert import (
    DIM_FIELDS, check_positive, dims_to_hf, layer_types, read_dims, sliding_layers_of, windows,
)

VARIANTS = ("gemma", "gemma2", "gemma3_text")
_CLASSES = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
_COMMON = DIM_FIELDS | {"rms_norm_eps", "rope_parameters", "rope_theta", "rope_scaling", "attention_bias",
                        "use_bidirectional_attention"}
_LATER = {"hidden_activation", "query_pre_attn_scalar", "sliding_window", "layer_types", "final_logit_softcapping",
          "attn_logit_softcapping"}
_HANDLED = {
    "gemma": _COMMON | {"hidden_act", "hidden_activation"},
    "gemma2": _COMMON | _LATER | {"hidden_act"},
    "gemma3_text": _COMMON | _LATER | {"rope_local_base_freq", "sliding_window_pattern", "_sliding_window_pattern"},
}
# Dropout does not change the eval forward; cache_implementation only picks generate's cache class.
_IGNORED = {"attention_dropout", "cache_implementation"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class GemmaConfig:
    """Gemma / Gemma-2 / Gemma-3 decoder (``variant`` = the HF ``model_type``).

    ``query_pre_attn_scalar``: attention scale ``1 / sqrt(query_pre_attn_scalar)`` (None:
    ``1 / sqrt(head_dim)``, Gemma-1). ``attn_softcap`` / ``final_softcap``: ``c * tanh(x / c)`` of
    the scaled scores / the logits. ``sliding_window`` on ``sliding_layers``. ``rope_theta`` /
    ``rope_scaling``: the (global) rotary; ``rope_local_theta``: the sliding layers' base (Gemma-3).
    """

    variant: str = "gemma"
    vocab_size: int = 256000
    max_seq_len: int = 8192
    d_model: int = 2048
    n_layers: int = 18
    n_heads: int = 8
    n_kv_heads: Optional[int] = None
    head_dim: int = 256
    d_mlp: int = 16384
    activation: str = "gelu_pytorch_tanh"
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    rope_local_theta: Optional[float] = None
    tie_embeddings: bool = True
    attention_bias: bool = False
    query_pre_attn_scalar: Optional[float] = None
    attn_softcap: Optional[float] = None
    final_softcap: Optional[float] = None
    sliding_window: Optional[int] = None
    sliding_layers: tuple[int, ...] = ()

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"GemmaConfig.variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        check_positive("GemmaConfig", self, ("vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads",
                                             "n_kv_heads", "head_dim", "d_mlp"))
        check_activation(self.activation)
        object.__setattr__(self, "sliding_layers", tuple(sorted(set(self.sliding_layers))))
        bad = [i for i in self.sliding_layers if not 0 <= i < self.n_layers]
        if bad:
            raise ValueError(f"sliding_layers {bad} are not layers of a {self.n_layers}-layer model")
        problems = []
        later = self.variant != "gemma"
        if not later and (self.query_pre_attn_scalar or self.attn_softcap or self.final_softcap or
                          self.sliding_window or self.sliding_layers or self.rope_scaling):
            problems.append("gemma (1) has no query_pre_attn_scalar, soft-capping, sliding window or rope scaling")
        if later and self.query_pre_attn_scalar is None:
            problems.append(f"{self.variant} needs query_pre_attn_scalar")
        if (self.rope_local_theta is not None) != (self.variant == "gemma3_text"):
            problems.append("rope_local_theta is Gemma-3's (and Gemma-3 needs it)")
        if self.variant == "gemma2" and self.rope_scaling is not None:
            problems.append("gemma2 has no rope scaling")
        if problems:
            raise ValueError(f"GemmaConfig(variant={self.variant!r}): " + "; ".join(problems))

    @property
    def arch(self) -> Arch:
        gemma3 = self.variant == "gemma3_text"
        rope_local = make_rope(self.head_dim, self.rope_local_theta) if gemma3 else None
        return Arch(vocab_size=self.vocab_size, d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads,
                    n_kv_heads=self.n_kv_heads, head_dim=self.head_dim, d_mlp=self.d_mlp, max_seq_len=self.max_seq_len,
                    norm="rmsnorm", norm_eps=self.rms_eps, norm_offset=1.0,
                    placement="pre" if self.variant == "gemma" else "sandwich",
                    qkv_bias=self.attention_bias, o_bias=self.attention_bias, qk_norm="head" if gemma3 else "none",
                    attn_scale=None if self.query_pre_attn_scalar is None else self.query_pre_attn_scalar ** -0.5,
                    attn_softcap=self.attn_softcap, windows=windows(self.n_layers, self.sliding_window,
                                                                    self.sliding_layers),
                    rope=make_rope(self.head_dim, self.rope_theta, self.rope_scaling,
                                   max_position_embeddings=hf_context(self.max_seq_len, self.rope_scaling)),
                    rope_local=rope_local,
                    local_rope=tuple(i in self.sliding_layers for i in range(self.n_layers)) if gemma3 else None,
                    gated=True, activation=self.activation, embed_scale=math.sqrt(self.d_model),
                    tie_embeddings=self.tie_embeddings, final_softcap=self.final_softcap)

    # presets ---------------------------------------------------------------------------
    @classmethod
    def gemma_tiny(cls, **kw) -> "GemmaConfig":
        defaults = dict(vocab_size=512, max_seq_len=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=1,
                        head_dim=32, d_mlp=128)
        return cls(**{**defaults, **kw})

    @classmethod
    def gemma2_tiny(cls, **kw) -> "GemmaConfig":
        defaults = dict(variant="gemma2", vocab_size=512, max_seq_len=128, d_model=64, n_layers=2, n_heads=4,
                        n_kv_heads=2, head_dim=32, d_mlp=128, query_pre_attn_scalar=32, attn_softcap=50.0,
                        final_softcap=30.0, sliding_window=8, sliding_layers=(0,))
        return cls(**{**defaults, **kw})

    @classmethod
    def gemma3_tiny(cls, **kw) -> "GemmaConfig":
        defaults = dict(variant="gemma3_text", vocab_size=512, max_seq_len=128, d_model=64, n_layers=2, n_heads=4,
                        n_kv_heads=2, head_dim=32, d_mlp=128, query_pre_attn_scalar=32, rope_theta=1e6,
                        rope_local_theta=1e4, sliding_window=8, sliding_layers=(0,))
        return cls(**{**defaults, **kw})

    @classmethod
    def gemma2_2b(cls, **kw) -> "GemmaConfig":
        defaults = dict(variant="gemma2", d_model=2304, n_layers=26, n_heads=8, n_kv_heads=4, d_mlp=9216,
                        query_pre_attn_scalar=256, attn_softcap=50.0, final_softcap=30.0, sliding_window=4096,
                        sliding_layers=tuple(range(0, 26, 2)))
        return cls(**{**defaults, **kw})

    @classmethod
    def gemma3_1b(cls, **kw) -> "GemmaConfig":
        defaults = dict(variant="gemma3_text", vocab_size=262144, max_seq_len=32768, d_model=1152, n_layers=26,
                        n_heads=4, n_kv_heads=1, d_mlp=6912, query_pre_attn_scalar=256, rope_theta=1e6,
                        rope_local_theta=1e4, sliding_window=512,
                        sliding_layers=tuple(i for i in range(26) if (i + 1) % 6))
        return cls(**{**defaults, **kw})

    # HF --------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> "GemmaConfig":
        variant = read_model_type("gemma", d, VARIANTS, _HANDLED, _IGNORED, default="gemma")
        if d.get("use_bidirectional_attention"):
            raise ConversionError(f"{variant}: use_bidirectional_attention=true (an encoder) is not supported; "
                                  f"supported: false (causal)")
        dims = read_dims(d, vocab_size=256000, d_model=2048, n_layers=18, n_heads=8, head_dim=256, d_mlp=16384,
                         tie_embeddings=True)
        context = d.get("max_position_embeddings", 8192)
        kw: dict[str, Any] = dict(variant=variant, **dims, max_seq_len=context, activation=_activation(variant, d),
                                  rms_eps=d.get("rms_norm_eps", 1e-6),
                                  attention_bias=bool(d.get("attention_bias", False)))
        if variant == "gemma3_text":
            kw.update(_gemma3_rope(d, context))
        else:
            theta, scaling = read_full_rope(variant, d, max_position_embeddings=context)
            kw.update(rope_theta=theta, rope_scaling=scaling)
        if variant == "gemma3_text" and d.get("attn_logit_softcapping") is not None:
            raise ConversionError(f"gemma3_text: attn_logit_softcapping={d['attn_logit_softcapping']} is not applied "
                                  f"by transformers' Gemma-3 attention; supported: null")
        if variant != "gemma":
            kw.update(query_pre_attn_scalar=d.get("query_pre_attn_scalar", 256),
                      attn_softcap=d.get("attn_logit_softcapping", 50.0 if variant == "gemma2" else None),
                      final_softcap=d.get("final_logit_softcapping", 30.0 if variant == "gemma2" else None),
                      sliding_window=d.get("sliding_window", 4096),
                      sliding_layers=_sliding_layers(variant, d, dims["n_layers"]))
        kw["max_seq_len"] = usable_context(context, kw["rope_scaling"])
        return build_config(cls, variant, **kw)

    def to_hf(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model_type": self.variant, "architectures": [_CLASSES[self.variant]], **dims_to_hf(self),
            "max_position_embeddings": hf_context(self.max_seq_len, self.rope_scaling), "rms_norm_eps": self.rms_eps,
            "attention_bias": self.attention_bias, "attention_dropout": 0.0,
        }
        if self.variant == "gemma":
            out["hidden_act"] = self.activation
            out["rope_parameters"] = rope_to_hf(self.rope_theta, self.rope_scaling)
            return out
        out.update(hidden_activation=self.activation, query_pre_attn_scalar=self.query_pre_attn_scalar,
                   attn_logit_softcapping=self.attn_softcap, final_logit_softcapping=self.final_softcap,
                   sliding_window=self.sliding_window, layer_types=layer_types(self.n_layers, self.sliding_layers))
        if self.variant == "gemma2":
            out["rope_parameters"] = rope_to_hf(self.rope_theta, self.rope_scaling)
        else:
            out["rope_parameters"] = {"full_attention": rope_to_hf(self.rope_theta, self.rope_scaling),
                                      "sliding_attention": rope_to_hf(self.rope_local_theta, None)}
        return out


def _activation(variant: str, d: Mapping[str, Any]) -> str:
    """Gemma reads ``hidden_act`` (its legacy ``gelu`` meaning the tanh approximation, as transformers
    maps it); Gemma-2/3 read ``hidden_activation``. A second, disagreeing field is refused."""
    if variant == "gemma":
        act = d.get("hidden_act", "gelu_pytorch_tanh")
        act = "gelu_pytorch_tanh" if act == "gelu" else act
        other = d.get("hidden_activation")
    else:
        act = d.get("hidden_activation", "gelu_pytorch_tanh")
        other = d.get("hidden_act")
    if other is not None and other != act:
        raise ConversionError(f"{variant}: hidden_act {d.get('hidden_act')!r} and hidden_activation "
                              f"{d.get('hidden_activation')!r} disagree (the model uses {act!r}); make them equal")
    try:
        return check_activation(act)
    except ConversionError as err:
        raise ConversionError(f"{variant}: {err}") from err


def _sliding_layers(variant: str, d: Mapping[str, Any], n_layers: int) -> tuple[int, ...]:
    """Gemma-2 slides on even layers, Gemma-3 on all but every ``sliding_window_pattern``-th, unless
    ``layer_types`` says otherwise."""
    if d.get("layer_types") is not None:
        return sliding_layers_of(variant, d["layer_types"], n_layers)
    period = 2 if variant == "gemma2" else d.get("sliding_window_pattern", d.get("_sliding_window_pattern", 6))
    return tuple(i for i in range(n_layers) if (i + 1) % period)


def _gemma3_rope(d: Mapping[str, Any], context: int) -> dict[str, Any]:
    """Global and local rotary of Gemma-3: nested ``rope_parameters`` {full_attention, sliding_attention}
    (transformers 5) or the legacy ``rope_theta`` + ``rope_scaling`` (global) and ``rope_local_base_freq``."""
    params = d.get("rope_parameters")
    if params and set(params) <= {"full_attention", "sliding_attention"}:
        glob, loc = params.get("full_attention") or {}, params.get("sliding_attention") or {}
    elif params:
        raise ConversionError(f"gemma3_text: rope_parameters must be keyed by full_attention / sliding_attention, "
                              f"got keys {sorted(params)}")
    else:
        glob, loc = dict(d.get("rope_scaling") or {}), {}
    theta, partial, scaling = read_scaling("gemma3_text", glob, max_position_embeddings=context)
    local_theta, local_partial, local_scaling = read_scaling("gemma3_text", loc, max_position_embeddings=context)
    if local_scaling is not None or (partial or 1.0) != 1.0 or (local_partial or 1.0) != 1.0:
        raise ConversionError("gemma3_text: the sliding layers' rope must be the default type, and neither rope "
                              "partial; supported: a scaled global rope only")
    return dict(rope_theta=float(theta if theta is not None else d.get("rope_theta", 1e6)), rope_scaling=scaling,
                rope_local_theta=float(local_theta if local_theta is not None else d.get("rope_local_base_freq", 1e4)))
