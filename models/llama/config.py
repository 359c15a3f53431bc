"""Llama-family configuration (Llama 1-3.x, Mistral, Qwen2, Qwen3) and its mapping to/from HF config.json.

The four HF model types share one architecture (RMSNorm, SwiGLU, rotary, grouped-query
attention) and differ only in configuration: Qwen2 adds q/k/v biases and per-layer sliding
windows, Mistral a sliding window on every layer, Qwen3 an RMSNorm of each query / key head
(``q_norm`` / ``k_norm``) and no biases. Every variant reads scaled rotary embeddings
(``rope_scaling`` / ``rope_parameters`` of type linear, dynamic, yarn, llama3 or longrope: Llama
3.1+ uses llama3). ``variant`` records which HF model type a config came from so that ``to_hf``
writes a config the same HF class loads back.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

from jaxinterp.hf import ConversionError, build_config, read_model_type
from jaxinterp.models.common import check_activation
from jaxinterp.models.rope import RopeScaling, hf_context, make_rope, read_full_rope, rope_to_hf, usable_context
from jaxinterp.models.transformer.arch import Arch

VARIANTS = ("llama", "mistral", "qwen2", "qwen3")
_QWEN_WINDOWS = {"use_sliding_window", "sliding_window", "max_window_layers", "layer_types"}

_COMMON_HANDLED = {
    "vocab_size", "max_position_embeddings", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "intermediate_size", "hidden_act", "rms_norm_eps", "tie_word_embeddings",
    "rope_parameters", "rope_theta", "rope_scaling",
}
_HANDLED = {
    "llama": _COMMON_HANDLED | {"attention_bias", "mlp_bias"},
    "mistral": _COMMON_HANDLED | {"sliding_window"},
    "qwen2": _COMMON_HANDLED | _QWEN_WINDOWS,
    "qwen3": _COMMON_HANDLED | _QWEN_WINDOWS | {"attention_bias"},
}
_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM"}
# Dropout does not change the eval forward; pretraining_tp only split matmuls during training.
_IGNORED = {"attention_dropout", "pretraining_tp"}





@dataclasses.dataclass(frozen=True, kw_only=True)
class LlamaConfig:
    """Llama / Mistral / Qwen2 / Qwen3 decoder.

    ``n_kv_heads`` < ``n_heads`` gives grouped-query attention (1 = multi-query); ``None`` means
    ``n_heads``. ``head_dim`` ``None`` means ``d_model // n_heads``. ``qkv_bias``/``o_bias`` are the
    attention projection biases (Llama's and Qwen3's ``attention_bias`` sets both; Qwen2 has q/k/v
    only). ``qk_norm``: RMSNorm of each query and key head before rotary (Qwen3).
    ``sliding_window`` limits each query to the last ``sliding_window`` keys (itself included) on
    the layers in ``sliding_layers`` (``None``: every layer). ``rope_scaling``: a scaled rotary
    (``models.rope.RopeScaling``); with ``dynamic`` NTK, ``max_seq_len`` is ``factor`` times the
    trained context (``rope_scaling.trained_len``, HF ``max_position_embeddings``).
    """

    variant: str = "llama"
    vocab_size: int = 32000
    max_seq_len: int = 2048
    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    head_dim: Optional[int] = None
    d_mlp: int = 11008
    activation: str = "silu"
    rms_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: Optional[int] = None
    sliding_layers: Optional[tuple[int, ...]] = None

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"LlamaConfig.variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.head_dim is None and self.n_heads > 0:
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        for name in ("vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_mlp"):
            if getattr(self, name) <= 0:
                raise ValueError(f"LlamaConfig.{name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta}")
        check_activation(self.activation)
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive or None, got {self.sliding_window}")
        if self.sliding_layers is not None:
            object.__setattr__(self, "sliding_layers", tuple(sorted(set(self.sliding_layers))))
            bad = [i for i in self.sliding_layers if not 0 <= i < self.n_layers]
            if bad:
                raise ValueError(f"sliding_layers {bad} are not layers of a {self.n_layers}-layer model")
            if self.sliding_layers == tuple(range(self.n_layers)):  # canonical form of "every layer"
                object.__setattr__(self, "sliding_layers", None)
        if self.sliding_layers == () or self.sliding_window is None:  # canonical form of "no window"
            object.__setattr__(self, "sliding_window", None)
            object.__setattr__(self, "sliding_layers", None)
        self._check_variant()

    def _check_variant(self) -> None:
        """Refuse combinations the variant's HF class cannot express (so ``to_hf`` is faithful)."""
        problems = []
        if self.qk_norm != (self.variant == "qwen3"):
            problems.append("qwen3 (and only qwen3) normalises query / key heads (qk_norm)")
        if self.rope_scaling is not None and self.rope_scaling.rope_type == "dynamic" and \
                self.max_seq_len != usable_context(self.rope_scaling.trained_len, self.rope_scaling):
            problems.append("with dynamic rope, max_seq_len must be factor * rope_scaling.trained_len")
        if self.variant == "llama":
            if self.qkv_bias != self.o_bias:
                problems.append("llama's attention_bias sets q/k/v and o biases together (qkv_bias must equal o_bias)")
            if self.sliding_window is not None:
                problems.append("llama has no sliding window (use variant='mistral' or 'qwen2')")
        elif self.variant == "mistral":
            if self.qkv_bias or self.o_bias or self.mlp_bias:
                problems.append("mistral has no biases")
            if self.sliding_layers is not None:
                problems.append("mistral applies its sliding window to every layer (sliding_layers must be None)")
        elif self.variant == "qwen2":
            if not self.qkv_bias or self.o_bias or self.mlp_bias:
                problems.append("qwen2 has q/k/v biases only (qkv_bias=True, o_bias=False, mlp_bias=False)")
        elif self.qkv_bias != self.o_bias or self.mlp_bias:
            problems.append("qwen3's attention_bias sets q/k/v and o biases together, and it has no MLP bias")
        if problems:
            raise ValueError(f"LlamaConfig(variant={self.variant!r}): " + "; ".join(problems))

    def window_for(self, layer: int) -> Optional[int]:
        """The sliding window of ``layer`` (None = full causal attention)."""
        if self.sliding_window is None:
            return None
        if self.sliding_layers is None or layer in self.sliding_layers:
            return self.sliding_window
        return None

    @property
    def arch(self) -> Arch:
        """Llama on the shared block: RMSNorm, rotary, gated MLP, grouped-query attention."""
        return Arch(vocab_size=self.vocab_size, d_model=self.d_model, n_layers=self.n_layers, n_heads=self.n_heads,
                    n_kv_heads=self.n_kv_heads, head_dim=self.head_dim, d_mlp=self.d_mlp, max_seq_len=self.max_seq_len,
                    norm="rmsnorm", norm_eps=self.rms_eps, qkv_bias=self.qkv_bias, o_bias=self.o_bias,
                    windows=tuple(self.window_for(i) for i in range(self.n_layers)) if self.sliding_window else None,
                    rope=make_rope(self.head_dim, self.rope_theta, self.rope_scaling,
                                   max_position_embeddings=hf_context(self.max_seq_len, self.rope_scaling)),
                    qk_norm="head" if self.qk_norm else "none", gated=True, activation=self.activation,
                    mlp_bias=self.mlp_bias, tie_embeddings=self.tie_embeddings)

    # presets ---------------------------------------------------------------------------
    @classmethod
    def llama_tiny(cls, **kw) -> "LlamaConfig":
        """A small GQA Llama for tests and examples."""
        defaults = dict(vocab_size=512, max_seq_len=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=176)
        return cls(**{**defaults, **kw})

    @classmethod
    def mistral_tiny(cls, **kw) -> "LlamaConfig":
        defaults = dict(variant="mistral", vocab_size=512, max_seq_len=128, d_model=64, n_layers=2, n_heads=4,
                        n_kv_heads=2, d_mlp=176, sliding_window=16)
        return cls(**{**defaults, **kw})

    @classmethod
    def qwen2_tiny(cls, **kw) -> "LlamaConfig":
        defaults = dict(variant="qwen2", vocab_size=512, max_seq_len=128, d_model=64, n_layers=2, n_heads=4,
                        n_kv_heads=2, d_mlp=176, qkv_bias=True, tie_embeddings=True, rope_theta=1e6)
        return cls(**{**defaults, **kw})

    @classmethod
    def qwen3_tiny(cls, **kw) -> "LlamaConfig":
        defaults = dict(variant="qwen3", vocab_size=512, max_seq_len=128, d_model=64, n_layers=2, n_heads=4,
                        n_kv_heads=2, head_dim=32, d_mlp=176, qk_norm=True, tie_embeddings=True, rope_theta=1e6)
        return cls(**{**defaults, **kw})

    @classmethod
    def llama3_tiny(cls, **kw) -> "LlamaConfig":
        """A small Llama 3.1-style model (llama3 rotary scaling)."""
        scaling = RopeScaling.of("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=32)
        defaults = dict(vocab_size=512, max_seq_len=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=176,
                        rope_theta=500000.0, rope_scaling=scaling)
        return cls(**{**defaults, **kw})

    @classmethod
    def llama3_1_8b(cls, **kw) -> "LlamaConfig":
        scaling = RopeScaling.of("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                 original_max_position_embeddings=8192)
        defaults = dict(vocab_size=128256, max_seq_len=131072, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                        d_mlp=14336, rms_eps=1e-5, rope_theta=500000.0, rope_scaling=scaling)
        return cls(**{**defaults, **kw})

    @classmethod
    def llama2_7b(cls, **kw) -> "LlamaConfig":
        return cls(**{**dict(rms_eps=1e-5, max_seq_len=4096), **kw})

    @classmethod
    def tinyllama_1b(cls, **kw) -> "LlamaConfig":
        defaults = dict(d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4, d_mlp=5632, rms_eps=1e-5)
        return cls(**{**defaults, **kw})

    @classmethod
    def mistral_7b(cls, **kw) -> "LlamaConfig":
        defaults = dict(variant="mistral", max_seq_len=32768, n_kv_heads=8, d_mlp=14336, rms_eps=1e-5,
                        sliding_window=4096)
        return cls(**{**defaults, **kw})

    @classmethod
    def qwen2_0_5b(cls, **kw) -> "LlamaConfig":
        defaults = dict(variant="qwen2", vocab_size=151936, max_seq_len=32768, d_model=896, n_layers=24, n_heads=14,
                        n_kv_heads=2, d_mlp=4864, qkv_bias=True, tie_embeddings=True, rope_theta=1e6)
        return cls(**{**defaults, **kw})

    # HF --------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, d: Mapping[str, Any]) -> "LlamaConfig":
        variant = read_model_type("llama", d, VARIANTS, _HANDLED, _IGNORED, default="llama")
        context = d.get("max_position_embeddings", 2048)
        theta, scaling = read_full_rope(variant, d, max_position_embeddings=context)
        n_heads = d.get("num_attention_heads", 32)
        d_model = d.get("hidden_size", 4096)
        attention_bias = bool(d.get("attention_bias", False))
        kw: dict[str, Any] = dict(
            variant=variant,
            vocab_size=d.get("vocab_size", 32000),
            max_seq_len=usable_context(context, scaling),
            d_model=d_model,
            n_layers=d.get("num_hidden_layers", 32),
            n_heads=n_heads,
            n_kv_heads=d.get("num_key_value_heads") or n_heads,
            head_dim=d.get("head_dim") or d_model // n_heads,
            d_mlp=d.get("intermediate_size", 11008),
            activation=d.get("hidden_act", "silu"),
            rms_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=attention_bias or variant == "qwen2",
            o_bias=attention_bias,
            mlp_bias=bool(d.get("mlp_bias", False)),
            qk_norm=variant == "qwen3",
        )
        if variant == "mistral":
            kw["sliding_window"] = d.get("sliding_window")
        elif variant in ("qwen2", "qwen3"):
            kw["sliding_window"], kw["sliding_layers"] = _qwen2_windows(d, kw["n_layers"])
        return build_config(cls, variant, **kw)

    def to_hf(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model_type": self.variant,
            "architectures": [_CLASSES[self.variant]],
            "vocab_size": self.vocab_size,
            "max_position_embeddings": hf_context(self.max_seq_len, self.rope_scaling),
            "hidden_size": self.d_model,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.d_mlp,
            "hidden_act": self.activation,
            "rms_norm_eps": self.rms_eps,
            "rope_parameters": rope_to_hf(self.rope_theta, self.rope_scaling),
            "tie_word_embeddings": self.tie_embeddings,
            "attention_dropout": 0.0,
        }
        if self.variant == "llama":
            out.update(attention_bias=self.o_bias, mlp_bias=self.mlp_bias)
        elif self.variant == "mistral":
            out["sliding_window"] = self.sliding_window
        else:
            if self.variant == "qwen3":
                out["attention_bias"] = self.o_bias
            sliding = [self.window_for(i) is not None for i in range(self.n_layers)]
            out.update(
                use_sliding_window=any(sliding),
                sliding_window=self.sliding_window if any(sliding) else None,
                max_window_layers=sliding.index(True) if any(sliding) else self.n_layers,
                layer_types=["sliding_attention" if s else "full_attention" for s in sliding],
            )
        return out


def _qwen2_windows(d: Mapping[str, Any], n_layers: int) -> tuple[Optional[int], Optional[tuple[int, ...]]]:
    """Qwen2/3's sliding window and the layers that use it (HF: ``layer_types`` or ``max_window_layers``)."""
    if not d.get("use_sliding_window", False) or d.get("sliding_window") is None:
        return None, None
    layer_types = d.get("layer_types")
    if layer_types is None:
        start = d.get("max_window_layers", 28)
        layer_types = ["sliding_attention" if i >= start else "full_attention" for i in range(n_layers)]
    valid = {"sliding_attention", "full_attention"}
    if len(layer_types) != n_layers or not set(layer_types) <= valid:
        raise ConversionError(
            f"{d.get('model_type')}: layer_types must list one of {sorted(valid)} per layer ({n_layers}), got {layer_types}"
        )
    layers = tuple(i for i, t in enumerate(layer_types) if t == "sliding_attention")
    return (d["sliding_window"], layers) if layers else (None, None)
