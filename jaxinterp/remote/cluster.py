"""``jaxinterp serve --distributed``: one server over several ``jax.distributed`` processes.

The model is sharded over every process's devices, so every program must run on every process in
the same order. Process 0 answers HTTP and owns the queue; its worker thread, before running a group
of jobs (the group it chose: co-tenant batching is decided once, on process 0), announces the group —
each job's kind, user and request bytes, exactly as received — through the ``jax.distributed`` key-value
store. The other processes (``follow``) read the announcements in order, rebuild the same jobs from
the same bytes with the same ``Service`` and run the same group; their results are dropped. Results
are read back to the host without a collective where the output is replicated (else with an
all-gather that every process makes in the same order). Stopping process 0 announces ``stop``.

Announcements are keyed by a sequence number; process 0 deletes announcement ``n - KEEP`` when it
sends ``n`` (a follower cannot fall behind by more than the group in flight: the groups' programs
span all processes).
"""

from __future__ import annotations

import json
import struct
from typing import Any, Optional, Sequence

import jax
import numpy as np

__all__ = ["Cluster", "follow", "to_host"]

PREFIX = "jaxinterp/serve/"
KEEP = 16
POLL_MS = 60_000


class Cluster:
    """Announcements from process 0 to the others, in order (``announce``/``stop`` on process 0,
    ``receive`` and ``leave`` elsewhere)."""

    def __init__(self, client: Any = None):
        if client is None:
            from jaxinterp.sharding.distributed import coordination_client

            client = coordination_client()
        if client is None:
            raise ValueError("jax.distributed is not initialised (run with --distributed or the "
                             "--coordinator/--num-processes/--process-id flags)")
        self._client, self._sent, self._received = client, 0, 0

    @property
    def leader(self) -> bool:
        return jax.process_index() == 0

    def _send(self, header: dict, payloads: Sequence[bytes] = ()) -> None:
        text = json.dumps({**header, "sizes": [len(p) for p in payloads]}).encode()
        self._client.key_value_set_bytes(f"{PREFIX}{self._sent}", struct.pack("<Q", len(text)) + text
                                         + b"".join(payloads))
        if self._sent >= KEEP:
            self._client.key_value_delete(f"{PREFIX}{self._sent - KEEP}")
        self._sent += 1

    def announce(self, jobs: Sequence[Any]) -> None:
        """Process 0: the group ``jobs`` (each with ``kind``, ``user``, ``payload``) is about to run."""
        self._send({"op": "group", "jobs": [[j.kind, j.user] for j in jobs]}, [j.payload for j in jobs])

    def stop(self) -> None:
        """Process 0: tell the others to exit, then leave the job with them."""
        self._send({"op": "stop", "jobs": []})
        self.leave()

    @staticmethod
    def leave() -> None:
        """Every process, at its end: ``jax.distributed.shutdown`` waits until all processes leave (a
        coordinator that exited first would make the others abort)."""
        jax.distributed.shutdown()

    def receive(self) -> Optional[list[tuple[str, str, bytes]]]:
        """The next announced group as ``[(kind, user, request bytes)]``; None for ``stop``."""
        key = f"{PREFIX}{self._received}"
        while True:
            try:
                blob = self._client.blocking_key_value_get_bytes(key, POLL_MS)
                break
            except Exception as e:  # noqa: BLE001 - a poll that timed out; the runtime ends us if process 0 dies
                if "DEADLINE" not in str(e).upper():
                    raise
        self._received += 1
        (n,) = struct.unpack("<Q", blob[:8])
        header = json.loads(blob[8:8 + n])
        if header["op"] == "stop":
            return None
        out, start = [], 8 + n
        for (kind, user), size in zip(header["jobs"], header["sizes"]):
            out.append((kind, user, blob[start:start + size]))
            start += size
        return out


def _host(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.sharding.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x) if isinstance(x, jax.Array) else x


def to_host(tree: Any) -> Any:
    """NumPy copies of the arrays in ``tree`` (global arrays of a multi-process model included)."""
    return jax.tree_util.tree_map(_host, tree)


def follow(service: Any, cluster: Cluster) -> int:
    """Processes other than 0: run every group process 0 announces, until it announces ``stop``."""
    from jaxinterp.remote.wire import decode

    makers = {"run": service.run_job, "generate": service.generate_job, "sweep": service.sweep_job}
    groups = 0
    while (group := cluster.receive()) is not None:
        jobs = [makers[kind](user, decode(payload, service.config.limits)) for kind, user, payload in group]
        service.scheduler.execute(jobs)
        groups += 1
    return groups
