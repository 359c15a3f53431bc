"""GPT-NeoX / Pythia port (``model_type: gpt_neox``)."""

from jaxinterp.model import Family, register_family

from . import convert
from .config import GPTNeoXConfig
from .model import GPTNeoX, attn_out_weights, site_names

FAMILY = register_family(
    Family(
        name="gpt_neox",
        config_cls=GPTNeoXConfig,
        module=GPTNeoX,
        site_names=site_names,
        from_hf=convert.from_hf,
        to_hf=convert.to_hf,
        attn_out_weights=attn_out_weights,
        hf_model_types=("gpt_neox",),
    )
)

__all__ = ["GPTNeoXConfig", "GPTNeoX", "FAMILY", "site_names", "attn_out_weights"]
