"""SAEs from the public ecosystem: ``load(path)`` detects the format, ``save(sae, path, format="saelens")``.

    sae = ji.sae.load("gemma-scope-2b-pt-res/layer_12/width_16k/average_l0_82", site="blocks.12.resid_post")
    sae = ji.sae.load("my_saelens_dir")          # sae.site from its hook_name
    out = model.run(tokens, interventions={sae.site: ji.sae.Splice(sae)})
    ji.sae.save(sae, "out_dir", format="saelens")

Formats (``FORMATS``), each read into the jaxinterp SAE family computing the same latents:

* ``gemmascope``: a ``params.npz`` (or a directory holding one), ``gemmascope.py``;
* ``saelens``: a directory with ``cfg.json`` + ``sae_weights.safetensors``, ``saelens.py``;
* ``dictlearn``: a dictionary_learning ``ae.pt`` / ``ae.safetensors`` (or a directory holding
  one, with the trainer's ``config.json``), ``dictlearn.py``.

``site=`` (a site name or a TransformerLens hook name, ``hooks.TL_HOOKS``) sets or overrides
the site the SAE reads; per-head sites (``attn.q/k/v/z``) are read with their heads flattened.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..families import SAE
from .common import FormatError, reads_for
from .dictlearn import DICTLEARN_FILES, read_dictlearn
from .gemmascope import read_gemmascope
from .hooks import TL_HOOKS, UnknownHookError, hook_for_site, site_for_hook
from .saelens import read_saelens, write_saelens

__all__ = ["load", "save", "detect_format", "FORMATS", "SAVE_FORMATS", "FormatError", "UnknownHookError", "TL_HOOKS",
           "site_for_hook", "hook_for_site", "read_gemmascope", "read_saelens", "write_saelens", "read_dictlearn"]

FORMATS = ("gemmascope", "saelens", "dictlearn")
SAVE_FORMATS = ("saelens",)
_EXPECTED = ("a Gemma Scope params.npz, a SAELens directory (cfg.json + sae_weights.safetensors), or a "
             "dictionary_learning checkpoint (ae.pt / ae.safetensors)")


def detect_format(path: str | os.PathLike) -> str:
    """The format of ``path`` (one of ``FORMATS``), from its file names."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; expected {_EXPECTED}")
    if path.is_file():
        if path.suffix == ".npz":
            return "gemmascope"
        if path.name in ("cfg.json", "sae_weights.safetensors"):
            return "saelens"
        if path.suffix in (".pt", ".safetensors"):
            return "dictlearn"
    else:
        if (path / "params.npz").exists():
            return "gemmascope"
        if (path / "cfg.json").exists() and (path / "sae_weights.safetensors").exists():
            return "saelens"
        if any((path / f).exists() for f in DICTLEARN_FILES):
            return "dictlearn"
    raise FormatError(f"cannot tell the SAE format of {path}; expected {_EXPECTED}")


def load(path: str | os.PathLike, *, format: str | None = None, site: str | None = None,
         norm_scaling_factor: float | None = None, dict_class: str | None = None) -> SAE:
    """Read an SAE from ``path`` (format detected unless given).

    ``site``: the site (or TransformerLens hook) the SAE reads, where the file names none or to override it.
    ``norm_scaling_factor``: SAELens ``expected_average_only_in`` scaling, where the directory lacks it.
    ``dict_class``: the dictionary_learning class, where no ``config.json`` names it.
    """
    fmt = format or detect_format(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown SAE format {fmt!r}; choose one of {list(FORMATS)}")
    if fmt == "gemmascope":
        sae = read_gemmascope(path)
    elif fmt == "saelens":
        sae = read_saelens(path, norm_scaling_factor=norm_scaling_factor)
    else:
        sae = read_dictlearn(path, dict_class=dict_class)
    return sae if site is None else sae.replace(reads=reads_for(site))


def save(sae: SAE, path: str | os.PathLike, *, format: str = "saelens", model_name: str = "",
         context_size: int | None = None) -> Path:
    """Write ``sae`` to ``path`` (atomically) in ``format`` (``SAVE_FORMATS``)."""
    if format not in SAVE_FORMATS:
        raise ValueError(f"cannot save SAEs as {format!r}; choose one of {list(SAVE_FORMATS)}")
    return write_saelens(sae, path, model_name=model_name, context_size=context_size)
