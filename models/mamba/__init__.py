"""Mamba-1 port (``model_type: mamba``, HF ``MambaForCausalLM``); site layouts in ``model.py``."""

from jaxinterp.model import Family, register_family

from . import convert
from .config import MambaConfig
from .model import Mamba, param_axes, site_names
from .scan import ssm_outputs, ssm_states

FAMILY = register_family(
    Family(
        name="mamba",
        config_cls=MambaConfig,
        module=Mamba,
        site_names=site_names,
        from_hf=convert.from_hf,
        to_hf=convert.to_hf,
        hf_model_types=("mamba",),
        param_axes=param_axes,
    )
)

__all__ = ["MambaConfig", "Mamba", "FAMILY", "site_names", "param_axes", "ssm_states", "ssm_outputs"]
