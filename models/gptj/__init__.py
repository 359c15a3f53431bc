"""GPT-J port (``model_type: gptj``) on the shared transformer block (shared-norm parallel residual)."""

from jaxinterp.models.transformer.family import transformer_family

from . import convert
from .config import GPTJConfig

FAMILY = transformer_family(
    name="gptj",
    config_cls=GPTJConfig,
    hf_model_types=("gptj",),
    entries=convert.entries,
    hf_modules=convert.hf_modules,
    ignorable=convert.IGNORABLE,
    tied=("lm_head.weight", "transformer.wte.weight"),
)

__all__ = ["GPTJConfig", "FAMILY"]
