"""Save/load SAEs in SAELens's on-disk layout: ``cfg.json`` + ``sae_weights.safetensors``.

Weights: ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc [d_sae]`` (``b_gate``
for gated), ``b_dec [d_in]``, plus ``threshold [d_sae]`` (jumprelu) or ``r_mag``,
``b_mag`` (gated). SAELens encodes ``x - b_dec`` (``apply_b_dec_to_input``); our input
scale ``s`` is folded into the weights on export (``W_enc * s``, ``W_dec / s``,
``b_dec / s``) so the file needs no normalisation (``normalize_activations: "none"``)
and encodes raw activations exactly as we do. ``relu`` / ``panneal`` are written as
``standard``, ``batchtopk`` as ``jumprelu`` with its scalar inference threshold on every
latent (as SAELens does for BatchTopK at inference).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from .families import SAE, init_sae

__all__ = ["save_saelens", "load_saelens", "ARCHITECTURES"]

ARCHITECTURES = {"relu": "standard", "panneal": "standard", "topk": "topk", "batchtopk": "jumprelu",
                 "jumprelu": "jumprelu", "gated": "gated"}
_FROM_ARCH = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated"}


def save_saelens(sae: SAE, path: str | os.PathLike, *, model_name: str = "", hook_name: str = "",
                 context_size: int | None = None) -> Path:
    """Write ``sae`` (one SAE, not a stacked grid) to ``path``."""
    p = {k: np.asarray(v, np.float32) for k, v in sae.params.items()}
    if p["W_dec"].ndim != 2:
        raise ValueError(f"save_saelens takes one SAE; got W_dec of shape {p['W_dec'].shape} (unstack a grid first)")
    s = float(sae.buffers["input_scale"])
    tensors = {"W_enc": p["W_enc"] * s, "W_dec": p["W_dec"] / s, "b_dec": p["b_dec"] / s}
    family = sae.family
    if family == "gated":
        tensors.update(b_gate=p["b_enc"], r_mag=p["r_mag"], b_mag=p["b_mag"])
    else:
        tensors["b_enc"] = p["b_enc"]
    if family == "jumprelu":
        tensors["threshold"] = np.exp(p["log_threshold"])
    if family == "batchtopk":
        tensors["threshold"] = np.full(sae.d_sae, max(float(sae.buffers["threshold"]), 0.0), np.float32)
    cfg = {"architecture": ARCHITECTURES[family], "d_in": sae.d_in, "d_sae": sae.d_sae, "dtype": "float32",
           "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
           "reshape_activations": "none",
           "metadata": {"model_name": model_name, "hook_name": hook_name, "context_size": context_size,
                        "sae_lens_training_version": None, "jaxinterp_family": family}}
    if family == "topk":
        cfg["k"] = int(sae.buffers["k"])
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path / "sae_weights.safetensors"))
    (path / "cfg.json").write_text(json.dumps(cfg, indent=2))
    return path


def load_saelens(path: str | os.PathLike) -> SAE:
    """Read a SAELens directory (architectures standard, topk, jumprelu, gated) as a jaxinterp SAE."""
    path = Path(path)
    cfg = json.loads((path / "cfg.json").read_text())
    arch = cfg.get("architecture", "standard")
    if arch not in _FROM_ARCH:
        raise ValueError(f"{path}: unsupported SAELens architecture {arch!r}; supported: {sorted(_FROM_ARCH)}")
    if cfg.get("normalize_activations", "none") != "none":
        raise ValueError(f"{path}: normalize_activations={cfg['normalize_activations']!r} is not supported "
                         f"(only 'none')")
    if cfg.get("reshape_activations", "none") != "none":
        raise ValueError(f"{path}: reshape_activations={cfg['reshape_activations']!r} is not supported")
    t = load_file(str(path / "sae_weights.safetensors"))
    d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    want = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    for name, shape in want.items():
        if name not in t or t[name].shape != shape:
            raise ValueError(f"{path}: tensor {name} must have shape {shape}, got "
                             f"{t[name].shape if name in t else 'nothing'}")
    b_dec = t["b_dec"] if cfg.get("apply_b_dec_to_input", True) else np.zeros(d_in, np.float32)
    if not cfg.get("apply_b_dec_to_input", True):
        raise ValueError(f"{path}: apply_b_dec_to_input=False is not supported")
    family = _FROM_ARCH[arch]
    k = int(cfg.get("k", 0))
    sae = init_sae(family, __import__("jax").random.PRNGKey(0), d_in, d_sae, k=k, k_max=k or None)
    params = {"W_enc": t["W_enc"], "W_dec": t["W_dec"], "b_dec": b_dec,
              "b_enc": t["b_gate"] if family == "gated" else t["b_enc"]}
    if family == "gated":
        params.update(r_mag=t["r_mag"], b_mag=t["b_mag"])
    if family == "jumprelu":
        params["log_threshold"] = np.log(np.maximum(t["threshold"], 1e-30))
    return sae.replace(params={k_: jnp.asarray(v, jnp.float32) for k_, v in params.items()})
