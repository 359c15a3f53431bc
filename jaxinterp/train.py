"""The training loop: every model, SAE grid and adapter in jaxinterp trains through ``fit``.

    optimizer = optax.adamw(1e-3)
    step = make_train_step(loss_step(loss_fn, optimizer))          # jitted; optionally sharded
    state = init_state(params, optimizer, jax.random.key(0))
    state, history = fit(step, state, batches, LoopConfig(steps=1000, save_every=100),
                         directory="runs/x/ckpt", run_config=config_dict)

``loss_fn(params, frozen, batch, key) -> loss`` or ``(loss, {name: scalar})``. ``batches(step)``
returns the batch of a step (a pure function of the step, so the step is the whole data
position); ``frozen`` is what a step reads but does not train (a frozen base model, a dataset
kept on device). Any ``step(state, batch[, frozen]) -> (state, metrics)`` works (the SAE
trainer brings its own update rule); ``make_train_step`` jits it, keeping the state where its
shardings put it and splitting the batch as asked.

With ``directory``, ``fit``:

* locks it (``OutputLock``): a second process on it is refused, naming the PID that holds it;
* records ``run_config`` there and refuses a resume with a different one, naming each differing
  field (``may_change`` lists the fields a resume may change), and refuses a run asking for
  fewer steps than its checkpoint holds (it would otherwise end at the longer run);
* checkpoints ``{"state", "step"}`` with orbax every ``save_every`` steps and at the end, and
  resumes from the newest intact checkpoint (damaged ones are skipped, one line each): a run
  killed at any point and re-run ends bit-identical to an uninterrupted one;
* appends one JSON row per logged step to ``metrics.jsonl``; rows past the restored step (logged
  after the last checkpoint of a killed run) are dropped on resume, so no row is duplicated.

``hooks`` run every N steps (evaluation, logging); the fields they return join that step's row.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from jaxinterp.checkpoint import Checkpointer, OutputLock, check_run_config, write_atomic

__all__ = ["LoopConfig", "Hook", "init_state", "loss_step", "make_train_step", "fit", "read_metrics"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoopConfig:
    """How long to train and how often to checkpoint and log.

    Attributes:
      steps: total optimisation steps of the run (a resume continues to this count).
      save_every: checkpoint every N steps (and always at the end).
      keep: checkpoints kept on disk (the newest).
      log_every: a metrics row every N steps (and at the last step).
      desc: progress-bar label.
      quiet: no progress bar.
    """

    steps: int
    save_every: int = 100
    keep: int = 2
    log_every: int = 1
    desc: str = "train"
    quiet: bool = False

    def __post_init__(self):
        for name in ("steps", "save_every", "keep", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"LoopConfig.{name} must be >= 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class Hook:
    """``fn(step, state, metrics)`` after every ``every``-th step (``metrics``: the step's, on device);
    a returned mapping joins that step's metrics row."""

    every: int
    fn: Callable[[int, Any, Mapping], Mapping | None]

    def __post_init__(self):
        if self.every < 1:
            raise ValueError(f"Hook.every must be >= 1, got {self.every}")


# ----------------------------------------------------------------------------- the step


def init_state(params, optimizer: optax.GradientTransformation, key) -> dict:
    """``{"params", "opt", "key"}`` for ``loss_step``. Params and key are copied: steps donate their state."""
    params, key = jax.tree_util.tree_map(jnp.copy, (params, key))
    return {"params": params, "opt": optimizer.init(params), "key": key}


def loss_step(loss_fn: Callable, optimizer: optax.GradientTransformation) -> Callable:
    """``step(state, batch, frozen=None) -> (state, metrics)``: one optimizer step on ``loss_fn``.

    The state's key is split once per step and the fresh half passed to the loss; metrics are
    the loss, the loss's own terms and the gradient norm.
    """

    def step(state: dict, batch, frozen=None):
        key, sub = jax.random.split(state["key"])

        def value(params):
            out = loss_fn(params, frozen, batch, sub)
            return out if isinstance(out, tuple) else (out, {})

        (loss, terms), grads = jax.value_and_grad(value, has_aux=True)(state["params"])
        updates, opt = optimizer.update(grads, state["opt"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {**state, "params": params, "opt": opt, "key": key}, {"loss": loss, **terms,
                                                                      "grad_norm": optax.tree.norm(grads)}

    return step


def make_train_step(step: Callable, state_shardings: Any = None, batch_sharding: Any = None, *,
                    donate: bool = True) -> Callable:
    """Jit ``step(state, batch, *frozen) -> (state, metrics)``, donating the state.

    ``state_shardings`` (a sharding or a tree of them) fixes both input and output placement of
    the state, so FSDP/TP parameters and their optimizer moments never get gathered between
    steps; ``batch_sharding`` splits (and places host) batches over the data axes. Frozen
    arguments keep the sharding they come with.
    """
    sharded = state_shardings is not None or batch_sharding is not None
    compiled: dict[int, Callable] = {}

    def jitted(n_frozen: int) -> Callable:
        kw = {}
        if sharded:
            kw = dict(in_shardings=(state_shardings, batch_sharding) + (None,) * n_frozen,
                      out_shardings=(state_shardings, None))
        return jax.jit(step, donate_argnums=(0,) if donate else (), **kw)

    def call(state, batch, *frozen):
        if len(frozen) not in compiled:
            compiled[len(frozen)] = jitted(len(frozen))
        return compiled[len(frozen)](state, batch, *frozen)

    return call


# ----------------------------------------------------------------------------- metrics.jsonl


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a ``metrics.jsonl`` (a line cut short by a kill is left out)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return [r for r in rows if isinstance(r, dict) and "step" in r]


class _MetricsFile:
    """``metrics.jsonl`` cut back to the rows up to ``step`` (atomically), then appended to."""

    def __init__(self, path: Path, step: int):
        self.path = path
        self.rows = [r for r in read_metrics(path) if r["step"] <= step]
        if path.exists() and path.read_text() != self._text(self.rows):
            write_atomic(path, self._text(self.rows))

    @staticmethod
    def _text(rows: Sequence[dict]) -> str:
        return "".join(json.dumps(r) + "\n" for r in rows)

    def append(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(self._text([row]))
        self.rows.append(row)


# ----------------------------------------------------------------------------- the loop


def fit(step_fn: Callable, state: Any, batches: Callable[[int], Any] | None, loop: LoopConfig, *,
        directory: str | Path | None = None, frozen: Any = None, start: int = 0,
        run_config: Mapping | None = None, may_change: Sequence[str] = (), hooks: Sequence[Hook] = (),
        metrics_path: str | Path | None = None, stop_after: int | None = None,
        log: Callable[[str], None] = print) -> tuple[Any, list[dict]]:
    """Train ``state`` from ``start`` (or its checkpoint) to ``loop.steps``; returns ``(state, history)``.

    ``step_fn(state, batch[, frozen]) -> (state, metrics)`` (``frozen`` passed only when not None);
    ``batches(step)`` -> that step's batch (``None``: the step draws its own). ``history`` holds the
    metrics rows ``{"step": s, **metrics, **hook fields}``: of the whole run (``metrics.jsonl``)
    with ``directory``, of this call without. ``metrics_path`` defaults to
    ``<directory>/metrics.jsonl``; ``stop_after``: return after this many steps of this call.
    See the module docstring for checkpoints, the run-config guard and the lock.
    """
    if directory is None:
        rows: list[dict] = []
        state = _loop(step_fn, state, batches, loop, frozen, start, hooks, stop_after, rows.append, None, log)
        return state, rows
    directory = Path(directory)
    with OutputLock(directory):
        if run_config is not None:
            check_run_config(directory, run_config, may_change=may_change,
                             hint=f"use another output directory or delete {directory} to start over")
        with Checkpointer(directory, keep=loop.keep, log=log) as ckpt:
            state, start = _resume(ckpt, state, start, loop, log)
            metrics = _MetricsFile(Path(metrics_path or directory / "metrics.jsonl"), start)
            state = _loop(step_fn, state, batches, loop, frozen, start, hooks, stop_after, metrics.append, ckpt, log)
        return state, metrics.rows


def _resume(ckpt: Checkpointer, state, start: int, loop: LoopConfig, log) -> tuple[Any, int]:
    """The newest intact checkpoint's state and step (damaged newer steps are deleted), or the inputs."""
    if not ckpt.all_steps():
        return state, start
    try:
        restored = ckpt.restore(template={"state": state, "step": 0})
    except FileNotFoundError:
        log(f"no intact checkpoint in {ckpt.directory}; starting from step {start}")
        restored = None
    step = restored["step"] if restored else start
    if step > loop.steps:
        raise ValueError(f"{ckpt.directory} holds a checkpoint at step {step}, past the {loop.steps} steps asked "
                         f"for; ask for at least {step} steps, or use another output directory")
    for newer in [s for s in ckpt.all_steps() if s > step]:
        ckpt.delete(newer)  # damaged (skipped above); the run writes them again
    if restored is None:
        return state, start
    log(f"resumed from step {step} ({ckpt.directory})")
    return restored["state"], step


def _to_host(metrics) -> dict:
    return jax.tree_util.tree_map(lambda a: np.asarray(a).tolist(), dict(metrics))


def _loop(step_fn, state, batches, loop: LoopConfig, frozen, start: int, hooks, stop_after, record,
          ckpt: Checkpointer | None, log):
    end = loop.steps if stop_after is None else min(loop.steps, start + stop_after)
    args = () if frozen is None else (frozen,)
    bar = tqdm(range(start, end), initial=start, total=loop.steps, desc=loop.desc, disable=loop.quiet)
    for s in bar:
        state, metrics = step_fn(state, None if batches is None else batches(s), *args)
        done = s + 1
        extra = {}
        for hook in hooks:
            if done % hook.every == 0:
                extra.update(hook.fn(done, state, metrics) or {})
        if extra or done % loop.log_every == 0 or done == loop.steps:
            row = {"step": done, **_to_host(metrics), **extra}
            record(row)
            if isinstance(row.get("loss"), float):
                bar.set_postfix(loss=f"{row['loss']:.4f}")
        if ckpt is not None and (done % loop.save_every == 0 or done == end):
            if ckpt.save(done, {"state": state, "step": done}, force=True):
                log(f"saved checkpoint step {done}")
    return state
