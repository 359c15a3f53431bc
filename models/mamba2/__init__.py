"""Mamba-2 port (``model_type: mamba2``, HF ``Mamba2ForCausalLM``): the SSD mixer on Mamba's layer,
shell, cache and stepper; site layouts in ``model.py``, the scan in ``scan.py``."""

from .config import Mamba2Config
from .family import FAMILY
from .model import Mamba2, site_names
from .scan import ssd_outputs, ssd_states

__all__ = ["Mamba2Config", "Mamba2", "FAMILY", "site_names", "ssd_states", "ssd_outputs"]
