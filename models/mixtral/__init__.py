"""Mixture-of-experts port (``model_type``: ``mixtral``, ``olmoe``) on the shared transformer block."""

from jaxinterp.models.transformer.family import transformer_family

from . import convert
from .config import MixtralConfig

FAMILY = transformer_family(
    name="mixtral",
    config_cls=MixtralConfig,
    hf_model_types=("mixtral", "olmoe"),
    entries=convert.entries,
    hf_modules=convert.hf_modules,
    ignorable=convert.IGNORABLE,
    tied=("lm_head.weight", "model.embed_tokens.weight"),
    pack=convert.pack,
    unpack=convert.unpack,
)

__all__ = ["MixtralConfig", "FAMILY"]
