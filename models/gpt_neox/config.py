"""GPT-NeoX / Pythia configuration (frozen, keyword-only) and its mapping to/from HF config.json."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from jaxinterp.hf import ConversionError, check_config_fields
from jaxinterp.models.common import Rope, check_activation
from jaxinterp.models.rope import read_rope
from jaxinterp.models.transformer.arch import Arch

_HANDLED = {
    "vocab_size", "max_position_embeddings", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "intermediate_size", "hidden_act", "layer_norm_eps", "use_parallel_residual", "attention_bias",
    "tie_word_embeddings", "rope_parameters", "rope_scaling", "rotary_pct", "rotary_emb_base", "rope_theta",
    "partial_rotary_factor",
}
# Dropout and the classification head's dropout do not change the eval forward.
_IGNORED = {"attention_dropout", "hidden_dropout", "classifier_dropout", "attention_probs_dropout_prob",
            "hidden_dropout_prob"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class GPTNeoXConfig:
    """GPT-NeoX decoder (Pythia, GPT-NeoX-20B).

    ``rotary_pct`` is the fraction of each head's features that rotary rotates (the rest pass
    through); ``parallel_residual`` adds attention and MLP outputs computed from the same
    ``resid_pre`` (no ``resid_mid`` site) instead of feeding the MLP from ``resid_mid``.
    ``attention_bias`` gives ``query_key_value`` and ``dense`` biases.
    """

    vocab_size: int = 50304
    max_seq_len: int = 2048
    d_model: int = 512
    n_layers: int = 6
    n_heads: int = 8
    d_mlp: int = 2048
    activation: str = "gelu"
    ln_eps: float = 1e-5
    rotary_pct: float = 0.25
    rope_theta: float = 10000.0
    parallel_residual: bool = True
    attention_bias: bool = True
    tie_embeddings: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads", "d_mlp"):
            if getattr(self, name) <= 0:
                raise ValueError(f"GPTNeoXConfig.{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if not 0.0 < self.rotary_pct <= 1.0:
            raise ValueError(f"rotary_pct must lie in (0, 1], got {self.rotary_pct}")
        if self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ValueError(
                f"rotary_pct={self.rotary_pct} of head_dim={self.head_dim} gives rotary_dim={self.rotary_dim}; "
                f"it must be a positive even number"
            )
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta}")
        check_activation(self.activation)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def arch(self) -> Arch:
        """GPT-NeoX on the shared block: LayerNorm, partial rotary, plain MLP, parallel residual by default."""
        return Arch(vocab_size=self.vocab_size, d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads,
                    n_kv_heads=self.n_heads, head_dim=self.head_dim, d_mlp=self.d_mlp, max_seq_len=self.max_seq_len,
                    norm="layernorm", norm_eps=self.ln_eps, norm_bias=True,
                    parallel="separate" if self.parallel_residual else "none",
                    qkv_bias=self.attention_bias, o_bias=self.attention_bias,
                    rope=Rope.default(self.rotary_dim, self.rope_theta), gated=False, activation=self.activation,
                    mlp_bias=True, tie_embeddings=self.tie_embeddings)

    @property
    def rotary_dim(self) -> int:
        """Rotated features per head (HF: ``int(head_dim * partial_rotary_factor)``)."""
        return int(self.head_dim * self.rotary_pct)

    # presets ---------------------------------------------------------------------------
    @classmethod
    def pythia_70m(cls, **kw) -> "GPTNeoXConfig":
        return cls(**kw)

    @classmethod
    def pythia_160m(cls, **kw) -> "GPTNeoXConfig":
        return cls(**{**dict(d_model=768, n_layers=12, n_heads=12, d_mlp=3072), **kw})

    @classmethod
    def pythia_410m(cls, **kw) -> "GPTNeoXConfig":
        return cls(**{**dict(d_model=1024, n_layers=24, n_heads=16, d_mlp=4096), **kw})

    @classmethod
    def tiny(cls, **kw) -> "GPTNeoXConfig":
        defaults = dict(vocab_size=512, max_seq_len=128, d_model=64, n_layers=2, n_heads=4, d_mlp=256)
        return cls(**{**defaults, **kw})

    # HF --------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> "GPTNeoXConfig":
        check_config_fields("gpt_neox", d, _HANDLED, _IGNORED)
        theta, factor = read_rope("gpt_neox", d, default_factor=0.25, legacy_theta="rotary_emb_base",
                                  legacy_factor="rotary_pct")
        try:
            return cls(
                vocab_size=d.get("vocab_size", 50432),
                max_seq_len=d.get("max_position_embeddings", 2048),
                d_model=d.get("hidden_size", 6144),
                n_layers=d.get("num_hidden_layers", 44),
                n_heads=d.get("num_attention_heads", 64),
                d_mlp=d.get("intermediate_size", 24576),
                activation=d.get("hidden_act", "gelu"),
                ln_eps=d.get("layer_norm_eps", 1e-5),
                rotary_pct=factor,
                rope_theta=theta,
                parallel_residual=bool(d.get("use_parallel_residual", True)),
                attention_bias=bool(d.get("attention_bias", True)),
                tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            )
        except ValueError as err:
            raise ConversionError(f"gpt_neox: {err}") from err

    def to_hf(self) -> dict[str, Any]:
        return {
            "model_type": "gpt_neox",
            "architectures": ["GPTNeoXForCausalLM"],
            "vocab_size": self.vocab_size,
            "max_position_embeddings": self.max_seq_len,
            "hidden_size": self.d_model,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "intermediate_size": self.d_mlp,
            "hidden_act": self.activation,
            "layer_norm_eps": self.ln_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta,
                                "partial_rotary_factor": self.rotary_pct},
            "use_parallel_residual": self.parallel_residual,
            "attention_bias": self.attention_bias,
            "tie_word_embeddings": self.tie_embeddings,
            "attention_dropout": 0.0,
            "hidden_dropout": 0.0,
        }
