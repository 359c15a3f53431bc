"""GPT-2 port (``model_type: gpt2``) on the shared transformer block."""

from jaxinterp.models.transformer.family import transformer_family

from . import convert
from .config import GPT2Config

FAMILY = transformer_family(
    name="gpt2",
    config_cls=GPT2Config,
    hf_model_types=("gpt2",),
    entries=convert.entries,
    hf_modules=convert.hf_modules,
    fan_in_fan_out=True,
    ignorable=convert.IGNORABLE,
    rename=convert.canonical,
    tied=("lm_head.weight", "transformer.wte.weight"),
)

__all__ = ["GPT2Config", "FAMILY"]
