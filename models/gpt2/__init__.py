"""GPT-2 port (``model_type: gpt2``)."""

from jaxinterp.model import Family, register_family

from . import convert
from .config import GPT2Config
from .model import GPT2, attn_out_weights, site_names

FAMILY = register_family(
    Family(
        name="gpt2",
        config_cls=GPT2Config,
        module=GPT2,
        site_names=site_names,
        from_hf=convert.from_hf,
        to_hf=convert.to_hf,
        hf_model_types=("gpt2",),
        attn_out_weights=attn_out_weights,
    )
)

__all__ = ["GPT2Config", "GPT2", "FAMILY", "site_names"]
