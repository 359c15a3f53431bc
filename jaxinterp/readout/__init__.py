"""Reading representations: what a model's hidden states say, and how it decodes them.

    from jaxinterp.readout import lre
    op = lre.estimate(model, tokens, subject_pos, layer=2, n=8, beta=2.0, attention_mask=mask)

``erasure``: token-erasure probes and the implicit-vocabulary readout (Feucht et al., 2024).
``lre``: linear relational embeddings, a first-order (Jacobian) approximation of how a model maps a
subject's state to the object it predicts (Hernandez et al., 2023).

Submodules are imported on first attribute access.
"""

import importlib

__all__ = ["erasure", "lre"]


def __getattr__(name):
    if name in __all__:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
