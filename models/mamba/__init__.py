"""Mamba-1 port (``model_type: mamba``, HF ``MambaForCausalLM``) and Falcon-Mamba (``falcon_mamba``,
``FalconMambaForCausalLM``: the same family with ``MambaConfig.mixer_norm_eps``); site layouts in ``model.py``."""

from .config import MambaConfig
from .family import FAMILY
from .model import Mamba, site_names
from .scan import ssm_outputs, ssm_states

__all__ = ["MambaConfig", "Mamba", "FAMILY", "site_names", "ssm_states", "ssm_outputs"]
