"""Phi-3 port (``model_type: phi3``) on the shared transformer block (fused qkv / gate_up split at load)."""

from jaxinterp.models.transformer.family import transformer_family

from . import convert
from .config import Phi3Config

FAMILY = transformer_family(
    name="phi3",
    config_cls=Phi3Config,
    hf_model_types=("phi3",),
    entries=convert.entries,
    hf_modules=convert.hf_modules,
    ignorable=convert.IGNORABLE,
    tied=("lm_head.weight", "model.embed_tokens.weight"),
)

__all__ = ["Phi3Config", "FAMILY"]
