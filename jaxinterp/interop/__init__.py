"""Interoperability with other JAX model libraries.

    pz_model = ji.interop.to_penzai(model)          # a penzai TransformerLM, equal logits
    model = ji.interop.from_penzai(pz_model)        # back: this library's sites, sweeps and patching

penzai is optional (``pip install 'jaxinterp[penzai]'``); these functions raise ImportError with
that hint when it is missing. Families penzai also models (its llama-like and GPT-NeoX
transformers) keep their layout in ``jaxinterp.models.<family>.penzai_interop``.
"""

from jaxinterp.interop.penzai import available as penzai_available
from jaxinterp.interop.penzai import from_penzai, penzai_logits, to_penzai

__all__ = ["to_penzai", "from_penzai", "penzai_logits", "penzai_available"]
