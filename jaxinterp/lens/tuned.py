"""The tuned lens (Belrose et al., 2023): one learned affine translator per layer before the head.

Layer ``l``'s translator maps its residual ``h [.., D]`` to ``h + h @ W_l + b_l`` and the family's
own final norm + unembedding reads the result. ``W_l`` and ``b_l`` start at zero, so an untrained
tuned lens is exactly the logit lens. Translators are trained to minimise
``KL(p_final || p_lens)`` (the paper's distillation loss) with the model frozen; every layer has its
own parameters, so the summed loss trains each layer independently.

    lens, losses = ji.lens.train_tuned_lens(model, batches, ji.lens.TunedLensConfig(steps=200))
    logits = lens(model, tokens)                # [n_layers, B, T, V]
    lens.save("lens.safetensors"); ji.lens.TunedLens.load("lens.safetensors")

The training loop here is deliberately small (Adam, fixed steps, no checkpoints); a resumable run
belongs to the library's shared training loop once it exists.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import tempfile
from typing import Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxinterp.hf import read_safetensors, write_safetensors
from jaxinterp.lens.logit import apply_head, capture_residuals, kl_to_final, residual_sites
from jaxinterp.model import Model

__all__ = ["TunedLens", "TunedLensConfig", "train_tuned_lens"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class TunedLensConfig:
    """``steps`` Adam steps at learning rate ``lr`` (cycling over the batches given)."""

    steps: int = 200
    lr: float = 1e-3

    def __post_init__(self):
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive int, got {self.steps!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TunedLens:
    """Affine translators for ``layers``: ``weight [n, D, D]``, ``bias [n, D]`` (float32)."""

    family: str
    layers: tuple[int, ...]
    weight: jax.Array
    bias: jax.Array

    def __post_init__(self):
        n, d = len(self.layers), self.bias.shape[-1]
        if self.weight.shape != (n, d, d) or self.bias.shape != (n, d):
            raise ValueError(f"TunedLens for {n} layers needs weight [{n}, {d}, {d}] and bias [{n}, {d}], got "
                             f"{tuple(self.weight.shape)} and {tuple(self.bias.shape)}")

    @classmethod
    def identity(cls, model: Model, layers: Optional[Sequence[int]] = None) -> "TunedLens":
        """Zero translators: equal to the logit lens on ``layers`` (default: every layer)."""
        sites = residual_sites(model, layers)  # validates layers
        n, d = len(sites), model.config.d_model
        return cls(family=model.family, layers=tuple(int(s.split(".")[1]) for s in sites),
                   weight=jnp.zeros((n, d, d), jnp.float32), bias=jnp.zeros((n, d), jnp.float32))

    def _check(self, model: Model) -> None:
        if model.family != self.family or model.config.d_model != self.bias.shape[-1] \
                or max(self.layers) >= model.config.n_layers:
            raise ValueError(f"this tuned lens was trained for a {self.family} model with d_model "
                             f"{self.bias.shape[-1]} and layers {list(self.layers)}; got a {model.family} model with "
                             f"d_model {model.config.d_model} and {model.config.n_layers} layers")

    def translate(self, resid: jax.Array) -> jax.Array:
        """``resid [n, ..., D]`` (one row per lens layer) -> translated residuals, same shape."""
        return _translate((self.weight, self.bias), resid)

    def __call__(self, model: Model, tokens, *, attention_mask=None, positions=None, logits_at=None,
                 interventions=None) -> jax.Array:
        """Tuned-lens logits ``[n, B, T, V]`` (``[n, B, V]`` / ``[n, B, P, V]`` with ``logits_at``)."""
        self._check(model)
        resid, _ = capture_residuals(model, tokens, residual_sites(model, self.layers), attention_mask=attention_mask,
                                     positions=positions, logits_at=logits_at, interventions=interventions)
        return apply_head(model, self.translate(resid))

    def save(self, path: str | os.PathLike) -> None:
        """Write ``weight`` and ``bias`` as safetensors (atomically: temp file + rename)."""
        meta = {"format": "jaxinterp.tuned_lens", "family": self.family, "layers": json.dumps(list(self.layers))}
        tensors = {"weight": np.asarray(self.weight, np.float32), "bias": np.asarray(self.bias, np.float32)}
        folder = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
        os.close(fd)
        try:
            write_safetensors(tmp, tensors, meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TunedLens":
        meta = _metadata(path)
        if meta.get("format") != "jaxinterp.tuned_lens":
            raise ValueError(f"{path} is not a tuned lens written by TunedLens.save (metadata {meta})")
        tensors = read_safetensors(path)
        return cls(family=meta["family"], layers=tuple(json.loads(meta["layers"])),
                   weight=jnp.asarray(tensors["weight"]), bias=jnp.asarray(tensors["bias"]))


def _metadata(path) -> dict:
    """The ``__metadata__`` of a safetensors file's JSON header."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size)).get("__metadata__", {})


def _translate(params, resid):
    weight, bias = params  # [n, D, D], [n, D]
    x = resid.astype(jnp.float32)  # [n, ..., D]
    shape = x.shape
    flat = x.reshape(shape[0], -1, shape[-1])  # [n, N, D]
    out = flat + jnp.einsum("nkd,nde->nke", flat, weight) + bias[:, None, :]
    return out.reshape(shape)


def _loss(params, model: Model, resid, final, mask):
    """Mean over real positions of ``KL(final || tuned lens)``, summed over layers."""
    logits = apply_head(model, _translate(params, resid))  # [n, B, T, V]
    kl = kl_to_final(logits, final)  # [n, B, T]
    per_layer = jnp.sum(kl * mask, axis=(1, 2)) / jnp.maximum(jnp.sum(mask), 1.0)  # [n]
    return jnp.sum(per_layer), per_layer


def train_tuned_lens(model: Model, batches: Iterable, config: TunedLensConfig = TunedLensConfig(), *,
                     layers: Optional[Sequence[int]] = None, attention_mask=None) -> tuple[TunedLens, list[float]]:
    """Train translators for ``layers`` on ``batches`` (token arrays ``[B, T]``, cycled) with the model
    frozen. ``attention_mask`` (one for every batch, or None) excludes padding from the loss.
    Returns ``(lens, losses)`` with the summed per-layer KL of each step."""
    batches = [np.asarray(b) for b in batches]
    if not batches:
        raise ValueError("train_tuned_lens needs at least one batch of tokens")
    lens = TunedLens.identity(model, layers)
    sites = residual_sites(model, lens.layers)
    captured = []
    for tokens in batches:  # the model is frozen: each batch's residuals and final logits once
        resid, final = capture_residuals(model, tokens, sites, attention_mask=attention_mask)
        mask = jnp.ones(tokens.shape, jnp.float32) if attention_mask is None else jnp.asarray(attention_mask, jnp.float32)
        captured.append((resid, final, mask))
    opt = optax.adam(config.lr)
    params = (lens.weight, lens.bias)
    state = opt.init(params)

    @jax.jit
    def step(params, state, model, resid, final, mask):
        (loss, _), grads = jax.value_and_grad(_loss, has_aux=True)(params, model, resid, final, mask)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for i in range(config.steps):
        params, state, loss = step(params, state, model, *captured[i % len(captured)])
        losses.append(float(loss))
    return dataclasses.replace(lens, weight=params[0], bias=params[1]), losses
