"""Gemma-family port (``model_type``: ``gemma``, ``gemma2``, ``gemma3_text``) on the shared transformer block."""

from jaxinterp.models.transformer.family import transformer_family

from . import convert
from .config import GemmaConfig

FAMILY = transformer_family(
    name="gemma",
    config_cls=GemmaConfig,
    hf_model_types=("gemma", "gemma2", "gemma3_text"),
    entries=convert.entries,
    hf_modules=convert.hf_modules,
    ignorable=convert.IGNORABLE,
    tied=("lm_head.weight", "model.embed_tokens.weight"),
)

__all__ = ["GemmaConfig", "FAMILY"]
