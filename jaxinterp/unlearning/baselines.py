"""Unlearning baselines trained through the same LoRA adapters, data and step as ELM.

* Gradient ascent (GA): maximise the NLL of the erase text, plus ELM's retain loss.
* RMU (Li et al. 2024, WMDP): at a middle layer l, push the adapted model's residual
  stream on erase text toward ``c * u`` (u a fixed random unit vector, c a steering
  scale) and keep it equal to the frozen model's on retain text:
  ``mean ||h_l(x_erase) - c u||^2 + alpha * mean ||h_l(x_retain) - h_l^frozen(x_retain)||^2``.

Both losses have ELM's ``loss(adapters, base, batch, key)`` signature on ELM's batch dict, so
they train through the same ``jaxinterp.train.loss_step`` / ``fit`` (the base as the frozen argument).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxinterp import lora as lora_lib
from jaxinterp.unlearning.elm import _masked_mean, next_token_nll, retain_loss
from jaxinterp.model import Model, run

__all__ = ["GAConfig", "ga_loss", "RMUConfig", "rmu_direction", "rmu_loss"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class GAConfig:
    """Gradient ascent: ``-NLL(erase) + retain_weight * retain``; ``retain_soft`` as in ELM."""

    retain_weight: float = 1.0
    retain_soft: bool = False
    lora_mode: str = "auto"


def ga_loss(adapters, base: Model, batch, key, cfg: GAConfig):
    student = lora_lib.combine(adapters, base)
    k1, k2 = jax.random.split(key)
    logits = student.run(batch["erase"], mode=cfg.lora_mode, dropout_key=k1).logits
    nll = next_token_nll(logits, batch["erase"], batch["erase_valid"])
    retain = retain_loss(lambda t: student.run(t, mode=cfg.lora_mode, dropout_key=k2).logits, base,
                         batch["retain"], batch["retain_valid"], soft=cfg.retain_soft)
    return -nll + cfg.retain_weight * retain, {"erase_nll": nll, "retain": retain}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RMUConfig:
    """RMU: ``layer`` whose ``resid_post`` is steered; ``steer`` = c in units of the frozen
    model's mean activation norm on erase text (``rmu_direction``); ``alpha`` = retain weight."""

    layer: int
    steer: float = 4.0
    alpha: float = 10.0
    lora_mode: str = "auto"

    def __post_init__(self):
        if self.layer < 0:
            raise ValueError(f"RMUConfig.layer must be >= 0, got {self.layer}")

    @property
    def site(self) -> str:
        return f"blocks.{self.layer}.resid_post"


def rmu_direction(base: Model, erase_tokens, erase_valid, cfg: RMUConfig, key) -> jax.Array:
    """``c u``: a random unit vector (uniform [0, 1) entries, normalised, as the reference)
    scaled by ``steer`` times the frozen model's mean activation norm at the layer."""
    h = run(base, erase_tokens, capture=cfg.site).cache[cfg.site]          # [B, T, D]
    norm = _masked_mean(jnp.linalg.norm(h, axis=-1), erase_valid)
    u = jax.random.uniform(key, (h.shape[-1],))
    return cfg.steer * norm * u / jnp.linalg.norm(u)


def rmu_loss(adapters, base: Model, batch, key, cfg: RMUConfig, control: jax.Array):
    student = lora_lib.combine(adapters, base)
    k1, k2 = jax.random.split(key)
    h_erase = student.run(batch["erase"], capture=cfg.site, mode=cfg.lora_mode, dropout_key=k1).cache[cfg.site]
    erase = _masked_mean(jnp.sum(jnp.square(h_erase - control), -1), batch["erase_valid"])
    h_ret = student.run(batch["retain"], capture=cfg.site, mode=cfg.lora_mode, dropout_key=k2).cache[cfg.site]
    frozen = jax.lax.stop_gradient(run(jax.lax.stop_gradient(base), batch["retain"], capture=cfg.site).cache[cfg.site])
    retain = _masked_mean(jnp.sum(jnp.square(h_ret - frozen), -1), batch["retain_valid"])
    scale = jax.lax.stop_gradient(jnp.sum(jnp.square(control)))  # report both terms relative to ||c u||^2
    return (erase + cfg.alpha * retain) / scale, {"erase": erase / scale, "retain": retain / scale}
