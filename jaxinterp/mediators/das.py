"""Distributed alignment search (DAS) and interchange-intervention accuracy (IIA).

    data = interchange_data(model, "blocks.2.resid_post", base, source, labels)   # source vectors captured once
    train, test = data.take(np.arange(384)), data.take(np.arange(384, data.n))
    subspace, history = train_das(model, "blocks.2.resid_post", train, DASConfig(k=8))
    iia(model, "blocks.2.resid_post", subspace, test)             # share of pairs answering the label

A pair is a base input, a position in it, the source input's vector at the site (at its own
position) and the *counterfactual label*: what the model should output if the causal variable
took its value in the source. DAS trains ``R`` (``[k, D]``, orthonormal rows through the QR of
an unconstrained ``[D, k]`` weight) so that the interchange ``x + Rᵀ R (s - x)`` at the base
position makes the base run predict the label (cross-entropy at the read-out position), with
the model frozen, through ``jaxinterp.train.fit`` (resumable with ``directory``). IIA is the
share of held-out pairs whose intervened argmax is the label.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jaxinterp.interventions import Intervention
from jaxinterp.mediators.subspace import Subspace, orthonormal_rows
from jaxinterp.model import run
from jaxinterp.sites import resolve_sites, split_layer_site
from jaxinterp.train import LoopConfig, fit, init_state, loss_step, make_train_step

__all__ = ["InterchangeData", "DASConfig", "interchange_data", "capture", "check_site", "layer_site", "predict", "iia",
           "train_das", "das_subspace"]


@struct.dataclass
class InterchangeData:
    """Interchange pairs, one row each (base inputs left- or right-padded).

    tokens / attention_mask ``[N, T]``: the base inputs; ``mask`` ``[N, T]``: the base positions
    intervened on; ``source`` ``[N, T, D]``: the source's site vectors placed at those positions;
    ``read_at`` ``[N]``: where the output is read (each base's last real token); ``label`` ``[N]``:
    the counterfactual token.
    """

    tokens: jax.Array
    attention_mask: jax.Array
    mask: jax.Array
    source: jax.Array
    read_at: jax.Array
    label: jax.Array

    @property
    def n(self) -> int:
        return int(self.tokens.shape[0])

    def take(self, index) -> "InterchangeData":
        index = np.asarray(index)
        return jax.tree_util.tree_map(lambda a: a[index], self)

    @classmethod
    def from_acts(cls, acts, base: tuple, source_at, labels: Sequence[int]) -> "InterchangeData":
        """Pairs from the sources' captured site ``acts`` ``[N, T_s, D]`` (row i: pair i's source).

        ``base`` = ``(tokens [N, T], attention_mask [N, T], at)``; ``at`` and ``source_at`` are
        ``[N]`` (one position per pair) or ``[N, P]`` (P positions, paired in order; -1 = unused).
        """
        b_tok, b_mask, b_at = (np.asarray(a) for a in base)
        acts = np.asarray(acts, np.float32)
        s_at = np.asarray(source_at)
        b_at, s_at = (a.reshape(len(a), -1).astype(np.int64) for a in (b_at, s_at))
        n, t = b_tok.shape
        if not (len(b_mask) == len(b_at) == len(s_at) == len(acts) == len(labels) == n):
            raise ValueError(f"base, source and labels must have one row per pair; got {n} base rows, "
                             f"{len(acts)} source rows, {len(labels)} labels")
        if b_at.shape != s_at.shape:
            raise ValueError(f"base and source positions must pair up; got shapes {b_at.shape} and {s_at.shape}")
        for name, at, width in (("base", b_at, t), ("source", s_at, acts.shape[1])):
            if n and (at.max() >= width or at.min() < -1 or not (at >= 0).any(axis=1).all()):
                raise ValueError(f"{name} positions must be in [0, {width}) (-1: unused, at least one per pair), "
                                 f"got {int(at.min())}..{int(at.max())}")
        mask = np.zeros((n, t), bool)
        src = np.zeros((n, t, acts.shape[-1]), np.float32)  # [N, T, D]
        rows, cols = np.nonzero(b_at >= 0)
        mask[rows, b_at[rows, cols]] = True
        src[rows, b_at[rows, cols]] = acts[rows, s_at[rows, cols]]
        return cls(jnp.asarray(b_tok, jnp.int32), jnp.asarray(b_mask, bool), jnp.asarray(mask), jnp.asarray(src),
                   jnp.asarray(_last_real(b_mask)), jnp.asarray(labels, jnp.int32))


def check_site(model, site: str) -> str:
    """``site`` if it names exactly one of the model's sites; else a one-line error with the closest."""
    if not isinstance(site, str) or any(c in site for c in "*?["):
        raise ValueError(f"a mediator's site must be one site name, got {site!r}")
    resolve_sites(site, model.sites)  # UnknownSiteError naming the closest sites
    return site


def layer_site(model, layer: int, name: str = "resid_post") -> str:
    """``blocks.{layer}.{name}``, checked: the layer must be in the model and the site exist."""
    n = model.config.n_layers
    if not 0 <= int(layer) < n:
        raise ValueError(f"layer {layer} is outside the model: it has {n} layers (0..{n - 1})")
    return check_site(model, f"blocks.{int(layer)}.{name}")


def _last_real(mask: np.ndarray) -> np.ndarray:
    """Index of each row's last real token (left or right padding)."""
    t = mask.shape[1]
    return (t - 1 - np.argmax(np.asarray(mask)[:, ::-1], axis=1)).astype(np.int32)


def capture(model, sites: Sequence[str], tokens, attention_mask) -> dict:
    """``{site: [N, T, D]}`` of every site in one run (stopping after the last layer needed)."""
    for site in sites:
        check_site(model, site)
    layers = [split_layer_site(s)[0] for s in sites]
    stop = None if None in layers else max(layers) + 1
    out = run(model, jnp.asarray(tokens), capture=list(sites), attention_mask=jnp.asarray(attention_mask),
              stop_at=stop, logits_at=None if stop is not None else _last_real(np.asarray(attention_mask)))
    return {s: out.cache[s] for s in sites}


def interchange_data(model, site: str, base: tuple, source: tuple, labels: Sequence[int]) -> InterchangeData:
    """Pairs from ``base`` and ``source`` = ``(tokens [N, T], attention_mask [N, T], at)`` (``at``: ``[N]``
    or ``[N, P]``, -1 unused): the source vectors at ``site`` are captured once (the model is frozen)."""
    s_tok, s_mask, s_at = source
    acts = capture(model, [site], s_tok, s_mask)[site]
    if acts.ndim != 3:
        raise ValueError(f"interchange pairs need a [batch, seq, width] site; {site!r} is {tuple(acts.shape)}")
    return InterchangeData.from_acts(acts, base, s_at, labels)


# ----------------------------------------------------------------------------- evaluation


@struct.dataclass
class _AtLayer(Intervention):
    """An intervention on a per-layer glob that acts at one (traced) layer only: one compiled
    program serves every layer of a sweep (``SiteContext`` calls ``at_layer`` with the scan index)."""

    item: Any
    layer: jax.Array

    def at_layer(self, i):
        return self.item.replace(mask=self.item.mask & (jnp.asarray(i) == self.layer))

    def apply(self, x):  # pragma: no cover - the site context calls at_layer first
        raise TypeError("_AtLayer acts on per-layer sites (blocks.*.<site>) only")


def _where(site: str) -> tuple[str, Optional[int]]:
    """(the static site key, the layer): per-layer sites share one program across layers."""
    layer, suffix = split_layer_site(site)
    return (site, None) if layer is None else (f"blocks.*.{suffix}", layer)


def _logits(model, key: str, layer, mediator, data: InterchangeData) -> jax.Array:
    """Log-probabilities ``[B, V]`` at ``read_at`` with ``mediator`` interchanged (None: the base run)."""
    iv = None
    if mediator is not None:
        item = mediator.intervene(data.source, data.mask)
        iv = {key: item if layer is None else _AtLayer(item, layer)}
    out = run(model, data.tokens, interventions=iv, attention_mask=data.attention_mask, logits_at=data.read_at,
              token_check="clip")
    return jax.nn.log_softmax(out.logits.astype(jnp.float32), axis=-1)


@functools.partial(jax.jit, static_argnames=("key", "many"))
def _outcome(model, key, layer, mediator, data, many):
    def one(m):
        logp = _logits(model, key, layer, m, data)
        return jnp.argmax(logp, -1), jnp.take_along_axis(logp, data.label[:, None], -1)[:, 0]

    return jax.vmap(one)(mediator) if many else one(mediator)


def predict(model, site: str, mediator, data: InterchangeData, *, batch_size: int = 128,
            many: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(argmax [N], log p(label) [N])`` with ``mediator`` interchanged (``None``: the base run).

    ``many=True``: ``mediator``'s leaves have a leading candidate axis ``C`` (a stack of mediators,
    vmapped: one program); the outputs are ``[C, N]``.
    """
    key, layer = _where(check_site(model, site))
    layer = None if layer is None else jnp.int32(layer)
    preds, logps = [], []
    batch_size = min(batch_size, data.n)
    for lo in range(0, data.n, batch_size):
        idx = np.arange(lo, lo + batch_size) % data.n  # the last chunk wraps: one compiled shape
        p, lp = _outcome(model, key, layer, mediator, data.take(idx), many)
        keep = min(batch_size, data.n - lo)
        preds.append(np.asarray(p)[..., :keep])
        logps.append(np.asarray(lp)[..., :keep])
    return np.concatenate(preds, -1), np.concatenate(logps, -1)


def iia(model, site: str, mediator, data: InterchangeData, *, batch_size: int = 128, many: bool = False):
    """Interchange-intervention accuracy: share of pairs whose intervened argmax is the label
    (a float; ``[C]`` with ``many``)."""
    pred, _ = predict(model, site, mediator, data, batch_size=batch_size, many=many)
    acc = (pred == np.asarray(data.label)).mean(-1)
    return acc if many else float(acc)


# ----------------------------------------------------------------------------- DAS


@dataclasses.dataclass(frozen=True, kw_only=True)
class DASConfig:
    """Attributes:
      k: dimension of the learned subspace (1 <= k <= the site's width).
      steps / batch_size / lr: Adam on the counterfactual cross-entropy (pairs drawn with replacement).
      seed: initial rotation (a random orthogonal ``[D, k]``) and batch order.
      save_every: checkpoint period when training into a directory.
    """

    k: int = 8
    steps: int = 200
    batch_size: int = 64
    lr: float = 1e-2
    seed: int = 0
    save_every: int = 100

    def __post_init__(self):
        for name in ("k", "steps", "batch_size", "save_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"DASConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"DASConfig.lr must be > 0, got {self.lr}")


def das_subspace(params) -> Subspace:
    """The mediator of DAS parameters ``{"weight": [D, k]}``."""
    return Subspace(orthonormal_rows(params["weight"]))


@functools.lru_cache(maxsize=None)
def _das_step(key: str, lr: float):
    """The jitted step for sites matching ``key`` (cached: every layer of a sweep shares it)."""

    def loss(params, frozen, batch, rng):
        data = jax.tree_util.tree_map(lambda a: a[batch], frozen["data"])  # [b] pairs
        logp = _logits(frozen["model"], key, frozen["layer"], das_subspace(params), data)  # [b, V]
        nll = -jnp.take_along_axis(logp, data.label[:, None], -1)[:, 0]
        return jnp.mean(nll), {"batch_iia": jnp.mean(jnp.argmax(logp, -1) == data.label)}

    return make_train_step(loss_step(loss, optax.adam(lr)))


def train_das(model, site: str, data: InterchangeData, config: DASConfig = DASConfig(), *,
              directory: str | Path | None = None, quiet: bool = True) -> tuple[Subspace, list[dict]]:
    """Learn a ``config.k``-dimensional subspace of ``site`` mediating ``data``'s labels.

    Returns ``(Subspace, history)`` (metrics rows of ``jaxinterp.train.fit``). With ``directory`` the
    run checkpoints there and resumes (bit-identically) after a kill.
    """
    key_, layer = _where(check_site(model, site))
    width = int(data.source.shape[-1])
    if config.k > width:
        raise ValueError(f"k={config.k} exceeds the width {width} of site {site!r}; choose 1 <= k <= {width}")
    if data.n == 0:
        raise ValueError("train_das needs at least one interchange pair")
    key = jax.random.key(config.seed)
    weight = jax.nn.initializers.orthogonal()(key, (width, config.k), jnp.float32)
    step = _das_step(key_, float(config.lr))
    state = init_state({"weight": weight}, optax.adam(config.lr), key)

    def batches(s: int):  # a pure function of the step: resumes draw the same batches
        return jnp.asarray(np.random.default_rng([config.seed, s]).integers(0, data.n, config.batch_size), jnp.int32)

    loop = LoopConfig(steps=config.steps, save_every=config.save_every, log_every=max(config.steps // 20, 1),
                      desc=f"das {site}", quiet=quiet)
    run_config = {"site": site, "n_pairs": data.n, **dataclasses.asdict(config)}
    frozen = {"model": model, "data": data, "layer": None if layer is None else jnp.int32(layer)}
    state, history = fit(step, state, batches, loop, directory=directory, frozen=frozen,
                         run_config=run_config if directory is not None else None,
                         log=(lambda _: None) if quiet else print)
    return das_subspace(state["params"]), history
