"""The server's execution engine: a bounded cache of compiled programs and a fair, batching job queue.

* ``Programs``: an LRU of compiled programs (``size`` entries). A program is built by ``lower`` +
  ``compile`` and lives only here, so evicting it frees it; functions that keep their own jit cache
  (``ji.generate``'s program, the patching sweep) are cleared when one of their signatures is evicted.
* ``BackgroundCompiler``: builds the batched programs of a group size not seen yet off the request
  path; meanwhile the group runs in chunks of the sizes already compiled (or request by request), so
  a new group size never stalls the queue behind a compile.
* ``Scheduler``: one worker thread; one queue per user, served round robin. A job that can be batched
  (``Job.batch_key`` not None: ``run`` requests) takes with it the queued jobs of other users with the
  same key (same shapes, dtypes, capture, intervention structure and static values), up to
  ``max_batch``; they run as one ``vmap``-ped program over the stacked arrays, the group size padded to
  a power of two (repeating the last job) so a handful of programs serve every group size. A group
  that fails is rerun job by job, so one user's bad request never fails another's.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, Hashable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.model import run

__all__ = ["Programs", "BackgroundCompiler", "Job", "Scheduler", "QueueFull", "ShuttingDown", "run_signature",
           "group_size"]


class QueueFull(RuntimeError):
    """The server's queue holds ``max_queue`` requests already."""


class ShuttingDown(RuntimeError):
    """The server stopped before running the request (retry it once the server is back)."""


class Programs:
    """An LRU cache of compiled programs: ``get(key, build)``; ``build() -> (program, info)``."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"the program cache needs at least 1 entry, got {size}")
        self.size, self.hits, self.misses, self.evictions = size, 0, 0, 0
        self._entries: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, build: Callable[[], tuple[Any, Any]], on_evict: Optional[Callable] = None):
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                return self._entries[key][:2]
        entry = (*build(), on_evict)  # outside the lock: compiling takes long
        with self._lock:
            self.misses += 1
            self._entries[key] = entry
            self._entries.move_to_end(key)
            evicted = []
            while len(self._entries) > self.size:
                evicted.append(self._entries.popitem(last=False)[1])
                self.evictions += 1
        for _, _, clear in evicted:
            if clear is not None:
                clear()
        return entry[:2]

    def has(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict:
        return {"size": len(self._entries), "capacity": self.size, "hits": self.hits, "misses": self.misses,
                "evictions": self.evictions}


class BackgroundCompiler:
    """One thread that builds programs into ``programs`` off the request path (each key once at a time)."""

    def __init__(self, programs: Programs):
        self.programs, self._pending, self._lock = programs, set(), threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="jaxinterp-serve-compiler", daemon=True)
        self._thread.start()

    def submit(self, key: Hashable, build: Callable[[], tuple[Any, Any]], on_error: Callable[[], None]) -> None:
        with self._lock:
            if key in self._pending:
                return
            self._pending.add(key)
        self._queue.put((key, build, on_error))

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            key, build, on_error = item
            try:
                self.programs.get(key, build)
            except Exception:  # noqa: BLE001 - the caller keeps running requests without this program
                on_error()
            finally:
                with self._lock:
                    self._pending.discard(key)

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)


@dataclasses.dataclass(eq=False)
class Job:
    """One request in the queue. ``work()`` runs it alone; a batchable job has a ``batch_key`` and its
    dynamic ``arrays`` (``batch_work(jobs)`` runs a group of equal keys)."""

    user: str
    kind: str
    work: Callable[[], Any]
    batch_key: Optional[Hashable] = None
    arrays: Sequence[Any] = ()
    batch_work: Optional[Callable[[Sequence["Job"]], list]] = None
    future: Future = dataclasses.field(default_factory=Future)
    payload: bytes = b""  # the request as received (a distributed server announces it to the other processes)
    cancelled: bool = False
    started: Optional[float] = None
    compute_s: float = 0.0


def group_size(n: int, max_batch: int) -> int:
    """The compiled group size for ``n`` jobs: the next power of two, at most ``max_batch``."""
    return min(1 << (n - 1).bit_length(), max_batch)


class Scheduler:
    """One worker thread serving per-user queues round robin, batching equal-key jobs (see module doc)."""

    def __init__(self, max_batch: int = 8, max_queue: int = 256, on_done: Optional[Callable[[Job], None]] = None,
                 before_run: Optional[Callable[[list[Job]], None]] = None):
        """``before_run(group)``: called on the worker thread just before a group runs (a distributed
        server announces the group to its other processes there)."""
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1")
        self.max_batch, self.max_queue, self.on_done, self.before_run = max_batch, max_queue, on_done, before_run
        self._queues: dict[str, collections.deque] = {}
        self._order: list[str] = []  # users in round-robin order; the next turn is _order[_turn]
        self._turn = 0
        self._cv = threading.Condition()
        self._stopping = False
        self._held = False
        self.running = 0
        self.batches = collections.Counter()  # group size -> groups run
        self._thread = threading.Thread(target=self._loop, name="jaxinterp-serve-worker", daemon=True)
        self._thread.start()

    # --------------------------------------------------------------------------- queue

    def queued(self, user: Optional[str] = None) -> int:
        with self._cv:
            qs = [self._queues.get(user, ())] if user is not None else self._queues.values()
            return sum(sum(not j.cancelled for j in q) for q in qs)

    def submit(self, job: Job) -> Future:
        with self._cv:
            if self._stopping:
                raise ShuttingDown("the server is shutting down; retry")
            if sum(len(q) for q in self._queues.values()) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests); retry later")
            if job.user not in self._queues:
                self._queues[job.user] = collections.deque()
                self._order.append(job.user)
            self._queues[job.user].append(job)
            self._cv.notify()
        return job.future

    @contextlib.contextmanager
    def hold(self):
        """Queue without running inside the block (tests, a maintenance pause); the queue runs after it."""
        with self._cv:
            self._held = True
        try:
            yield self
        finally:
            with self._cv:
                self._held = False
                self._cv.notify_all()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            pending = [j for q in self._queues.values() for j in q]
            for q in self._queues.values():
                q.clear()
            self._cv.notify_all()
        for job in pending:  # nobody waits forever on a job that will not run
            if not job.future.done():
                job.future.set_exception(ShuttingDown("the server shut down before running this request; retry"))
        self._thread.join(timeout=30)

    def _next(self) -> Optional[Job]:
        """The head of the next user's queue in round-robin order (cancelled jobs are dropped)."""
        for _ in range(len(self._order)):
            user = self._order[self._turn % len(self._order)]
            self._turn = (self._turn + 1) % len(self._order)
            q = self._queues[user]
            while q and q[0].cancelled:
                q.popleft()
            if q:
                return q.popleft()
        return None

    def _companions(self, first: Job) -> list[Job]:
        """Queued jobs of other users with ``first``'s batch key: the first match per user, round robin."""
        group = [first]
        if first.batch_key is None:
            return group
        start = self._turn
        for k in range(len(self._order)):
            if len(group) >= self.max_batch:
                break
            user = self._order[(start + k) % len(self._order)]
            if user == first.user:
                continue
            q = self._queues[user]
            for job in q:
                if not job.cancelled and job.batch_key == first.batch_key:
                    q.remove(job)
                    group.append(job)
                    break
        return group

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stopping and (self._held or not any(self._queues.values())):
                    self._cv.wait()
                if self._stopping:
                    return
                first = self._next()
                if first is None:
                    continue
                group = self._companions(first)
                self.running = len(group)
            try:
                if self.before_run is not None:
                    self.before_run(group)
            except Exception as e:  # noqa: BLE001 - the group cannot run; its requests are answered, not stuck
                for job in group:
                    self._finish(job, error=e)
                group = []
            try:
                self.execute(group)
            finally:
                with self._cv:
                    self.running = 0

    # --------------------------------------------------------------------------- execution

    def execute(self, group: list[Job]) -> None:
        """Run ``group`` (one batched program, or each job alone if that fails) and settle its futures."""
        if not group:
            return
        start = time.perf_counter()
        for job in group:
            job.started = start
        if len(group) > 1:
            try:
                results = group[0].batch_work(group)
            except Exception:  # noqa: BLE001 - one bad request must not fail the others: run each alone
                results = None
            if results is not None:
                share = (time.perf_counter() - start) / len(group)
                self.batches[group_size(len(group), self.max_batch)] += 1
                for job, result in zip(group, results):
                    job.compute_s = share
                    self._finish(job, result=result)
                return
        for job in group:
            t0 = time.perf_counter()
            try:
                result = job.work()
            except BaseException as e:  # noqa: BLE001 - handed to the waiting request
                job.compute_s = time.perf_counter() - t0
                self._finish(job, error=e)
                continue
            self.batches[1] += 1
            job.compute_s = time.perf_counter() - t0
            self._finish(job, result=result)

    def _finish(self, job: Job, result=None, error: Optional[BaseException] = None) -> None:
        if not job.future.done():
            job.future.set_exception(error) if error is not None else job.future.set_result(result)
        if self.on_done is not None:
            self.on_done(job)


# ----------------------------------------------------------------------------- run programs


def _is_array(x) -> bool:
    return isinstance(x, (jax.Array, np.ndarray))


def run_signature(args: dict) -> tuple[Hashable, list, Callable[[list], dict]]:
    """``(key, arrays, rebuild)`` for ``run``'s arguments ``args``: ``key`` holds the tree structure,
    the static (non-array) leaves by value and the arrays' shapes and dtypes; ``rebuild(arrays)`` puts
    arrays back into the structure."""
    leaves, treedef = jax.tree_util.tree_flatten(args)
    slots = [i for i, x in enumerate(leaves) if _is_array(x)]
    statics = tuple((i, type(x).__name__, x) for i, x in enumerate(leaves) if not _is_array(x))
    arrays = [leaves[i] for i in slots]
    avals = tuple((tuple(a.shape), str(a.dtype)) for a in arrays)
    return (treedef, statics, avals), arrays, functools.partial(_rebuild, treedef, tuple(slots), statics)


def _rebuild(treedef, slots, statics, arrays) -> Any:
    leaves: list = [None] * (len(slots) + len(statics))
    for i, _, x in statics:
        leaves[i] = x
    for i, a in zip(slots, arrays):
        leaves[i] = a
    return jax.tree_util.tree_unflatten(treedef, leaves)


def run_arrays(model, arrays, *, rebuild, capture):
    """``run`` on arguments rebuilt from their arrays: ``(logits, cache dict)``."""
    args = rebuild(list(arrays))
    out = run(model, args["tokens"], capture=capture, interventions=args.get("interventions"),
              attention_mask=args.get("attention_mask"), positions=args.get("positions"),
              logits_at=args.get("logits_at"))
    return out.logits, dict(out.cache)


def compile_run(model, arrays: list, *, rebuild, capture, n: int):
    """A compiled ``run`` for one request (``n == 0``) or ``n`` stacked requests (vmapped), and the
    bytes of its captured arrays per request."""
    fn = functools.partial(run_arrays, rebuild=rebuild, capture=capture)
    if n:
        fn = jax.vmap(fn, in_axes=(None, 0))
        arrays = [jax.ShapeDtypeStruct((n, *a.shape), a.dtype) for a in arrays]
    else:
        arrays = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays]
    lowered = jax.jit(fn).lower(model, arrays)
    _, cache = lowered.out_info
    capture_bytes = sum(int(np.prod(s.shape)) * jnp.dtype(s.dtype).itemsize for s in cache.values()) // max(n, 1)
    return lowered, capture_bytes
