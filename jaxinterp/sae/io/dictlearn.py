"""dictionary_learning checkpoints (Marks et al.): ``ae.pt`` (a torch state dict, read with
``weights_only=True``) or ``ae.safetensors``, with the trainer's ``config.json`` beside it.

The dictionary classes (``dictionary_learning/dictionary.py`` and ``trainers/*.py``), by the
state dict they save (``nn.Linear`` weights are ``[out, in]``):

* ``AutoEncoder``: ``encoder.weight [F, D]``, ``encoder.bias``, ``decoder.weight [D, F]``,
  ``bias [D]``; ``f = relu(encoder(x - bias))``, ``x_hat = decoder(f) + bias``.
* ``AutoEncoderNew``: ``encoder.*``, ``decoder.weight``, ``decoder.bias``; ``f = relu(encoder(x))``,
  ``x_hat = decoder(f)`` (no input centring).
* ``GatedAutoEncoder``: ``encoder.weight`` (no bias), ``decoder.weight``, ``decoder_bias``,
  ``r_mag``, ``gate_bias``, ``mag_bias``; with ``e = encoder(x - decoder_bias)``:
  ``f = (e + gate_bias > 0) * relu(exp(r_mag) * e + mag_bias)``.
* ``AutoEncoderTopK``: ``encoder.*``, ``decoder.weight``, ``b_dec``, ``k``, ``threshold``;
  ``f`` = the ``k`` largest of ``relu(encoder(x - b_dec))`` (its default ``encode``).
* ``BatchTopKSAE``: same tensors; its default ``encode`` thresholds:
  ``a = relu(encoder(x - b_dec))``, ``f = a * (a > threshold)`` (a scalar).
* ``MatryoshkaBatchTopKSAE``: ``W_enc [D, F]``, ``b_enc``, ``W_dec [F, D]``, ``b_dec``, ``k``,
  ``threshold``, ``group_sizes``; ``encode`` as BatchTopKSAE's.
* ``JumpReluAutoEncoder``: ``W_enc``, ``b_enc``, ``W_dec``, ``b_dec``, ``threshold [F]``;
  ``pre = x @ W_enc + b_enc`` (``apply_b_dec_to_input`` is False unless loaded from SAELens),
  ``f = relu(pre * (pre > threshold))``.

Decoding is ``f @ decoder + bias`` throughout. The class comes from ``config.json``
(``trainer.dict_class``) or, without one, from the tensor names (AutoEncoderTopK and
BatchTopKSAE save the same names: those need the config or ``dict_class=``). The site comes
from ``trainer.submodule_name`` where it follows the usual names (``resid_post_layer_3``,
``attn_out_layer3``, ``embed``, ...), else pass ``site=`` to ``load``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from jaxinterp.hf import read_safetensors
from ..families import SAE, sae_from_params
from .common import FormatError, centre_free_b_enc, check_tensors, jumprelu_log_threshold, reads_for

__all__ = ["read_dictlearn", "DICT_CLASSES", "DICTLEARN_FILES"]

DICTLEARN_FILES = ("ae.pt", "ae.safetensors")

_LINEAR = ("encoder.weight", "encoder.bias", "decoder.weight")
# dict_class -> the state-dict tensor names it saves
DICT_CLASSES: dict[str, tuple[str, ...]] = {
    "AutoEncoder": (*_LINEAR, "bias"),
    "AutoEncoderNew": (*_LINEAR, "decoder.bias"),
    "GatedAutoEncoder": ("encoder.weight", "decoder.weight", "decoder_bias", "r_mag", "gate_bias", "mag_bias"),
    "AutoEncoderTopK": (*_LINEAR, "b_dec", "k", "threshold"),
    "BatchTopKSAE": (*_LINEAR, "b_dec", "k", "threshold"),
    "MatryoshkaBatchTopKSAE": ("W_enc", "b_enc", "W_dec", "b_dec", "k", "threshold", "group_sizes"),
    "JumpReluAutoEncoder": ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"),
}

# trainer.submodule_name patterns -> site template ({L} = layer)
_SUBMODULES = ((r"^embed$", "embed"), (r"^resid(?:_post|_out)?_?(?:layer)?_?(\d+)$", "blocks.{L}.resid_post"),
               (r"^attn(?:_out)?_?(?:layer)?_?(\d+)$", "blocks.{L}.attn_out"),
               (r"^mlp(?:_out)?_?(?:layer)?_?(\d+)$", "blocks.{L}.mlp_out"))


def _read_state_dict(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".safetensors":
        return {k: np.asarray(v) for k, v in read_safetensors(path).items()}
    try:
        import torch
    except ImportError as err:
        raise ImportError(f"reading {path.name} needs torch (pip install 'jaxinterp[hf]'), or convert it to "
                          f"ae.safetensors") from err
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "ae" in state and "optimizer" in state:
        raise FormatError(f"{path}: a dictionary_learning training backup (ae + optimizer, activations possibly "
                          f"unscaled), not a final checkpoint")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FormatError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return {k: v.detach().to(torch.float64 if v.is_floating_point() else v.dtype).numpy() for k, v in state.items()}


def _dict_class(where: str, names: set[str], config: dict, given: str | None) -> str:
    cls = given or (config.get("trainer") or {}).get("dict_class")
    if cls is not None:
        if cls not in DICT_CLASSES:
            raise FormatError(f"{where}: dict_class {cls!r} is not supported; supported: {sorted(DICT_CLASSES)}")
        return cls
    hits = [c for c, keys in DICT_CLASSES.items() if set(keys) == names]
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise FormatError(f"{where}: the tensors fit {hits} alike; give the trainer's config.json beside it or "
                          f"load(..., dict_class=)")
    raise FormatError(f"{where}: tensors {sorted(names)} match no dictionary_learning class ({sorted(DICT_CLASSES)})")


def _site(config: dict) -> str | None:
    name = str((config.get("trainer") or {}).get("submodule_name") or "")
    for pattern, site in _SUBMODULES:
        m = re.match(pattern, name)
        if m:
            return site.replace("{L}", m.group(1) if m.groups() else "")
    return None


def _params(cls: str, t: dict) -> tuple[str, dict, dict]:
    """``(family, params, extra)`` of a checked state dict; ``extra``: ``k``, ``batch_threshold``."""
    if "encoder.weight" in t:
        w_enc, w_dec = t["encoder.weight"].T, t["decoder.weight"].T  # [D, F], [F, D]
    else:
        w_enc, w_dec = t["W_enc"], t["W_dec"]
    if cls == "GatedAutoEncoder":
        return "gated", {"W_enc": w_enc, "b_enc": t["gate_bias"], "W_dec": w_dec, "b_dec": t["decoder_bias"],
                         "r_mag": t["r_mag"], "b_mag": t["mag_bias"]}, {}
    if cls in ("AutoEncoder", "AutoEncoderNew"):
        b_dec = t["bias"] if cls == "AutoEncoder" else t["decoder.bias"]
        b_enc = t["encoder.bias"] if cls == "AutoEncoder" else centre_free_b_enc(t["encoder.bias"], b_dec, w_enc)
        return "relu", {"W_enc": w_enc, "b_enc": b_enc, "W_dec": w_dec, "b_dec": b_dec}, {}
    if cls == "JumpReluAutoEncoder":  # relu(pre * (pre > thr)): a threshold below 0 acts as 0
        return "jumprelu", {"W_enc": w_enc, "b_enc": centre_free_b_enc(t["b_enc"], t["b_dec"], w_enc), "W_dec": w_dec,
                            "b_dec": t["b_dec"],
                            "log_threshold": jumprelu_log_threshold(np.maximum(t["threshold"], 0.0))}, {}
    b_enc = t["encoder.bias"] if "encoder.bias" in t else t["b_enc"]
    params = {"W_enc": w_enc, "b_enc": b_enc, "W_dec": w_dec, "b_dec": t["b_dec"]}
    k = int(t["k"])
    if cls == "AutoEncoderTopK":
        return "topk", params, {"k": k}
    return "batchtopk", params, {"k": k, "batch_threshold": float(t["threshold"])}


def _shapes(cls: str, t: dict) -> dict[str, tuple]:
    """Expected tensor shapes of ``cls`` (dimensions from its decoder)."""
    if "decoder.weight" in t:
        d_in, d_sae = t["decoder.weight"].shape
    else:
        d_sae, d_in = t["W_dec"].shape
    shapes = {"encoder.weight": (d_sae, d_in), "encoder.bias": (d_sae,), "decoder.weight": (d_in, d_sae),
              "bias": (d_in,), "decoder.bias": (d_in,), "decoder_bias": (d_in,), "r_mag": (d_sae,),
              "gate_bias": (d_sae,), "mag_bias": (d_sae,), "b_dec": (d_in,), "k": (), "W_enc": (d_in, d_sae),
              "b_enc": (d_sae,), "W_dec": (d_sae, d_in),
              "threshold": (d_sae,) if cls == "JumpReluAutoEncoder" else (),
              "group_sizes": tuple(np.shape(t.get("group_sizes", ())))}
    return {name: shapes[name] for name in DICT_CLASSES[cls]}


def read_dictlearn(path: str | os.PathLike, *, dict_class: str | None = None) -> SAE:
    """A dictionary_learning checkpoint (``ae.pt`` / ``ae.safetensors`` or a directory holding one)."""
    path = Path(path)
    if path.is_dir():
        found = [path / f for f in DICTLEARN_FILES if (path / f).exists()]
        if not found:
            raise FormatError(f"{path}: no {' or '.join(DICTLEARN_FILES)}")
        path = found[0]
    config_file = path.parent / "config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    t = _read_state_dict(path)
    cls = _dict_class(str(path), set(t), config, dict_class)
    if set(t) != set(DICT_CLASSES[cls]):
        raise FormatError(f"{path}: a {cls} saves {sorted(DICT_CLASSES[cls])}; missing "
                          f"{sorted(set(DICT_CLASSES[cls]) - set(t))}, unexpected {sorted(set(t) - set(DICT_CLASSES[cls]))}")
    want = _shapes(cls, t)
    t = {k: v.reshape(()) if want[k] == () and v.size == 1 else v for k, v in t.items()}  # scalars saved as [1]
    check_tensors(f"{path} ({cls})", t, want)
    family, params, extra = _params(cls, t)
    return sae_from_params(family, {k: np.asarray(v, np.float32) for k, v in params.items()},
                           reads=reads_for(_site(config)), **extra)
