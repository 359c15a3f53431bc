"""jaxinterp: mechanistic interpretability as JAX function transforms.

    import jaxinterp as ji
    model = ji.load("facts-gpt")
    out = model.run(tokens, capture="blocks.*.resid_post",
                    interventions={"blocks.3.attn.z": ji.ZeroAblate(ji.heads_mask(T, H, [2]))})
"""

from jaxinterp.interventions import (
    Add,
    ByLayer,
    Compose,
    Fn,
    Intervention,
    MeanAblate,
    Noise,
    Patch,
    ProjectOut,
    Scale,
    Steer,
    ZeroAblate,
    heads_mask,
    positions_mask,
)
from jaxinterp.remote.wire import load_intervention, save_intervention
from jaxinterp.loading import ConversionError, embedded_models, load, save_pretrained
from jaxinterp.families import families, get_family
from jaxinterp.generate import Generation, generate
from jaxinterp.model import Model, RunOutput, init, run
from jaxinterp.sites import UnknownSiteError, resolve_sites

__version__ = "0.1.0"

# Subpackages imported on first attribute access (``ji.patching.trace(...)``), so that
# ``import jaxinterp`` stays fast and pulls in no optional machinery.
_LAZY_SUBMODULES = (
    "patching", "editing", "sae", "lora", "unlearning", "sharding", "checkpoint", "heads", "grads", "hf",
    "interventions", "sites", "models", "steering", "remote", "lens", "attribution", "folding", "viz", "interop",
    "readout",
)


def __getattr__(name):
    if name == "fold_layer_norm":  # ji.fold_layer_norm(model): a function of jaxinterp.folding
        from jaxinterp.folding import fold_layer_norm

        return fold_layer_norm
    if name in _LAZY_SUBMODULES:
        import importlib

        module = importlib.import_module(f"jaxinterp.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'jaxinterp' has no attribute {name!r}")


__all__ = [
    "load", "save_pretrained", "fold_layer_norm", "embedded_models", "init", "run", "generate", "Generation", "Model",
    "RunOutput", "families", "get_family", "Patch", "ZeroAblate", "MeanAblate", "Add", "Scale", "ProjectOut", "Noise",
    "Fn", "Compose", "ByLayer", "Steer", "Intervention",
    "positions_mask", "heads_mask", "save_intervention", "load_intervention", "resolve_sites", "UnknownSiteError",
    "ConversionError",
]
