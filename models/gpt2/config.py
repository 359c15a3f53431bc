"""GPT-2 configuration (frozen, keyword-only) and its mapping to/from HF config.json."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from jaxinterp.hf import ConversionError, check_config_fields
from jaxinterp.models.common import check_activation
from jaxinterp.models.transformer.arch import Arch

_HANDLED = {
    "vocab_size", "n_positions", "n_ctx", "n_embd", "n_layer", "n_head", "n_inner", "activation_function",
    "layer_norm_epsilon", "scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
    "tie_word_embeddings", "add_cross_attention",
}
# Dropout and sequence-classification heads do not change the language-model forward.
_IGNORED = {
    "resid_pdrop", "embd_pdrop", "attn_pdrop", "summary_type", "summary_use_proj", "summary_activation",
    "summary_proj_to_labels", "summary_first_dropout", "n_special", "predict_special_tokens",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPT2Config:
    vocab_size: int = 50257
    max_seq_len: int = 1024
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    d_mlp: int = 3072
    activation: str = "gelu_new"
    ln_eps: float = 1e-5
    scale_attn_by_inverse_layer_idx: bool = False
    tie_embeddings: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads", "d_mlp"):
            if getattr(self, name) <= 0:
                raise ValueError(f"GPT2Config.{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        check_activation(self.activation)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def arch(self) -> Arch:
        """GPT-2 on the shared block: pre-LayerNorm, learned positions, plain GELU MLP, biases everywhere."""
        return Arch(vocab_size=self.vocab_size, d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads,
                    n_kv_heads=self.n_heads, head_dim=self.head_dim, d_mlp=self.d_mlp, max_seq_len=self.max_seq_len,
                    norm="layernorm", norm_eps=self.ln_eps, norm_bias=True, qkv_bias=True, o_bias=True,
                    scale_by_inverse_layer=self.scale_attn_by_inverse_layer_idx, positions="learned", gated=False,
                    activation=self.activation, mlp_bias=True, tie_embeddings=self.tie_embeddings)

    # presets ---------------------------------------------------------------------------
    @classmethod
    def small(cls, **kw) -> "GPT2Config":
        """GPT-2 small (124M)."""
        return cls(**kw)

    @classmethod
    def tiny(cls, **kw) -> "GPT2Config":
        defaults = dict(vocab_size=512, max_seq_len=128, d_model=64, n_layers=2, n_heads=4, d_mlp=256)
        return cls(**{**defaults, **kw})

    # HF --------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> "GPT2Config":
        check_config_fields("gpt2", d, _HANDLED, _IGNORED)
        if d.get("add_cross_attention", False):
            raise ConversionError("gpt2: add_cross_attention=True (encoder-decoder GPT-2) is not supported")
        if not d.get("scale_attn_weights", True):
            raise ConversionError("gpt2: scale_attn_weights=False is not supported")
        n_embd = d.get("n_embd", 768)
        return cls(
            vocab_size=d.get("vocab_size", 50257),
            max_seq_len=d.get("n_positions", d.get("n_ctx", 1024)),
            d_model=n_embd,
            n_layers=d.get("n_layer", 12),
            n_heads=d.get("n_head", 12),
            d_mlp=d.get("n_inner") or 4 * n_embd,
            activation=d.get("activation_function", "gelu_new"),
            ln_eps=d.get("layer_norm_epsilon", 1e-5),
            scale_attn_by_inverse_layer_idx=d.get("scale_attn_by_inverse_layer_idx", False),
            tie_embeddings=d.get("tie_word_embeddings", True),
        )

    def to_hf(self) -> dict[str, Any]:
        return {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": self.vocab_size,
            "n_positions": self.max_seq_len,
            "n_embd": self.d_model,
            "n_layer": self.n_layers,
            "n_head": self.n_heads,
            "n_inner": self.d_mlp,
            "activation_function": self.activation,
            "layer_norm_epsilon": self.ln_eps,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": self.scale_attn_by_inverse_layer_idx,
            "reorder_and_upcast_attn": False,
            "tie_word_embeddings": self.tie_embeddings,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
        }
