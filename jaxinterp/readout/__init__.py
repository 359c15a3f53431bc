"""Reading representations out of a model's hidden states.

- ``erasure``: per-layer token probes, the token-erasure score and the implicit-vocabulary readout
  (Feucht et al., 2024).
- ``lre``: linear relational embeddings of factual relations (Hernandez et al., 2024).

Submodules are imported on first attribute access (``jaxinterp.readout.erasure``).
"""

import importlib

__all__ = ["erasure", "lre"]


def __getattr__(name):
    if name in __all__:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
