"""Llama-family port (``model_type``: ``llama`` (1-3.x), ``mistral``, ``qwen2``, ``qwen3``) on the shared transformer block."""

from jaxinterp.models.transformer.family import transformer_family

from . import convert
from .config import LlamaConfig

FAMILY = transformer_family(
    name="llama",
    config_cls=LlamaConfig,
    hf_model_types=("llama", "mistral", "qwen2", "qwen3"),
    entries=convert.entries,
    hf_modules=convert.hf_modules,
    ignorable=convert.IGNORABLE,
    tied=("lm_head.weight", "model.embed_tokens.weight"),
)

__all__ = ["LlamaConfig", "FAMILY"]
