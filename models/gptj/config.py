"""GPT-J configuration (``model_type: gptj``) and its mapping to/from HF config.json.

One LayerNorm feeds attention and the MLP in parallel (``x + attn(ln(x)) + mlp(ln(x))``), rotary
on the first ``rotary_dim`` features of each head with interleaved pairs, a plain GELU MLP with
biases, and an unembedding with a bias (also when tied to the embedding).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from jaxinterp.hf import ConversionError, build_config, read_model_type
from jaxinterp.models.common import Rope, check_activation
from jaxinterp.models.transformer.arch import Arch
from jaxinterp.models.transformer.convert import check_positive

_HANDLED = {"vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "rotary_dim", "n_inner",
            "activation_function", "layer_norm_epsilon", "tie_word_embeddings", "rotary", "scale_attn_weights"}
# Dropout and training switches do not change the eval forward; summary_* configure a
# sequence-summary head the causal LM does not have.
_IGNORED = {"resid_pdrop", "embd_pdrop", "attn_pdrop", "gradient_checkpointing", "summary_type", "summary_use_proj",
            "summary_activation", "summary_proj_to_labels", "summary_first_dropout"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTJConfig:
    """GPT-J decoder (multi-head attention; ``d_mlp`` None means ``4 * d_model``)."""

    vocab_size: int = 50400
    max_seq_len: int = 2048
    d_model: int = 4096
    n_layers: int = 28
    n_heads: int = 16
    rotary_dim: int = 64
    d_mlp: int | None = None
    activation: str = "gelu_new"
    ln_eps: float = 1e-5
    tie_embeddings: bool = False

    def __post_init__(self):
        if self.d_mlp is None:
            object.__setattr__(self, "d_mlp", 4 * self.d_model)
        check_positive("GPTJConfig", self, ("vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads",
                                            "rotary_dim", "d_mlp"))
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ValueError(f"rotary_dim must be even and <= head_dim ({self.head_dim}), got {self.rotary_dim}")
        check_activation(self.activation)

    @property
    def n_kv_heads(self) -> int:
        return self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def arch(self) -> Arch:
        return Arch(vocab_size=self.vocab_size, d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads,
                    n_kv_heads=self.n_heads, head_dim=self.head_dim, d_mlp=self.d_mlp, max_seq_len=self.max_seq_len,
                    norm="layernorm", norm_eps=self.ln_eps, norm_bias=True, parallel="shared",
                    rope=Rope.default(self.rotary_dim, 10000.0, interleaved=True), gated=False,
                    activation=self.activation, mlp_bias=True, tie_embeddings=self.tie_embeddings, lm_head_bias=True)

    @classmethod
    def tiny(cls, **kw) -> "GPTJConfig":
        defaults = dict(vocab_size=512, max_seq_len=128, d_model=64, n_layers=2, n_heads=4, rotary_dim=8)
        return cls(**{**defaults, **kw})

    @classmethod
    def gptj_6b(cls, **kw) -> "GPTJConfig":
        return cls(**kw)

    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> "GPTJConfig":
        read_model_type("gptj", d, ("gptj",), _HANDLED, _IGNORED)
        for flag in ("rotary", "scale_attn_weights"):
            if not d.get(flag, True):
                raise ConversionError(f"gptj: {flag}=false is not GPT-J's computation; supported: true")
        if d.get("rotary_dim") is None:
            raise ConversionError("gptj: rotary_dim=null is not supported (transformers' GPT-J needs it for "
                                  "multi-head attention); set it to the rotated features per head")
        return build_config(cls, "gptj", vocab_size=d.get("vocab_size", 50400), max_seq_len=d.get("n_positions", 2048),
                            d_model=d.get("n_embd", 4096), n_layers=d.get("n_layer", 28), n_heads=d.get("n_head", 16),
                            rotary_dim=d["rotary_dim"], d_mlp=d.get("n_inner"),
                            activation=d.get("activation_function", "gelu_new"),
                            ln_eps=d.get("layer_norm_epsilon", 1e-5),
                            tie_embeddings=bool(d.get("tie_word_embeddings", False)))

    def to_hf(self) -> dict[str, Any]:
        return {"model_type": "gptj", "architectures": ["GPTJForCausalLM"], "vocab_size": self.vocab_size,
                "n_positions": self.max_seq_len, "n_embd": self.d_model, "n_layer": self.n_layers,
                "n_head": self.n_heads, "rotary_dim": self.rotary_dim, "n_inner": self.d_mlp,
                "activation_function": self.activation, "layer_norm_epsilon": self.ln_eps,
                "tie_word_embeddings": self.tie_embeddings, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
