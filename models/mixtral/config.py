"""Mixture-of-experts configuration (Mixtral, OLMoE) and its mapping to/from HF config.json.

A llama-like decoder whose MLP is a sparse mixture: a linear router gives ``n_experts`` logits per
token, the softmax (float32) picks the ``top_k`` experts, whose weights are renormalised to sum to
one (Mixtral always; OLMoE when ``norm_topk_prob``), and the token's output is the weighted sum of
those experts (each a SwiGLU MLP of width ``d_mlp``). OLMoE adds an RMSNorm over all query / key
features and optional clamping of q/k/v (``clip_qkv``); Mixtral may slide its attention window.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from jaxinterp.hf import build_config, read_model_type
from jaxinterp.models.common import check_activation
from jaxinterp.models.rope import RopeScaling, hf_context, make_rope, read_full_rope, rope_to_hf, usable_context
from jaxinterp.models.transformer.arch import Arch
from jaxinterp.models.transformer.convert import DIM_FIELDS, check_positive, dims_to_hf, read_dims, windows

VARIANTS = ("mixtral", "olmoe")
_CLASSES = {"mixtral": "MixtralForCausalLM", "olmoe": "OlmoeForCausalLM"}
_COMMON = DIM_FIELDS | {"hidden_act", "rms_norm_eps", "rope_parameters", "rope_theta", "rope_scaling",
                        "num_experts_per_tok"}
_HANDLED = {
    "mixtral": _COMMON | {"num_local_experts", "sliding_window"},
    "olmoe": (_COMMON - {"head_dim"}) | {"num_experts", "norm_topk_prob", "attention_bias", "clip_qkv"},
}
# Training-only: dropout, the load-balancing loss, router jitter (applied in training mode only)
# and whether the router logits are returned.
_IGNORED = {"attention_dropout", "router_aux_loss_coef", "router_jitter_noise", "output_router_logits"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class MixtralConfig:
    """Mixtral / OLMoE decoder (``variant`` = the HF ``model_type``); ``d_mlp`` is each expert's width."""

    variant: str = "mixtral"
    vocab_size: int = 32000
    max_seq_len: int = 32768
    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    d_mlp: int = 14336
    n_experts: int = 8
    top_k: int = 2
    norm_topk: bool = True
    activation: str = "silu"
    rms_eps: float = 1e-5
    rope_theta: float = 1e6
    rope_scaling: Optional[RopeScaling] = None
    tie_embeddings: bool = False
    sliding_window: Optional[int] = None
    attention_bias: bool = False
    clip_qkv: Optional[float] = None

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"MixtralConfig.variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.head_dim is None and self.n_heads > 0:
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        check_positive("MixtralConfig", self, ("vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads",
                                               "n_kv_heads", "head_dim", "d_mlp", "n_experts", "top_k"))
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k ({self.top_k}) must be at most n_experts ({self.n_experts})")
        check_activation(self.activation)
        problems = []
        if self.variant == "mixtral" and (not self.norm_topk or self.attention_bias or self.clip_qkv is not None):
            problems.append("mixtral always renormalises the top-k weights and has no attention bias or clip_qkv")
        if self.variant == "olmoe" and (self.sliding_window is not None or self.head_dim * self.n_heads != self.d_model):
            problems.append("olmoe has no sliding window and head_dim = d_model / n_heads")
        if problems:
            raise ValueError(f"MixtralConfig(variant={self.variant!r}): " + "; ".join(problems))

    @property
    def arch(self) -> Arch:
        olmoe = self.variant == "olmoe"
        return Arch(vocab_size=self.vocab_size, d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads,
                    n_kv_heads=self.n_kv_heads, head_dim=self.head_dim, d_mlp=self.d_mlp, max_seq_len=self.max_seq_len,
                    norm="rmsnorm", norm_eps=self.rms_eps, qkv_bias=self.attention_bias, o_bias=self.attention_bias,
                    qk_norm="full" if olmoe else "none", clip_qkv=self.clip_qkv,
                    windows=windows(self.n_layers, self.sliding_window, None),
                    rope=make_rope(self.head_dim, self.rope_theta, self.rope_scaling,
                                   max_position_embeddings=hf_context(self.max_seq_len, self.rope_scaling)),
                    gated=True, activation=self.activation, n_experts=self.n_experts, top_k=self.top_k,
                    norm_topk=self.norm_topk, tie_embeddings=self.tie_embeddings)

    # presets ---------------------------------------------------------------------------
    @classmethod
    def mixtral_tiny(cls, **kw) -> "MixtralConfig":
        defaults = dict(vocab_size=512, max_seq_len=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=96,
                        n_experts=4, top_k=2)
        return cls(**{**defaults, **kw})

    @classmethod
    def olmoe_tiny(cls, **kw) -> "MixtralConfig":
        defaults = dict(variant="olmoe", vocab_size=512, max_seq_len=128, d_model=64, n_layers=2, n_heads=4, d_mlp=96,
                        n_experts=4, top_k=2, norm_topk=False, rope_theta=1e4)
        return cls(**{**defaults, **kw})

    @classmethod
    def mixtral_8x7b(cls, **kw) -> "MixtralConfig":
        return cls(**{**dict(n_kv_heads=8), **kw})

    # HF --------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> "MixtralConfig":
        variant = read_model_type("mixtral", d, VARIANTS, _HANDLED, _IGNORED, default="mixtral")
        context = d.get("max_position_embeddings", 4096)
        theta, scaling = read_full_rope(variant, d, max_position_embeddings=context)
        dims = read_dims(d, vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, d_mlp=14336)
        kw: dict[str, Any] = dict(variant=variant, **dims, max_seq_len=usable_context(context, scaling),
                                  top_k=d.get("num_experts_per_tok", 2), activation=d.get("hidden_act", "silu"),
                                  rms_eps=d.get("rms_norm_eps", 1e-5), rope_theta=theta, rope_scaling=scaling)
        if variant == "mixtral":
            kw.update(n_experts=d.get("num_local_experts", 8), sliding_window=d.get("sliding_window"))
        else:
            kw.update(n_experts=d.get("num_experts", 64), norm_topk=bool(d.get("norm_topk_prob", False)),
                      attention_bias=bool(d.get("attention_bias", False)), clip_qkv=d.get("clip_qkv"))
        return build_config(cls, variant, **kw)

    def to_hf(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model_type": self.variant, "architectures": [_CLASSES[self.variant]], **dims_to_hf(self),
            "max_position_embeddings": hf_context(self.max_seq_len, self.rope_scaling), "hidden_act": self.activation,
            "rms_norm_eps": self.rms_eps, "rope_parameters": rope_to_hf(self.rope_theta, self.rope_scaling),
            "num_experts_per_tok": self.top_k, "attention_dropout": 0.0,
        }
        if self.variant == "mixtral":
            out.update(num_local_experts=self.n_experts, sliding_window=self.sliding_window)
        else:
            del out["head_dim"]
            out.update(num_experts=self.n_experts, norm_topk_prob=self.norm_topk, attention_bias=self.attention_bias,
                       clip_qkv=self.clip_qkv)
        return out
