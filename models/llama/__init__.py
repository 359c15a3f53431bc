"""Llama-family port (``model_type``: ``llama``, ``mistral``, ``qwen2``)."""

from jaxinterp.model import Family, register_family

from . import convert
from .config import LlamaConfig
from .model import Llama, attn_out_weights, site_names

FAMILY = register_family(
    Family(
        name="llama",
        config_cls=LlamaConfig,
        module=Llama,
        site_names=site_names,
        from_hf=convert.from_hf,
        to_hf=convert.to_hf,
        attn_out_weights=attn_out_weights,
        hf_model_types=("llama", "mistral", "qwen2"),
    )
)

__all__ = ["LlamaConfig", "Llama", "FAMILY", "site_names", "attn_out_weights"]
