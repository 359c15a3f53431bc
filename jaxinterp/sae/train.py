"""Training SAEs: a hyperparameter grid per family trained at once by ``jax.vmap``.

    runs = {"l1": (SAETrainConfig(family="relu", d_in=512, d_sae=4096, steps=2000),
                   [{"sparsity_coeff": c} for c in (0.01, 0.03, 0.1)]),
            "topk": (SAETrainConfig(family="topk", d_in=512, d_sae=4096, steps=2000),
                     [{"k": k} for k in (8, 16, 32)])}
    trainer = SAETrainer(runs)
    states = trainer.init(sample_activations)
    states, history = trainer.fit(states, batch_fn, ckpt_dir="runs/sae/ckpt")   # jaxinterp.train's loop

Every run is a family config plus a list of overrides (``lr``, ``sparsity_coeff``, ``k``,
``p_end``, ``bandwidth``, ``aux_coeff``, ``seed``); its SAEs are stacked along a leading
grid axis and one jitted step updates every run on the same batch. ``batch_fn(step)``
must return the batch for a step (deterministically), which makes resuming from an
orbax checkpoint bit-identical (``fit`` runs ``jaxinterp.train.fit``).

Per step, per SAE: Adam on the loss with linear lr warmup (and optional linear decay),
the sparsity coefficient warmed up linearly; with ``unit_norm_decoder`` the gradient of
each decoder row loses its component along the row before the update and the rows are
renormalised after it. p-annealing (METHODS §4): ``p = 1`` until ``anneal_start``, then
at ``n_anneal_points`` evenly spaced steps ``p`` moves along ``linspace(1, p_end)`` and
lambda is multiplied by ``mean L_p(current) / mean L_p(next)`` (exponential moving
averages over recent batches), which keeps the loss continuous.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jaxinterp.train import LoopConfig, fit, make_train_step

from .families import FAMILIES, SAE, Hparams, check_sparse, init_sae, lp_penalty

__all__ = ["SAETrainConfig", "TrainState", "SAETrainer", "init_state", "sae_step", "input_scale_for",
           "unstack", "GRID_KEYS", "grid_runs", "SPARSITY_KEY"]

GRID_KEYS = ("lr", "sparsity_coeff", "k", "p_end", "bandwidth", "aux_coeff", "seed")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SAETrainConfig:
    """One family's training recipe (a grid overrides the fields in ``GRID_KEYS``)."""

    family: str = "relu"
    d_in: int
    d_sae: int
    steps: int = 10_000
    batch_size: int = 4096
    lr: float = 3e-4
    lr_warmup_steps: int = 100
    lr_decay_frac: float = 0.0  # linear decay to 0 over this final fraction of training
    sparsity_coeff: float = 0.0  # L1 / Lp / L0 / gate-L1 weight
    sparsity_warmup_steps: int = 0
    k: int = 32  # topk / batchtopk
    p_end: float = 0.2  # panneal
    anneal_start: int = 1000
    n_anneal_points: int = 10
    anneal_ema: float = 0.9  # smoothing of the recent-batch Lp means used for the lambda rescale
    bandwidth: float = 1e-3  # jumprelu
    jumprelu_init_threshold: float = 1e-3
    aux_coeff: Optional[float] = None  # AuxK weight; None: 1/32 for topk/batchtopk, 0 otherwise
    aux_k: int = 256
    dead_tokens: int = 1_000_000
    unit_norm_decoder: bool = True
    init_b_dec_mean: bool = True
    seed: int = 0
    sparse: Optional[bool] = None  # topk/batchtopk training path: True sparse, False dense, None auto (families.py)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown SAE family {self.family!r}; choose one of {sorted(FAMILIES)}")
        for name in ("d_in", "d_sae", "steps", "batch_size", "n_anneal_points", "aux_k", "dead_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SAETrainConfig.{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.lr_decay_frac <= 1:
            raise ValueError(f"lr_decay_frac must lie in [0, 1], got {self.lr_decay_frac}")
        if self.family in ("topk", "batchtopk") and not 0 < self.k <= self.d_sae:
            raise ValueError(f"k must lie in (0, d_sae={self.d_sae}], got {self.k}")
        check_sparse(self.family, self.sparse)
        if self.family == "panneal" and not 0 < self.p_end <= 1:
            raise ValueError(f"p_end must lie in (0, 1], got {self.p_end}")
        if not 0 <= self.anneal_ema < 1:
            raise ValueError(f"anneal_ema must lie in [0, 1), got {self.anneal_ema}")

    @property
    def default_aux_coeff(self) -> float:
        if self.aux_coeff is not None:
            return self.aux_coeff
        return 1 / 32 if self.family in ("topk", "batchtopk") else 0.0

    @property
    def uses_auxk(self) -> bool:
        """AuxK is compiled in when the base config's weight is non-zero (set it to grid over aux_coeff)."""
        return self.default_aux_coeff > 0

    @classmethod
    def karvonen_othello(cls, family: str = "panneal", **kw) -> "SAETrainConfig":
        """The paper's Othello layer-5 recipe (d 512, dictionary 4096, batch 8192)."""
        defaults = dict(family=family, d_in=512, d_sae=4096, lr=3.16e-4, sparsity_coeff=0.0316,
                        anneal_start=1000, batch_size=8192)
        return cls(**{**defaults, **kw})


def sparsity_key(family: str) -> str:
    """The grid key that sets a family's sparsity: ``k`` (TopK, BatchTopK), else ``sparsity_coeff``."""
    return "k" if family in ("topk", "batchtopk") else "sparsity_coeff"


SPARSITY_KEY = {f: sparsity_key(f) for f in FAMILIES}


def grid_runs(family: str, d_in: int, widths: Sequence[int], sparsities: Sequence[float], **cfg) -> dict:
    """``SAETrainer`` runs for a widths x sparsities grid: one run per width (``"<family>-<width>"``), its
    members the sparsities (``k`` for TopK / BatchTopK, else ``sparsity_coeff``) stacked and vmapped.
    ``cfg``: the other ``SAETrainConfig`` fields, shared by every SAE."""
    if not widths or not sparsities:
        raise ValueError(f"a grid needs at least one width and one sparsity, got {list(widths)}, {list(sparsities)}")
    key = SPARSITY_KEY.get(family)
    if key is None:
        raise ValueError(f"unknown SAE family {family!r}; choose one of {sorted(FAMILIES)}")
    values = [int(v) for v in sparsities] if key == "k" else [float(v) for v in sparsities]
    base = {key: max(values)} if key == "k" else {}
    return {f"{family}-{w}": (SAETrainConfig(family=family, d_in=d_in, d_sae=int(w), **base, **cfg),
                              [{key: v} for v in values]) for w in widths}


@struct.dataclass
class TrainState:
    """One SAE's training state (stacked along a grid axis by ``init_state``)."""

    sae: SAE
    opt: Any
    hp: Hparams
    step: jax.Array
    anneal: dict  # p_values [n], points [n], idx, ema_cur, ema_next


def _optimizer():
    return optax.scale_by_adam(b1=0.9, b2=0.999, eps=1e-8)


def input_scale_for(x: np.ndarray) -> float:
    """Scale making ``E||x * s||^2 = D`` on a sample ``[N, D]``."""
    x = np.asarray(x, np.float32)
    return float(np.sqrt(x.shape[-1] / np.mean(np.sum(x * x, -1))))


def _member_config(cfg: SAETrainConfig, override: Mapping[str, Any]) -> SAETrainConfig:
    bad = sorted(set(override) - set(GRID_KEYS))
    if bad:
        raise ValueError(f"grid keys {bad} are not tunable per SAE; tunable: {list(GRID_KEYS)}")
    return dataclasses.replace(cfg, **override)


def _init_one(cfg: SAETrainConfig, k_max: int, scale: float, b_dec) -> TrainState:
    sae = init_sae(cfg.family, jax.random.PRNGKey(cfg.seed), cfg.d_in, cfg.d_sae, k=cfg.k, k_max=k_max,
                   input_scale=scale, b_dec=b_dec, threshold=cfg.jumprelu_init_threshold, sparse=cfg.sparse)
    hp = Hparams.make(lr=cfg.lr, sparsity_coeff=cfg.sparsity_coeff, bandwidth=cfg.bandwidth,
                      aux_coeff=cfg.default_aux_coeff, aux_k=cfg.aux_k, dead_tokens=cfg.dead_tokens)
    n = cfg.n_anneal_points
    anneal = {"p_values": jnp.asarray(np.linspace(1.0, cfg.p_end, n), jnp.float32),
              "points": jnp.asarray(np.linspace(cfg.anneal_start, cfg.steps, n).astype(np.int32)),
              "idx": jnp.zeros((), jnp.int32), "ema_cur": jnp.zeros(()), "ema_next": jnp.zeros(())}
    return TrainState(sae=sae, opt=_optimizer().init(sae.params), hp=hp, step=jnp.zeros((), jnp.int32),
                      anneal=anneal)


def init_state(cfg: SAETrainConfig, grid: Sequence[Mapping[str, Any]], sample: np.ndarray) -> TrainState:
    """Stacked ``TrainState`` for every grid member (``grid=[{}]`` for one SAE).

    ``sample [N, D]``: activations for the input scale and the initial decoder bias.
    """
    if not grid:
        raise ValueError("grid must list at least one override dict ({} for the base config)")
    sample = np.asarray(sample, np.float32)
    if sample.ndim != 2 or sample.shape[1] != cfg.d_in:
        raise ValueError(f"sample must be [N, d_in={cfg.d_in}], got {sample.shape}")
    members = [_member_config(cfg, o) for o in grid]
    if any(m.uses_auxk for m in members) and not cfg.uses_auxk:
        raise ValueError(f"{cfg.family}: the grid sets aux_coeff > 0 but the base config's aux_coeff is 0, so AuxK "
                         f"is not compiled in; give the base config a non-zero aux_coeff")
    k_max = max(m.k for m in members) if cfg.family in ("topk", "batchtopk") else 0
    scale = input_scale_for(sample)
    b_dec = sample.mean(0) * scale if cfg.init_b_dec_mean else None
    states = [_init_one(m, k_max, scale, b_dec) for m in members]
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *states)


def unstack(state: TrainState, i: int) -> TrainState:
    """Grid member ``i`` of a stacked state."""
    return jax.tree_util.tree_map(lambda a: a[i], state)


# ----------------------------------------------------------------------------- the step


def _lr_at(cfg: SAETrainConfig, lr: jax.Array, t: jax.Array) -> jax.Array:
    warm = jnp.minimum(1.0, (t + 1) / max(cfg.lr_warmup_steps, 1))
    if cfg.lr_decay_frac > 0:
        decay_steps = cfg.lr_decay_frac * cfg.steps
        warm = warm * jnp.clip((cfg.steps - t) / decay_steps, 0.0, 1.0)
    return lr * warm


def _sparsity_scale(cfg: SAETrainConfig, t: jax.Array) -> jax.Array:
    if cfg.sparsity_warmup_steps <= 0:
        return jnp.ones(())
    return jnp.minimum(1.0, (t + 1) / cfg.sparsity_warmup_steps)


def _project_decoder_grad(grads: dict, w_dec: jax.Array) -> dict:
    """Remove from each decoder row's gradient its component along the (unit) row."""
    g = grads["W_dec"]  # [F, D]
    parallel = jnp.sum(g * w_dec, -1, keepdims=True) * w_dec
    return {**grads, "W_dec": g - parallel}


def _renorm_decoder(params: dict) -> dict:
    w = params["W_dec"]
    return {**params, "W_dec": w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), 1e-8)}


def anneal_update(anneal: dict, hp: Hparams, f: jax.Array, t: jax.Array, ema: float) -> tuple[dict, Hparams]:
    """Track recent-batch Lp means and, at a schedule point, step ``p`` and rescale lambda.

    ``f [B, F]`` latents of the current batch; ``t`` the step just taken.
    """
    n = anneal["p_values"].shape[0]
    nxt = jnp.minimum(anneal["idx"] + 1, n - 1)
    p_next = anneal["p_values"][nxt]
    cur = lp_penalty(f, hp.p).mean()
    new = lp_penalty(f, p_next).mean()
    first = t == 0
    ema_cur = jnp.where(first, cur, ema * anneal["ema_cur"] + (1 - ema) * cur)
    ema_next = jnp.where(first, new, ema * anneal["ema_next"] + (1 - ema) * new)
    due = (t + 1 >= anneal["points"][anneal["idx"]]) & (anneal["idx"] < n - 1)
    ratio = ema_cur / jnp.maximum(ema_next, 1e-12)
    hp = hp.replace(sparsity_coeff=jnp.where(due, hp.sparsity_coeff * ratio, hp.sparsity_coeff),
                    p=jnp.where(due, p_next, hp.p))
    # After a change, restart the running means at the new exponent's value on this batch.
    new_cur = jnp.where(due, new, ema_cur)
    new_next = jnp.where(due, lp_penalty(f, anneal["p_values"][jnp.minimum(nxt + 1, n - 1)]).mean(), ema_next)
    anneal = {**anneal, "idx": jnp.where(due, nxt, anneal["idx"]), "ema_cur": new_cur, "ema_next": new_next}
    return anneal, hp


def _any_dead(state: TrainState) -> jax.Array:
    """Whether any latent of any (possibly stacked) SAE in ``state`` counts as dead."""
    fired_ago = state.sae.buffers["fired_ago"]  # [..., F]
    return (fired_ago >= state.hp.dead_tokens[..., None]).any()


def sae_step(state: TrainState, x: jax.Array, cfg: SAETrainConfig,
             any_dead: jax.Array | None = None) -> tuple[TrainState, dict]:
    """One optimiser step of one SAE on raw activations ``x [B, D]``; returns (state, scalar metrics).

    ``any_dead``: optional unbatched flag (see ``_any_dead``) letting AuxK be skipped while
    no latent is dead; None computes AuxK unconditionally (same result).
    """
    sae, t = state.sae, state.step
    scale = _sparsity_scale(cfg, t)

    def loss_fn(params):
        return sae.replace(params=params).loss(x, state.hp, scale, use_auxk=cfg.uses_auxk, any_dead=any_dead)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(sae.params)
    if cfg.unit_norm_decoder:
        grads = _project_decoder_grad(grads, sae.params["W_dec"])
    updates, opt = _optimizer().update(grads, state.opt, sae.params)
    lr = _lr_at(cfg, state.hp.lr, t)
    params = jax.tree_util.tree_map(lambda p, u: p - lr * u, sae.params, updates)
    if cfg.unit_norm_decoder:
        params = _renorm_decoder(params)
    sae = sae.replace(params=params).update_buffers(aux)
    anneal, hp = state.anneal, state.hp
    if cfg.family == "panneal":
        anneal, hp = anneal_update(anneal, hp, aux["f"], t, cfg.anneal_ema)
    metrics = {"loss": loss, "mse": aux["mse"], "l0": aux["l0"], "sparsity": aux["sparsity"], "auxk": aux["auxk"],
               "p": state.hp.p, "sparsity_coeff": state.hp.sparsity_coeff,
               "dead_frac": (sae.buffers["fired_ago"] >= state.hp.dead_tokens).mean()}
    return TrainState(sae=sae, opt=opt, hp=hp, step=t + 1, anneal=anneal), metrics


# ----------------------------------------------------------------------------- trainer


def _latent_spec(x: jax.Array, d_sae: int, latent_axis: str):
    from jax.sharding import PartitionSpec as P

    axes = [None] * x.ndim
    for i in range(x.ndim - 1, 0, -1):  # axis 0 is the grid
        if x.shape[i] == d_sae:
            axes[i] = latent_axis
            break
    return P(*axes)


class SAETrainer:
    """Trains several runs (each a family config + a grid) on the same batches, in one jitted step.

    ``mesh``: optional ``jax.sharding.Mesh``; batches are split over ``batch_axis`` (data
    parallel) and every array with a latent axis is split over ``latent_axis``.
    """

    def __init__(self, runs: Mapping[str, tuple[SAETrainConfig, Sequence[Mapping[str, Any]]]], *,
                 mesh=None, batch_axis: str = "data", latent_axis: str = "tensor"):
        if not runs:
            raise ValueError("runs must name at least one (config, grid) pair")
        steps = {cfg.steps for cfg, _ in runs.values()}
        d_ins = {cfg.d_in for cfg, _ in runs.values()}
        if len(steps) != 1 or len(d_ins) != 1:
            raise ValueError(f"all runs must share steps and d_in; got steps {sorted(steps)}, d_in {sorted(d_ins)}")
        if mesh is not None:
            missing = [a for a in (batch_axis, latent_axis) if a not in mesh.axis_names]
            if missing:
                raise ValueError(f"mesh axes {mesh.axis_names} lack {missing}")
        self.runs = dict(runs)
        self.steps = steps.pop()
        self.mesh, self.batch_axis, self.latent_axis = mesh, batch_axis, latent_axis
        self._step = make_train_step(self._multi_step)

    def _multi_step(self, states: dict, x: jax.Array):
        out, metrics = {}, {}
        for name, (cfg, grid) in self.runs.items():
            st = states[name]
            any_dead = _any_dead(st) if cfg.uses_auxk else None
            if len(grid) == 1:
                # A size-1 vmap gives XLA [1, ...] batched dots and layout copies (~1.7x slower on CPU).
                one = jax.tree_util.tree_map(lambda a: a[0], st)
                new, m = sae_step(one, x, cfg, any_dead)
                out[name], metrics[name] = jax.tree_util.tree_map(lambda a: a[None], (new, m))
            else:
                step = functools.partial(sae_step, cfg=cfg, any_dead=any_dead)
                out[name], metrics[name] = jax.vmap(step, in_axes=(0, None))(st, x)
        return out, metrics

    def init(self, sample: np.ndarray) -> dict:
        states = {name: init_state(cfg, grid, sample) for name, (cfg, grid) in self.runs.items()}
        return self.place(states)

    def place(self, states: dict) -> dict:
        """Put states on the mesh (latent axes split over ``latent_axis``); identity without a mesh."""
        if self.mesh is None:
            return states
        from jax.sharding import NamedSharding

        out = {}
        for name, (cfg, _) in self.runs.items():
            spec = lambda a, d=cfg.d_sae: NamedSharding(self.mesh, _latent_spec(a, d, self.latent_axis))
            out[name] = jax.tree_util.tree_map(lambda a: jax.device_put(a, spec(a)), states[name])
        return out

    def place_batch(self, x) -> jax.Array:
        x = jnp.asarray(x, jnp.float32)
        if self.mesh is None:
            return x
        from jax.sharding import NamedSharding, PartitionSpec as P

        return jax.device_put(x, NamedSharding(self.mesh, P(self.batch_axis, None)))

    def step(self, states: dict, x) -> tuple[dict, dict]:
        return self._step(states, self.place_batch(x))

    def fit(self, states: dict, batch_fn: Callable[[int], Any], *, ckpt_dir=None, save_every: int = 100,
            log_every: int = 50, progress: bool = True, stop_after: int | None = None,
            log: Callable[[str], None] = print) -> tuple[dict, list]:
        """Train until ``self.steps`` with ``jaxinterp.train.fit`` (resuming from ``ckpt_dir`` if it
        holds a checkpoint; the directory is locked while training).

        Returns ``(states, history)``; history rows are ``{"step": s, run: {metric: [G]}}`` every
        ``log_every`` steps (and the last): the whole run's with ``ckpt_dir`` (also in its
        ``metrics.jsonl``), this call's without. ``stop_after``: return early after this many steps.
        """
        start = int(np.asarray(jax.tree_util.tree_leaves(next(iter(states.values())).step)[0]).reshape(-1)[0])
        loop = LoopConfig(steps=self.steps, save_every=save_every, log_every=log_every, desc="sae",
                          quiet=not progress)
        return fit(self.step, states, batch_fn, loop, directory=ckpt_dir, start=start, stop_after=stop_after, log=log)
