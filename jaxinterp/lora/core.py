"""LoRA as a transform of the parameter pytree.

A ``LoraModel`` pairs a frozen base ``Model`` with ``Lora`` adapters: for every chosen
projection ``W [d_in, d_out]`` it holds ``A [d_in, r]`` and ``B [r, d_out]`` and computes
``x @ (W + (alpha / r) A B)``. ``B`` starts at zero, so at init the outputs are the base
model's exactly.

Two equivalent forwards:

* merged   -- ``effective_model(lm)`` is a plain ``Model`` whose kernels are
  ``W + s A B``; ``ji.run`` consumes it like any model (differentiable in ``A, B``).
* unmerged -- the base kernels are used as they are and each chosen ``Dense`` adds
  ``s (x A) B`` (flax method interception, no merged weight is ever built). Cheaper when
  ``r (d_in + d_out) * tokens < d_in d_out (r + tokens)``; the only way to apply dropout.

``run(..., mode="auto")`` picks the cheaper one. The base parameters always pass through
``stop_gradient``: differentiating a loss of ``run(lm, ...)`` with respect to the whole
``LoraModel`` gives exact zeros for the base and XLA drops their computation, and
``split``/``combine`` give the explicit trainable/frozen partition for optimisers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.model import Model, RunOutput, run as _run
from jaxinterp.lora.targets import Projection, projections, select_projections

__all__ = ["LoraConfig", "Lora", "LoraModel", "init", "split", "combine", "merge", "effective_model", "run",
           "delta"]

_MODES = ("auto", "merged", "unmerged")


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """Which projections get adapters and how large they are.

    Attributes:
      rank: r, the inner dimension of ``A B``.
      alpha: the update is scaled by ``alpha / rank`` (PEFT's convention).
      dropout: dropout on the adapter's input (training only; forces the unmerged forward).
      targets: site-style globs over the family's projection table (see ``lora.targets``);
        the default adapts every projection (attention, MLP, Mamba mixer).
      layers: layer indices to adapt (None = every layer).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("blocks.*",)
    layers: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.rank <= 0:
            raise ValueError(f"LoraConfig.rank must be positive, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must lie in [0, 1), got {self.dropout}")
        if isinstance(self.targets, str) or not self.targets:
            raise ValueError(f"LoraConfig.targets must be a non-empty tuple of globs, got {self.targets!r}")
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(l) for l in self.layers))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    # presets ---------------------------------------------------------------------------
    @classmethod
    def elm(cls, **kw) -> "LoraConfig":
        """ELM's reference setting: every attention/MLP (or mixer) projection, alpha 16, dropout 0.05."""
        defaults = dict(rank=4, alpha=16.0, dropout=0.05)
        return cls(**{**defaults, **kw})


@jax.tree_util.register_pytree_node_class
class Lora:
    """Adapter weights ``{projection name: {"A": [d_in, r], "B": [r, d_out]}}`` + static description."""

    def __init__(self, weights: dict, config: LoraConfig, projs: tuple[Projection, ...]):
        self.weights = weights
        self.config = config
        self.projections = tuple(projs)

    def tree_flatten(self):
        return (self.weights,), (self.config, self.projections)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], *aux)

    def replace(self, weights) -> "Lora":
        return Lora(weights, self.config, self.projections)

    def num_params(self) -> int:
        return int(sum(np.prod(a.shape) for a in jax.tree_util.tree_leaves(self.weights)))

    def __repr__(self) -> str:
        return f"Lora({len(self.projections)} projections, {self.num_params():,} params, {self.config})"


@jax.tree_util.register_pytree_node_class
class LoraModel:
    """A frozen base ``Model`` plus ``Lora`` adapters; ``.run`` mirrors ``Model.run``."""

    def __init__(self, base: Model, lora: Lora):
        self.base = base
        self.lora = lora

    def tree_flatten(self):
        return (self.base, self.lora), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)

    @property
    def config(self):
        return self.base.config

    @property
    def sites(self) -> tuple[str, ...]:
        return self.base.sites

    def run(self, tokens, capture=None, interventions=None, *, logits_at=None, mode="auto", dropout_key=None):
        return run(self, tokens, capture, interventions, logits_at=logits_at, mode=mode, dropout_key=dropout_key)

    def __repr__(self) -> str:
        return f"LoraModel(base={self.base!r}, lora={self.lora!r})"


# ------------------------------------------------------------------------------ tree helpers


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _with(tree, path, value):
    """Copy of a nested dict with ``path`` replaced (other branches shared)."""
    if not path:
        return value
    new = dict(tree)
    new[path[0]] = _with(tree[path[0]], path[1:], value)
    return new


def _in_out(kernel_shape) -> tuple[int, int]:
    return int(kernel_shape[0]), int(np.prod(kernel_shape[1:]))


# ------------------------------------------------------------------------------ public API


def init(model: Model, config: LoraConfig = LoraConfig(), key: jax.Array | int = 0) -> LoraModel:
    """Adapters for ``model``: A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) (PEFT's default), B = 0."""
    if isinstance(key, int):
        key = jax.random.PRNGKey(key)
    projs = select_projections(projections(model), config.targets, config.layers)
    weights = {}
    for i, p in enumerate(projs):
        kernel = _get(model.params, p.path)
        d_in, d_out = _in_out(kernel.shape)
        bound = 1.0 / math.sqrt(d_in)
        a = jax.random.uniform(jax.random.fold_in(key, i), (d_in, config.rank), kernel.dtype, -bound, bound)
        weights[p.name] = {"A": a, "B": jnp.zeros((config.rank, d_out), kernel.dtype)}
    return LoraModel(model, Lora(weights, config, tuple(projs)))


def split(lm: LoraModel) -> tuple[Lora, Model]:
    """(trainable adapters, frozen base)."""
    return lm.lora, lm.base


def combine(trainable: Lora, frozen: Model) -> LoraModel:
    return LoraModel(frozen, trainable)


def delta(lora: Lora, name: str, kernel_shape) -> jax.Array:
    """``(alpha / r) A B`` reshaped to the kernel's shape."""
    w = lora.weights[name]
    return (lora.config.scale * (w["A"] @ w["B"])).reshape(kernel_shape)


def merge(lm: LoraModel) -> Model:
    """A plain ``Model`` with the adapters folded into the base kernels (for inference/export)."""
    params = lm.base.params
    for p in lm.lora.projections:
        kernel = _get(params, p.path)
        params = _with(params, p.path, kernel + delta(lm.lora, p.name, kernel.shape).astype(kernel.dtype))
    return lm.base.replace(params=params)


def _frozen_base(lm: LoraModel) -> Model:
    return lm.base.replace(params=jax.lax.stop_gradient(lm.base.params))


def effective_model(lm: LoraModel) -> Model:
    """The merged-forward ``Model``: frozen (stop-gradient) base kernels + ``s A B``."""
    return merge(LoraModel(_frozen_base(lm), lm.lora))


def _unmerged_cost(lm: LoraModel, n_tokens: int) -> tuple[float, float]:
    """Training FLOP estimates (merged, unmerged) of the adapter part, summed over projections."""
    merged = unmerged = 0.0
    r = lm.lora.config.rank
    for p in lm.lora.projections:
        d_in, d_out = _in_out(_get(lm.base.params, p.path).shape)
        merged += d_in * d_out * (3 * r + n_tokens)   # build W+sAB, dW = X^T G, dA/dB from dW
        unmerged += 3 * n_tokens * r * (d_in + d_out)  # x A, (xA) B, and their backward
    return merged, unmerged


def _interceptor(lm: LoraModel, dropout_key):
    by_module = {p.module_path: (i, p) for i, p in enumerate(lm.lora.projections)}
    cfg = lm.lora.config

    def intercept(next_fn, args, kwargs, context):
        hit = by_module.get(tuple(context.module.path)) if context.method_name == "__call__" else None
        y = next_fn(*args, **kwargs)
        if hit is None:
            return y
        i, p = hit
        x = args[0]
        if dropout_key is not None and cfg.dropout > 0:
            keep = jax.random.bernoulli(jax.random.fold_in(dropout_key, i), 1.0 - cfg.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - cfg.dropout), 0).astype(x.dtype)
        w = lm.lora.weights[p.name]
        upd = (x @ w["A"].astype(x.dtype)) @ w["B"].astype(x.dtype)  # [..., d_out]
        return y + (cfg.scale * upd).reshape(y.shape).astype(y.dtype)

    return intercept


def run(lm: LoraModel, tokens, capture=None, interventions=None, *, logits_at=None, mode: str = "auto",
        dropout_key: jax.Array | None = None) -> RunOutput:
    """``ji.run`` of the adapted model.

    Args:
      mode: ``"merged"`` (effective weights), ``"unmerged"`` (adapter side path, no merged
        weight) or ``"auto"`` (the cheaper one for this token count; unmerged when dropout
        is active).
      dropout_key: PRNG key enabling adapter dropout (training); None = no dropout.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    use_dropout = dropout_key is not None and lm.lora.config.dropout > 0
    if mode == "merged" and use_dropout:
        raise ValueError("adapter dropout needs mode='unmerged' (or 'auto'); merged weights cannot drop inputs")
    if mode == "auto":
        n_tokens = int(np.prod(np.shape(tokens)))
        merged, unmerged = _unmerged_cost(lm, n_tokens)
        mode = "unmerged" if use_dropout or unmerged < merged else "merged"
    if mode == "merged":
        return _run(effective_model(lm), tokens, capture, interventions, logits_at=logits_at)
    with nn.intercept_methods(_interceptor(lm, dropout_key if use_dropout else None)):
        return _run(_frozen_base(lm), tokens, capture, interventions, logits_at=logits_at)
