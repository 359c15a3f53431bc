"""Training-state checkpoints (orbax-checkpoint), their integrity, run-config records and output locks.

    ckpt = Checkpointer("runs/x/ckpt", keep=3, save_every=100)
    state = {"params": params, "opt": opt_state, "step": 0, "key": jax.random.key(0)}
    if ckpt.latest_step() is not None:
        state = ckpt.restore(template=state)   # the newest intact step
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

Integrity: once a step is completely written, a SHA-256 of every file in it is written beside
them (``<step>/sha256.json``, itself atomically). ``restore`` checks it before orbax reads
anything; a step with a changed, truncated, missing or unlisted file (or no checksum: its writer
died before finishing) is skipped with one line naming the step and the reason, and the
newest intact step is restored instead.

``check_run_config`` ties a checkpoint directory to the config that wrote it; ``OutputLock``
keeps a second process out of a directory while one writes it.
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "check_run_config", "OutputLock", "OutputLocked", "write_atomic"]

CHECKSUM_FILE = "sha256.json"


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` with ``text``: written to a temporary file beside it, then renamed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- run configs


def _flatten(config: Mapping, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists and scalars are leaves)."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def check_run_config(directory: str | os.PathLike, config: Mapping, hint: str = "delete that directory", *,
                     may_change: Sequence[str] = ()) -> None:
    """Tie a checkpoint directory to the run config it is written for (``<directory>/config.json``).

    The first call records ``config``; later calls with a different config raise ``ValueError``
    naming every differing field (dotted for nested configs: ``optim.lr: 0.001 -> 0.002``), so a
    resume never mixes two runs' state. ``may_change``: dotted fields (or sections) a resume may
    change (a step count, how often to evaluate); the record then takes their new values.
    ``config`` is compared after a JSON round trip, so tuples and lists are the same value.
    """
    directory = Path(directory)
    path = directory / "config.json"
    want = json.loads(json.dumps(config))
    if path.exists():
        have = json.loads(path.read_text())
        old, new = _flatten(have), _flatten(want)
        free = lambda k: any(k == m or k.startswith(m + ".") for m in may_change)
        diff = sorted(k for k in set(old) | set(new) if old.get(k, "<absent>") != new.get(k, "<absent>") and not free(k))
        if diff:
            fields = ", ".join(f"{k}: {old.get(k, '<absent>')!r} -> {new.get(k, '<absent>')!r}" for k in diff)
            raise ValueError(f"checkpoints in {directory} were written for a different config ({fields}); {hint}")
        if have == want:
            return
    directory.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(want, indent=1))


# ----------------------------------------------------------------------------- output locks


class OutputLocked(ValueError):
    """Another process holds the directory's lock (a user error: pick another output directory or wait)."""


class OutputLock:
    """An exclusive lock on an output directory: ``fcntl.flock`` on ``<directory>/.lock``.

        with OutputLock(out):
            ...   # this process alone writes ``out``

    The lock file holds the owner's PID; a second process is refused with ``OutputLocked``
    naming it. The OS releases a flock when its holder dies, so a lock left by a killed process
    is simply taken over. Re-entrant within a process (the same directory locked twice by one
    process is one lock); the file is removed on release.
    """

    _held: dict[Path, list] = {}  # resolved directory -> [fd, depth]

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory).absolute()
        self.path = self.directory / ".lock"

    def acquire(self) -> "OutputLock":
        self.directory.mkdir(parents=True, exist_ok=True)
        key = self.directory.resolve()
        if key in self._held:
            self._held[key][1] += 1
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise OutputLocked(f"{self.directory} is in use by process {holder} (lock file {self.path}); wait "
                                   f"for it to finish or use another output directory") from None
            if self._same_file(fd):  # not a file a releasing holder unlinked meanwhile
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._held[key] = [fd, 1]
        return self

    def _same_file(self, fd: int) -> bool:
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        key = self.directory.resolve()
        entry = self._held.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del self._held[key]
            self.path.unlink(missing_ok=True)  # before unlocking: a waiter re-checks the inode
            os.close(entry[0])

    def hold(self) -> "OutputLock":
        """Acquire until this process exits (for a command's whole run)."""
        self.acquire()
        atexit.register(self.release)
        return self

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ----------------------------------------------------------------------------- pytrees <-> orbax


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


# ----------------------------------------------------------------------------- integrity


def _file_digests(step_dir: Path) -> dict[str, list]:
    """``{relative path: [size, sha256 hex]}`` of every file under ``step_dir`` but the checksum."""
    out = {}
    for path in sorted(p for p in step_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(step_dir).as_posix()
        if rel != CHECKSUM_FILE:
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            out[rel] = [path.stat().st_size, h.hexdigest()]
    return out


def write_checksum(step_dir: Path) -> None:
    write_atomic(step_dir / CHECKSUM_FILE, json.dumps({"algorithm": "sha256", "files": _file_digests(step_dir)}))


def checksum_problem(step_dir: Path) -> str | None:
    """Why ``step_dir`` is not intact (a short phrase), or None when every file matches its checksum."""
    try:
        want = json.loads((step_dir / CHECKSUM_FILE).read_text())["files"]
    except FileNotFoundError:
        return f"it has no {CHECKSUM_FILE} (its writer stopped before finishing it)"
    except (ValueError, KeyError, TypeError):
        return f"its {CHECKSUM_FILE} is unreadable"
    have = _file_digests(step_dir)
    for rel, (size, digest) in want.items():
        if rel not in have:
            return f"{rel} is missing"
        if have[rel][0] != size:
            return f"{rel} has {have[rel][0]} bytes, {size} were written (truncated or overwritten)"
        if have[rel][1] != digest:
            return f"{rel} does not match its checksum (changed on disk)"
    extra = sorted(set(have) - set(want))
    return f"{extra[0]} was not part of the checkpoint" if extra else None


def _sync_processes(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------- checkpointer


class Checkpointer:
    """Keep the last ``keep`` checkpoints of a pytree, saving every ``save_every`` steps.

    Args:
      directory: where step folders are written (created if missing).
      keep: how many of the most recent checkpoints to keep (``None``: all).
      save_every: ``save(step, ...)`` writes only when ``step % save_every == 0``.
      log: receives the one-line notes on skipped (damaged) steps; default: stderr.
    """

    def __init__(self, directory: str | os.PathLike, keep: int | None = 3, save_every: int = 1,
                 log: Callable[[str], None] = _stderr):
        if keep is not None and keep < 1:
            raise ValueError(f"keep must be >= 1 or None, got {keep}")
        if save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}")
        self.directory = Path(directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.save_every = save_every
        self.log = log
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def _step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def save(self, step: int, state: Any, *, force: bool = False) -> bool:
        """Save ``state`` as ``step`` (when due or ``force``); returns whether it was saved.

        An existing intact checkpoint of ``step`` is kept; a damaged one is replaced.
        """
        step = int(step)
        if step in self.all_steps():
            if checksum_problem(self._step_dir(step)) is None:
                return False
            self.delete(step)
        saved = bool(self._manager.save(step, args=ocp.args.StandardSave(_to_storable(state)), force=force))
        if saved:
            self._manager.wait_until_finished()
            if jax.process_index() == 0:
                write_checksum(self._step_dir(step))
            _sync_processes(f"jaxinterp_checksum_{step}")
        return saved

    def delete(self, step: int) -> None:
        self._manager.delete(int(step))

    def all_steps(self) -> list[int]:
        """Every step folder orbax lists, intact or not."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest completely written step (one with a checksum; ``restore`` verifies it), or ``None``."""
        done = [s for s in self.all_steps() if (self._step_dir(s) / CHECKSUM_FILE).exists()]
        return done[-1] if done else None

    def restore(self, step: int | None = None, *, template: Any) -> Any:
        """The state saved at ``step`` (default: the newest intact step), with the structure/shardings of
        ``template``. Damaged steps newer than the one restored are skipped with one line each."""
        if step is None:
            step = self.latest_intact_step()
            if step is None:
                damaged = f" (steps {self.all_steps()} are damaged)" if self.all_steps() else ""
                raise FileNotFoundError(f"no checkpoint in {self.directory}{damaged}")
        elif step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; steps: {self.all_steps()}")
        else:
            problem = checksum_problem(self._step_dir(step))
            if problem is not None:
                raise ValueError(f"checkpoint step {step} in {self.directory} is damaged: {problem}")
        storable = _to_storable(template)
        target = jax.tree_util.tree_map(_abstract, storable)
        restored = self._manager.restore(step, args=ocp.args.StandardRestore(target))
        return _from_storable(restored, template)

    def latest_intact_step(self) -> int | None:
        """The newest step whose files match their checksum; each newer step is reported (one line) and skipped."""
        for step in reversed(self.all_steps()):
            problem = checksum_problem(self._step_dir(step))
            if problem is None:
                return step
            self.log(f"checkpoint step {step} in {self.directory} skipped: {problem}")
        return None

    def wait(self) -> None:
        """Block until pending saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
