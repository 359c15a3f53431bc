"""Training-state checkpoints: a thin wrapper over orbax-checkpoint's ``CheckpointManager``.

    ckpt = Checkpointer("runs/x/ckpt", keep=3, save_every=100)
    state = {"params": params, "opt": opt_state, "step": 0, "key": jax.random.key(0)}
    if ckpt.latest_step() is not None:
        state = ckpt.restore(template=state)
    ...
    ckpt.save(step, state)        # no-op unless step % save_every == 0 (or force=True)
    ckpt.close()

``state`` is any pytree of arrays, numpy arrays, Python scalars and PRNG keys (typed
``jax.random.key`` or raw ``uint32`` ``PRNGKey``). Typed keys are stored as their key data
and rebuilt with the template's key implementation, Python scalars come back as Python
scalars, and restored arrays take the template's shardings (so sharded training state
restores onto the same mesh). Saves are atomic: orbax writes into a temporary directory and
renames it when complete, so a process killed mid-save leaves the previous checkpoint as
the latest good one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "check_run_config"]


def check_run_config(directory: str | os.PathLike, config: dict, hint: str = "delete that directory") -> None:
    """Tie a checkpoint directory to the run config it is written for (``<directory>/config.json``).

    The first call records ``config``; later calls with a different config raise ``ValueError``
    naming the fields that differ (so a resume never mixes two runs' state). ``config`` is
    compared after a JSON round trip, so tuples and lists are the same value.
    """
    directory = Path(directory)
    path = directory / "config.json"
    want = json.loads(json.dumps(config))
    if path.exists():
        have = json.loads(path.read_text())
        diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
        if diff:
            raise ValueError(f"checkpoints in {directory} were written for a different config (fields {diff}: "
                             f"{ {k: have.get(k) for k in diff} } vs {({k: want.get(k) for k in diff})}); {hint}")
    else:
        directory.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(want, indent=1))


def _is_typed_key(x) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_storable(state):
    """Typed PRNG keys -> key data; Python scalars -> numpy scalars."""

    def conv(x):
        if _is_typed_key(x):
            return jax.random.key_data(x)
        if isinstance(x, (bool, int, float)) and not isinstance(x, jax.Array):
            return np.asarray(x)
        return x

    return jax.tree_util.tree_map(conv, state)


def _from_storable(restored, template):
    """Inverse of ``_to_storable`` guided by the template's leaves."""

    def conv(r, t):
        if _is_typed_key(t):
            return jax.random.wrap_key_data(jnp.asarray(r), impl=jax.random.key_impl(t))
        if isinstance(t, bool):
            return bool(r)
        if isinstance(t, int) and not isinstance(t, jax.Array):
            return int(r)
        if isinstance(t, float):
            return float(r)
        if isinstance(t, np.generic):
            return t.dtype.type(np.asarray(r))
        if isinstance(t, np.ndarray):
            return np.asarray(r)
        return r

    return jax.tree_util.tree_map(conv, restored, template)


def _abstract(x):
    """Restore target for one leaf: shape/dtype plus the template array's sharding."""
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    x = np.asarray(x)
    return jax.ShapeDtypeStruct(x.shape, x.dtype)


class Checkpointer:
    """Keep the last ``keep`` checkpoints of a pytree, saving every ``save_every`` steps.

    Args:
      directory: where step folders are written (created if missing).
      keep: how many of the most recent checkpoints to keep (``None``: all).
      save_every: ``save(step, ...)`` writes only when ``step % save_every == 0``.
      async_save: let orbax write in a background thread (call ``wait()``/``close()``).
    """

    def __init__(self, directory: str | os.PathLike, keep: int | None = 3, save_every: int = 1,
                 async_save: bool = False):
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be >= 1 or None, got {keep}")
        if save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}")
        self.directory = Path(directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.save_every = save_every
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every,
                                               enable_async_checkpointing=async_save, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state: Any, *, force: bool = False) -> bool:
        """Save ``state`` as ``step`` (when due or ``force``); returns whether it was saved."""
        step = int(step)
        if step in self.all_steps():
            return False
        return bool(self._manager.save(step, args=ocp.args.StandardSave(_to_storable(state)), force=force))

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or ``None``."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore(self, step: int | None = None, *, template: Any) -> Any:
        """The state saved at ``step`` (default: latest), with the structure/shardings of ``template``."""
        if step is None:
            step = self.latest_step()
            if step is None:
                raise FileNotFoundError(f"no checkpoint in {self.directory}")
        elif step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; steps: {self.all_steps()}")
        storable = _to_storable(template)
        target = jax.tree_util.tree_map(_abstract, storable)
        restored = self._manager.restore(step, args=ocp.args.StandardRestore(target))
        return _from_storable(restored, template)

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
