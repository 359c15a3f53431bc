"""Phi-3 configuration (``model_type: phi3``) and its mapping to/from HF config.json.

A llama-like decoder whose checkpoint fuses q/k/v into one ``qkv_proj`` and gate/up into one
``gate_up_proj`` (split on load, joined on export), with optional partial rotary, LongRoPE
(Phi-3 ``-128k``: short / long factors chosen by the sequence length) and a sliding window on
every layer. As transformers does, the legacy rope types ``su`` and ``yarn`` of Phi-3 configs mean
``longrope``, and the top-level ``original_max_position_embeddings`` is the one LongRoPE uses.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from jaxinterp.hf import ConversionError, build_config, read_model_type
from jaxinterp.models.common import check_activation
from jaxinterp.models.rope import RopeScaling, make_rope, read_rope_dict, rope_to_hf
from jaxinterp.models.transformer.arch import Arch
from jaxinterp.models.transformer.convert import DIM_FIELDS, check_positive, dims_to_hf, read_dims, windows

_HANDLED = (DIM_FIELDS - {"head_dim"}) | {"hidden_act", "rms_norm_eps", "rope_parameters", "rope_theta", "rope_scaling",
                                          "partial_rotary_factor", "original_max_position_embeddings",
                                          "sliding_window"}
_IGNORED = {"attention_dropout", "resid_pdrop", "embd_pdrop"}  # dropout: not in the eval forward
_DEFAULT_ORIGINAL = 4096


@dataclasses.dataclass(frozen=True, kw_only=True)
class Phi3Config:
    """Phi-3 decoder. ``partial_rotary``: the fraction of each head that is rotated;
    ``rope_scaling``: LongRoPE (or another scaled type); ``sliding_window``: on every layer.
    ``pad_token_id`` is kept because transformers' Phi-3 builds its embedding with it (its default,
    32000, would not fit a smaller vocabulary on export)."""

    vocab_size: int = 32064
    max_seq_len: int = 4096
    d_model: int = 3072
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    d_mlp: int = 8192
    activation: str = "silu"
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    partial_rotary: float = 1.0
    tie_embeddings: bool = False
    sliding_window: Optional[int] = None
    pad_token_id: Optional[int] = None

    def __post_init__(self):
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        check_positive("Phi3Config", self, ("vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads",
                                            "n_kv_heads", "d_mlp"))
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
        if not 0.0 < self.partial_rotary <= 1.0:
            raise ValueError(f"partial_rotary must be in (0, 1], got {self.partial_rotary}")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id {self.pad_token_id} is not a token of the {self.vocab_size}-token vocabulary")
        if self.rope_scaling is not None and self.rope_scaling.rope_type == "dynamic":
            raise ValueError("phi3 supports default and longrope rotary, not dynamic")
        check_activation(self.activation)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def arch(self) -> Arch:
        return Arch(vocab_size=self.vocab_size, d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads,
                    n_kv_heads=self.n_kv_heads, head_dim=self.head_dim, d_mlp=self.d_mlp, max_seq_len=self.max_seq_len,
                    norm="rmsnorm", norm_eps=self.rms_eps,
                    windows=windows(self.n_layers, self.sliding_window, None),
                    rope=make_rope(self.head_dim, self.rope_theta, self.rope_scaling, partial=self.partial_rotary,
                                   max_position_embeddings=self.max_seq_len),
                    gated=True, activation=self.activation, tie_embeddings=self.tie_embeddings)

    @classmethod
    def tiny(cls, **kw) -> "Phi3Config":
        defaults = dict(vocab_size=512, max_seq_len=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=176)
        return cls(**{**defaults, **kw})

    @classmethod
    def phi3_mini_4k(cls, **kw) -> "Phi3Config":
        return cls(**{**dict(sliding_window=2047), **kw})

    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> "Phi3Config":
        read_model_type("phi3", d, ("phi3",), _HANDLED, _IGNORED)
        context = d.get("max_position_embeddings", 4096)
        theta, partial, scaling = read_rope_dict("phi3", _legacy_longrope(d), max_position_embeddings=context)
        if scaling is not None and scaling.rope_type != "longrope":
            raise ConversionError(f"phi3: rope type {scaling.rope_type!r} is not Phi-3's; supported rope types: "
                                  f"['default', 'longrope'] (legacy 'su' / 'yarn' read as longrope)")
        dims = read_dims(d, vocab_size=32064, d_model=3072, n_layers=32, n_heads=32, d_mlp=8192)
        dims.pop("head_dim")
        return build_config(cls, "phi3", **dims, max_seq_len=context, activation=d.get("hidden_act", "silu"),
                            rms_eps=d.get("rms_norm_eps", 1e-5), rope_theta=theta, rope_scaling=scaling,
                            partial_rotary=partial, sliding_window=d.get("sliding_window"),
                            pad_token_id=d.get("pad_token_id", 32000))

    def to_hf(self) -> dict[str, Any]:
        out = {"model_type": "phi3", "architectures": ["Phi3ForCausalLM"], **dims_to_hf(self),
               "max_position_embeddings": self.max_seq_len, "hidden_act": self.activation,
               "rms_norm_eps": self.rms_eps, "sliding_window": self.sliding_window, "pad_token_id": self.pad_token_id,
               "rope_parameters": {**rope_to_hf(self.rope_theta, self.rope_scaling),
                                   "partial_rotary_factor": self.partial_rotary},
               "attention_dropout": 0.0, "resid_pdrop": 0.0, "embd_pdrop": 0.0}
        del out["head_dim"]
        if self.rope_scaling is not None:
            out["original_max_position_embeddings"] = self.rope_scaling.get("original_max_position_embeddings")
        return out


def _legacy_longrope(d: Mapping[str, Any]) -> dict[str, Any]:
    """``d`` with Phi-3's rope conventions made explicit: ``su`` / ``yarn`` -> ``longrope``, and the
    top-level ``original_max_position_embeddings`` (which transformers prefers) inside the dict."""
    key = "rope_parameters" if d.get("rope_parameters") else "rope_scaling"
    params = dict(d.get(key) or {})
    kind = params.pop("type", None) or params.get("rope_type")
    if kind in ("su", "yarn", "longrope"):
        params["rope_type"] = "longrope"
        params["original_max_position_embeddings"] = d.get("original_max_position_embeddings",
                                                           params.get("original_max_position_embeddings",
                                                                      _DEFAULT_ORIGINAL))
    elif kind is not None:
        params["rope_type"] = kind
    return {**d, key: params}
