"""OLMo-2 configuration (``model_type: olmo2``) and its mapping to/from HF config.json.

A llama-like decoder with the norms moved after each sub-layer: ``x + norm(attn(x))`` then
``x + norm(mlp(x))`` (no norm before attention or the MLP), and an RMSNorm over all query / key
features (``q_norm [H * Dh]``, ``k_norm [Hkv * Dh]``) before rotary. Its RMSNorm multiplies the
weight in float32 before casting back.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from jaxinterp.hf import build_config, read_model_type
from jaxinterp.models.common import check_activation
from jaxinterp.models.rope import RopeScaling, hf_context, make_rope, read_full_rope, rope_to_hf, usable_context
from jaxinterp.models.transformer.arch import Arch
from jaxinterp.models.transformer.convert import DIM_FIELDS, check_positive, dims_to_hf, read_dims

_HANDLED = (DIM_FIELDS - {"head_dim"}) | {"hidden_act", "rms_norm_eps", "rope_parameters", "rope_theta",
                                          "rope_scaling", "attention_bias"}
_IGNORED = {"attention_dropout"}  # the eval forward has no dropout


@dataclasses.dataclass(frozen=True, kw_only=True)
class Olmo2Config:
    """OLMo-2 decoder. ``n_kv_heads`` None means ``n_heads``; ``attention_bias``: q/k/v/o biases."""

    vocab_size: int = 100352
    max_seq_len: int = 4096
    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    d_mlp: int = 11008
    activation: str = "silu"
    rms_eps: float = 1e-6
    rope_theta: float = 500000.0
    rope_scaling: Optional[RopeScaling] = None
    tie_embeddings: bool = False
    attention_bias: bool = False

    def __post_init__(self):
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        check_positive("Olmo2Config", self, ("vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads",
                                             "n_kv_heads", "d_mlp"))
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
        check_activation(self.activation)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def arch(self) -> Arch:
        return Arch(vocab_size=self.vocab_size, d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads,
                    n_kv_heads=self.n_kv_heads, head_dim=self.head_dim, d_mlp=self.d_mlp, max_seq_len=self.max_seq_len,
                    norm="rmsnorm", norm_eps=self.rms_eps, norm_scale_f32=True, placement="post",
                    qkv_bias=self.attention_bias, o_bias=self.attention_bias, qk_norm="full",
                    rope=make_rope(self.head_dim, self.rope_theta, self.rope_scaling,
                                   max_position_embeddings=hf_context(self.max_seq_len, self.rope_scaling)),
                    gated=True, activation=self.activation, tie_embeddings=self.tie_embeddings)

    @classmethod
    def tiny(cls, **kw) -> "Olmo2Config":
        defaults = dict(vocab_size=512, max_seq_len=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=176)
        return cls(**{**defaults, **kw})

    @classmethod
    def olmo2_1b(cls, **kw) -> "Olmo2Config":
        defaults = dict(d_model=2048, n_layers=16, n_heads=16, d_mlp=8192, tie_embeddings=True)
        return cls(**{**defaults, **kw})

    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> "Olmo2Config":
        read_model_type("olmo2", d, ("olmo2",), _HANDLED, _IGNORED)
        context = d.get("max_position_embeddings", 2048)
        theta, scaling = read_full_rope("olmo2", d, max_position_embeddings=context)
        dims = read_dims(d, vocab_size=50304, d_model=4096, n_layers=32, n_heads=32, d_mlp=11008)
        dims.pop("head_dim")
        return build_config(cls, "olmo2", **dims, max_seq_len=usable_context(context, scaling),
                            activation=d.get("hidden_act", "silu"), rms_eps=d.get("rms_norm_eps", 1e-5),
                            rope_theta=theta, rope_scaling=scaling, attention_bias=bool(d.get("attention_bias", False)))

    def to_hf(self) -> dict[str, Any]:
        out = {"model_type": "olmo2", "architectures": ["Olmo2ForCausalLM"], **dims_to_hf(self),
               "max_position_embeddings": hf_context(self.max_seq_len, self.rope_scaling), "hidden_act": self.activation,
               "rms_norm_eps": self.rms_eps, "rope_parameters": rope_to_hf(self.rope_theta, self.rope_scaling),
               "attention_bias": self.attention_bias, "attention_dropout": 0.0}
        del out["head_dim"]
        return out
