"""LoRA as a transform of the parameter pytree.

A ``LoraModel`` pairs a frozen base ``Model`` with ``Lora`` adapters: for every chosen
projection ``W [d_in, d_out]`` it holds ``A [d_in, r]`` and ``B [r, d_out]`` and computes
``x @ (W + (alpha / r) A B)``. ``B`` starts at zero, so at init the outputs are the base
model's exactly.

Two equivalent forwards:

* merged   -- ``effective_model(lm)`` is a plain ``Model`` whose kernels are
  ``W + s A B``; ``ji.run`` consumes it like any model (differentiable in ``A, B``).
* unmerged -- the base kernels are used as they are and each chosen projection adds
  ``s (x A) B`` inside the scanned block (``run(..., adapters=...)``: the adapter weights of the
  chosen layers are stacked and indexed by the layer; no merged weight is ever built). Cheaper
  when ``r (d_in + d_out) * tokens < d_in d_out (r + tokens)``; the only way to apply dropout.

``run(..., mode="auto")`` picks the cheaper one. The base parameters always pass through
``stop_gradient``: differentiating a loss of ``run(lm, ...)`` with respect to the whole
``LoraModel`` gives exact zeros for the base and XLA drops their computation, and
``split``/``combine`` give the explicit trainable/frozen partition for optimisers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.families import get_family
from jaxinterp.model import Model, RunOutput, run as _run
from jaxinterp.lora.targets import LoraTarget, projections, select_projections

__all__ = ["LoraConfig", "Lora", "LoraModel", "init", "split", "combine", "merge", "effective_model", "run",
           "delta", "adapters"]

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

    def __init__(self, weights: dict, config: LoraConfig, projs: tuple[LoraTarget, ...]):
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

    def run(self, tokens, capture=None, interventions=None, *, logits_at=None, mode="auto", dropout_key=None, **run_kw):
        return run(self, tokens, capture, interventions, logits_at=logits_at, mode=mode, dropout_key=dropout_key,
                   **run_kw)

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


# ------------------------------------------------------------------------------ public API


def init(model: Model, config: LoraConfig = LoraConfig(), key: jax.Array | int = 0) -> LoraModel:
    """Adapters for ``model``: A ~ U(-1/sqrt(d_in), 1/sqrt(d_in)) (PEFT's default), B = 0."""
    if isinstance(key, int):
        key = jax.random.PRNGKey(key)
    projs = select_projections(projections(model), config.targets, config.layers)
    dtype = jax.tree_util.tree_leaves(model.params)[0].dtype
    weights = {}
    for i, p in enumerate(projs):
        bound = 1.0 / math.sqrt(p.d_in)
        a = jax.random.uniform(jax.random.fold_in(key, i), (p.d_in, config.rank), dtype, -bound, bound)
        weights[p.name] = {"A": a, "B": jnp.zeros((config.rank, p.d_out), dtype)}
    return LoraModel(model, Lora(weights, config, tuple(projs)))


def split(lm: LoraModel) -> tuple[Lora, Model]:
    """(trainable adapters, frozen base)."""
    return lm.lora, lm.base


def combine(trainable: Lora, frozen: Model) -> LoraModel:
    return LoraModel(frozen, trainable)


def delta(lora: Lora, name: str, kernel_shape=None) -> jax.Array:
    """``(alpha / r) A B`` of target ``name``: ``[d_in, d_out]`` in the checkpoint module's column order."""
    w = lora.weights[name]
    out = lora.config.scale * (w["A"] @ w["B"])
    return out if kernel_shape is None else out.reshape(kernel_shape)


def _groups(lora: Lora) -> dict[str, list[LoraTarget]]:
    """Chosen targets by unit (``attn.qkv``, ``mlp.down``, ...), in layer order."""
    out: dict[str, list[LoraTarget]] = {}
    for p in lora.projections:
        out.setdefault(p.unit, []).append(p)
    return out


def _stacked(lora: Lora, targets: list[LoraTarget]) -> tuple[jax.Array, jax.Array]:
    return (jnp.stack([lora.weights[t.name]["A"] for t in targets]),   # [n, d_in, r]
            jnp.stack([lora.weights[t.name]["B"] for t in targets]))   # [n, r, d_out]


def merge(lm: LoraModel) -> Model:
    """A plain ``Model`` with the adapters folded into the base kernels (for inference/export)."""
    table = get_family(lm.base.family).projections(lm.base.config)
    params = lm.base.params
    for targets in _groups(lm.lora).values():
        a, b = _stacked(lm.lora, targets)
        deltas = lm.lora.config.scale * jnp.einsum("nir,nro->nio", a, b)  # [n, d_in, d_out]
        layers = np.asarray([t.layer for t in targets])
        for proj, cols in targets[0].parts:
            path = table[proj].kernel
            kernel = _get(params, path)  # [L, d_in, d_out]
            part = deltas if cols is None else deltas[..., np.asarray(cols)]
            params = _with(params, path, kernel.at[layers].add(part.astype(kernel.dtype)))
    return lm.base.replace(params=params)


def _frozen_base(lm: LoraModel) -> Model:
    return lm.base.replace(params=jax.lax.stop_gradient(lm.base.params))


def effective_model(lm: LoraModel) -> Model:
    """The merged-forward ``Model``: frozen (stop-gradient) base kernels + ``s A B``."""
    return merge(LoraModel(_frozen_base(lm), lm.lora))


def _unmerged_cost(lm: LoraModel, n_tokens: int) -> tuple[float, float]:
    """Training FLOP estimates (merged, unmerged) of the adapter part, summed over targets."""
    merged = unmerged = 0.0
    r = lm.lora.config.rank
    for p in lm.lora.projections:
        merged += p.d_in * p.d_out * (3 * r + n_tokens)   # build W+sAB, dW = X^T G, dA/dB from dW
        unmerged += 3 * n_tokens * r * (p.d_in + p.d_out)  # x A, (xA) B, and their backward
    return merged, unmerged


class _SidePath:
    """``s (x A[slot]) B[slot][:, cols]`` at the layer's slot (zero where the layer is not adapted)."""

    def __init__(self, a, b, slots: np.ndarray, cols, scale: float, dropout: float, key):
        self.a, self.b, self.slots, self.cols = a, b, slots, cols
        self.scale, self.dropout, self.key = scale, dropout, key

    def __call__(self, x, layer):
        static = isinstance(layer, (int, np.integer))
        slot = int(self.slots[layer]) if static else jnp.asarray(self.slots)[layer]
        if static and slot < 0:
            return jnp.zeros(x.shape[:-1] + (self.b.shape[-1] if self.cols is None else len(self.cols),), x.dtype)
        index = max(slot, 0) if static else jnp.maximum(slot, 0)
        a, b = self.a[index].astype(x.dtype), self.b[index].astype(x.dtype)
        if self.cols is not None:
            b = b[:, self.cols]
        if self.key is not None:
            keep = jax.random.bernoulli(jax.random.fold_in(self.key, layer), 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
        out = self.scale * ((x @ a) @ b)
        return out if static else jnp.where(slot >= 0, out, 0).astype(out.dtype)


def adapters(lm: LoraModel, dropout_key=None) -> dict[str, _SidePath]:
    """``{projection: side path}`` for ``ji.run(..., adapters=...)`` (the unmerged forward)."""
    cfg = lm.lora.config
    n_layers = lm.base.config.n_layers
    out = {}
    for u, targets in enumerate(_groups(lm.lora).values()):
        a, b = _stacked(lm.lora, targets)
        slots = np.full(n_layers, -1, np.int32)
        slots[[t.layer for t in targets]] = np.arange(len(targets))
        key = None if dropout_key is None else jax.random.fold_in(dropout_key, u)  # one input mask per module
        for proj, cols in targets[0].parts:
            out[proj] = _SidePath(a, b, slots, None if cols is None else np.asarray(cols), cfg.scale, cfg.dropout, key)
    return out


def run(lm: LoraModel, tokens, capture=None, interventions=None, *, logits_at=None, mode: str = "auto",
        dropout_key: jax.Array | None = None, **run_kw) -> RunOutput:
    """``ji.run`` of the adapted model.

    Args:
      mode: ``"merged"`` (effective weights), ``"unmerged"`` (adapter side path, no merged
        weight) or ``"auto"`` (the cheaper one for this token count; unmerged when dropout
        is active).
      dropout_key: PRNG key enabling adapter dropout (training); None = no dropout.
      run_kw: further ``ji.run`` arguments (``attention_mask``, ``positions``, ``remat``, ...).
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
        return _run(effective_model(lm), tokens, capture, interventions, logits_at=logits_at, **run_kw)
    side = adapters(lm, dropout_key if use_dropout else None)
    return _run(_frozen_base(lm), tokens, capture, interventions, logits_at=logits_at, adapters=side, **run_kw)
