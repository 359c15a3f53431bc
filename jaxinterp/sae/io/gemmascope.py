"""Gemma Scope ``params.npz``: ``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]``, ``b_enc [d_sae]``,
``b_dec [d_in]``, ``threshold [d_sae]``.

Definition (JumpReLU, Lieberum et al. 2024): ``pre = x @ W_enc + b_enc`` (no ``b_dec``
subtracted from the input), ``f = (pre > threshold) * pre``, ``x_hat = f @ W_dec + b_dec``.
Read as a jaxinterp ``jumprelu`` SAE: the encoder bias absorbs ``b_dec @ W_enc`` (our encoder
centres inputs by ``b_dec``) and ``log_threshold = log(threshold)``. A negative threshold
would pass negative pre-activations, which a ``jumprelu`` SAE (threshold >= 0) cannot, and is
refused. The file names no site: pass ``site=`` to ``load``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..families import SAE, sae_from_params
from .common import FormatError, centre_free_b_enc, check_tensors, jumprelu_log_threshold

__all__ = ["read_gemmascope", "GEMMASCOPE_KEYS"]

GEMMASCOPE_KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")


def read_gemmascope(path: str | os.PathLike) -> SAE:
    """A ``params.npz`` file (or a directory holding one) as a jumprelu SAE."""
    path = Path(path)
    if path.is_dir():
        path = path / "params.npz"
    with np.load(path, allow_pickle=False) as npz:
        t = {name: np.asarray(npz[name], np.float32) for name in npz.files}
    missing = [name for name in GEMMASCOPE_KEYS if name not in t]
    if missing:
        raise FormatError(f"{path}: missing {missing}; a Gemma Scope params.npz holds {list(GEMMASCOPE_KEYS)}")
    if t["W_enc"].ndim != 2:
        raise FormatError(f"{path}: W_enc must be [d_in, d_sae], got shape {t['W_enc'].shape}")
    d_in, d_sae = t["W_enc"].shape
    check_tensors(str(path), t, {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,),
                                 "b_dec": (d_in,), "threshold": (d_sae,)})
    if (t["threshold"] < 0).any():
        raise FormatError(f"{path}: {(t['threshold'] < 0).sum()} negative thresholds; Gemma Scope's JumpReLU would pass "
                          f"negative pre-activations above them, which jaxinterp's jumprelu (threshold >= 0) cannot")
    params = {"W_enc": t["W_enc"], "W_dec": t["W_dec"], "b_dec": t["b_dec"],
              "b_enc": centre_free_b_enc(t["b_enc"], t["b_dec"], t["W_enc"]),
              "log_threshold": jumprelu_log_threshold(t["threshold"])}
    return sae_from_params("jumprelu", params)
