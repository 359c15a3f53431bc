"""OLMo-2 port (``model_type: olmo2``) on the shared transformer block (post-norm placement)."""

from jaxinterp.models.transformer.family import transformer_family

from . import convert
from .config import Olmo2Config

FAMILY = transformer_family(
    name="olmo2",
    config_cls=Olmo2Config,
    hf_model_types=("olmo2",),
    entries=convert.entries,
    hf_modules=convert.hf_modules,
    ignorable=convert.IGNORABLE,
    tied=("lm_head.weight", "model.embed_tokens.weight"),
)

__all__ = ["Olmo2Config", "FAMILY"]
