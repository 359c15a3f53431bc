"""GPT-NeoX / Pythia port (``model_type: gpt_neox``) on the shared transformer block."""

from jaxinterp.models.transformer.family import transformer_family

from . import convert
from .config import GPTNeoXConfig

FAMILY = transformer_family(
    name="gpt_neox",
    config_cls=GPTNeoXConfig,
    hf_model_types=("gpt_neox",),
    entries=convert.entries,
    hf_modules=convert.hf_modules,
    ignorable=convert.IGNORABLE,
    rename=convert.canonical,
    tied=("embed_out.weight", "gpt_neox.embed_in.weight"),
)

__all__ = ["GPTNeoXConfig", "FAMILY"]
