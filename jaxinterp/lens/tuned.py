"""The tuned lens (Belrose et al., 2023): one learned affine translator per layer before the head.

Layer ``l``'s translator maps its residual ``h [.., D]`` to ``h + h @ W_l + b_l`` and the family's
own final norm + unembedding reads the result. ``W_l`` and ``b_l`` start at zero, so an untrained
tuned lens is exactly the logit lens. Translators are trained to minimise
``KL(p_final || p_lens)`` (the paper's distillation loss) with the model frozen; every layer has its
own parameters, so the summed loss trains each layer independently.

    lens, history = ji.lens.train_tuned_lens(model, batches, ji.lens.TunedLensConfig(steps=200),
                                             directory="runs/lens/ckpt")   # resumable
    logits = lens(model, tokens)                # [n_layers, B, T, V]
    lens.save("lens.safetensors"); ji.lens.TunedLens.load("lens.safetensors")

Training runs on the library's one loop (``jaxinterp.train.fit``): Adam on the translators with the
model passed frozen, one metrics row per step (the summed loss and ``kl_per_layer``). With a
``directory`` it checkpoints there, and a killed run re-run with the same arguments resumes from
its last checkpoint and ends bit-identical to an uninterrupted one.
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
from jaxinterp.train import Hook, LoopConfig, fit, init_state, loss_step, make_train_step

__all__ = ["TunedLens", "TunedLensConfig", "train_tuned_lens"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class TunedLensConfig:
    """``steps`` Adam steps at learning rate ``lr`` (cycling over the batches given); with a
    checkpoint directory, a checkpoint every ``save_every`` steps (and at the end)."""

    steps: int = 200
    lr: float = 1e-3
    save_every: int = 100
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "save_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
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
        return _translate({"weight": self.weight, "bias": self.bias}, resid)

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
    weight, bias = params["weight"], params["bias"]  # [n, D, D], [n, D]
    x = resid.astype(jnp.float32)  # [n, ..., D]
    shape = x.shape
    flat = x.reshape(shape[0], -1, shape[-1])  # [n, N, D]
    out = flat + jnp.einsum("nkd,nde->nke", flat, weight) + bias[:, None, :]
    return out.reshape(shape)


def lens_loss(params, model: Model, batch, key=None):
    """Mean over real positions of ``KL(final || tuned lens)``, summed over layers, and the per-layer
    terms (``fit``'s loss signature: the model is the frozen argument; ``batch``: ``resid [n, B, T, D]``,
    ``final [B, T, V]``, ``mask [B, T]``)."""
    logits = apply_head(model, _translate(params, batch["resid"]))  # [n, B, T, V]
    kl = kl_to_final(logits, batch["final"])  # [n, B, T]
    mask = batch["mask"]
    per_layer = jnp.sum(kl * mask, axis=(1, 2)) / jnp.maximum(jnp.sum(mask), 1.0)  # [n]
    return jnp.sum(per_layer), {"kl_per_layer": per_layer}


def _captured(model: Model, batches: list[np.ndarray], sites, attention_mask) -> list[dict]:
    """Each batch's residuals, final logits and loss mask (the model is frozen: computed once)."""
    out = []
    for tokens in batches:
        resid, final = capture_residuals(model, tokens, sites, attention_mask=attention_mask)
        mask = np.ones(tokens.shape, np.float32) if attention_mask is None else np.asarray(attention_mask, np.float32)
        out.append({"resid": resid, "final": final, "mask": jnp.asarray(mask)})
    return out


def train_tuned_lens(model: Model, batches: Iterable, config: TunedLensConfig = TunedLensConfig(), *,
                     layers: Optional[Sequence[int]] = None, attention_mask=None, directory=None,
                     run_config: Optional[dict] = None,
                     may_change: Sequence[str] = ("lens.steps", "lens.save_every"),
                     hooks: Sequence[Hook] = (), quiet: bool = True, log=print) -> tuple[TunedLens, list[dict]]:
    """Train translators for ``layers`` on ``batches`` (token arrays ``[B, T]``, cycled: step ``s``
    uses batch ``s % len(batches)``) with the model frozen, through ``jaxinterp.train.fit``.

    ``attention_mask`` (one for every batch, or None) excludes padding from the loss. With
    ``directory`` the run checkpoints there and resumes from it; ``run_config`` (default: the lens
    config under ``lens``, layers and data shape) is recorded there and a resume with another one is
    refused naming the field (``may_change``: dotted fields a resume may change; by default the step
    count, to train longer, and the checkpoint interval). ``hooks`` are ``fit``'s. Returns ``(lens, history)``:
    one row per step, ``{"step", "loss", "kl_per_layer", "grad_norm"}``, of the whole run.
    """
    batches = [np.asarray(b) for b in batches]
    if not batches:
        raise ValueError("train_tuned_lens needs at least one batch of tokens")
    lens = TunedLens.identity(model, layers)
    data = _captured(model, batches, residual_sites(model, lens.layers), attention_mask)
    opt = optax.adam(config.lr)
    step = make_train_step(loss_step(lens_loss, opt))
    state = init_state({"weight": lens.weight, "bias": lens.bias}, opt, jax.random.key(config.seed))
    if run_config is None:
        run_config = {"lens": dataclasses.asdict(config), "layers": list(lens.layers), "family": model.family,
                      "batches": [list(b.shape) for b in batches]}
    loop = LoopConfig(steps=config.steps, save_every=config.save_every, desc="tuned lens", quiet=quiet)
    state, history = fit(step, state, lambda s: data[s % len(data)], loop, directory=directory, frozen=model,
                         run_config=run_config if directory is not None else None, may_change=may_change,
                         hooks=hooks, log=log)
    params = jax.device_get(state["params"])
    return dataclasses.replace(lens, weight=jnp.asarray(params["weight"]), bias=jnp.asarray(params["bias"])), history
