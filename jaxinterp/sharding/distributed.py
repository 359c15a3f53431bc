"""Multi-process runs: ``jax.distributed`` from flags or environment, per-process data, checkpoints.

Every host runs the same program. ``initialize`` connects the processes (a no-op for a
single process), after which ``jax.devices()`` lists every device of every host and a
mesh over them spans the whole slice or cluster::

    from jaxinterp import sharding as jsh
    from jaxinterp.sharding import distributed
    distributed.initialize()                    # env / SLURM / TPU metadata
    mesh = jsh.make_mesh(target.mesh)           # over all hosts' devices
    rows = distributed.process_rows(dataset)    # this host's deterministic share
    batch = distributed.global_batch(rows, mesh, P(("data", "fsdp")))

Where the settings come from, first match wins:

1. explicit arguments / ``--coordinator --num-processes --process-id`` flags;
2. ``JAXINTERP_COORDINATOR`` (host:port), ``JAXINTERP_NUM_PROCESSES``, ``JAXINTERP_PROCESS_ID``,
   ``JAXINTERP_LOCAL_DEVICE_IDS`` (comma separated);
3. SLURM (``SLURM_NTASKS``, ``SLURM_PROCID``, coordinator = first node of
   ``SLURM_JOB_NODELIST`` on ``JAXINTERP_COORDINATOR_PORT``, default 12355) and Cloud TPU
   VMs, which ``jax.distributed.initialize()`` detects itself.

Checkpoints go through ``jaxinterp.checkpoint.Checkpointer`` (orbax): every process calls
``save``/``restore`` with its addressable shards, and orbax coordinates the hosts.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
from typing import Any, Mapping, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "DistributedConfig",
    "add_flags",
    "config_from",
    "initialize",
    "is_initialized",
    "coordination_client",
    "process_slice",
    "process_rows",
    "global_batch",
    "place_global",
    "gather",
    "host_seed",
]

DEFAULT_PORT = 12355


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistributedConfig:
    """How this process joins the others (all None: let JAX detect a TPU / SLURM cluster)."""

    coordinator: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    local_device_ids: Optional[tuple[int, ...]] = None
    timeout_s: int = 300

    def __post_init__(self):
        if self.coordinator is not None and not re.fullmatch(r"[^:\s]+:\d+", self.coordinator):
            raise ValueError(f"coordinator must be 'host:port', got {self.coordinator!r}")
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"num_processes must be >= 1, got {self.num_processes}")
        if self.process_id is not None and self.num_processes is not None and \
                not 0 <= self.process_id < self.num_processes:
            raise ValueError(f"process_id must lie in [0, {self.num_processes}), got {self.process_id}")

    @property
    def single_process(self) -> bool:
        return self.num_processes == 1


def add_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``--coordinator``, ``--num-processes``, ``--process-id``, ``--local-device-ids``."""
    g = parser.add_argument_group("distributed")
    g.add_argument("--coordinator", default=None, help="host:port of process 0 (default: env / auto-detect)")
    g.add_argument("--num-processes", type=int, default=None)
    g.add_argument("--process-id", type=int, default=None)
    g.add_argument("--local-device-ids", default=None, help="comma-separated local device ids for this process")
    return parser


def _ids(text: Optional[str]) -> Optional[tuple[int, ...]]:
    return None if not text else tuple(int(x) for x in str(text).split(","))


def _slurm_first_host(nodelist: str) -> str:
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        # "node[03-05,07]" -> "node03"; "a,b" -> "a"
        m = re.match(r"([^\[,]+)(?:\[(\d+))?", nodelist)
        return m.group(1) + (m.group(2) or "")


def config_from(args: Optional[argparse.Namespace] = None, env: Mapping[str, str] = os.environ) -> DistributedConfig:
    """Settings from flags, then ``JAXINTERP_*`` variables, then SLURM variables."""
    get = lambda flag: getattr(args, flag, None) if args is not None else None
    coordinator = get("coordinator") or env.get("JAXINTERP_COORDINATOR")
    num = get("num_processes") or env.get("JAXINTERP_NUM_PROCESSES")
    pid = get("process_id")
    pid = pid if pid is not None else env.get("JAXINTERP_PROCESS_ID")
    local = get("local_device_ids") or env.get("JAXINTERP_LOCAL_DEVICE_IDS")
    if num is None and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        num, pid = env["SLURM_NTASKS"], env.get("SLURM_PROCID")
        if coordinator is None and "SLURM_JOB_NODELIST" in env:
            port = env.get("JAXINTERP_COORDINATOR_PORT", DEFAULT_PORT)
            coordinator = f"{_slurm_first_host(env['SLURM_JOB_NODELIST'])}:{port}"
    return DistributedConfig(coordinator=coordinator, num_processes=None if num is None else int(num),
                             process_id=None if pid is None else int(pid), local_device_ids=_ids(local))


def coordination_client() -> Any:
    """The ``jax.distributed`` coordination client (its key-value store), or None when not initialised
    (read from JAX's private state: the public API does not expose it)."""
    from jax._src import distributed as _dist

    return _dist.global_state.client


def is_initialized() -> bool:
    return coordination_client() is not None


def initialize(config: Optional[DistributedConfig] = None, *, auto: bool = False) -> bool:
    """Join the other processes; returns True when running multi-process.

    With nothing configured this is a no-op (one process) unless ``auto=True`` (or the
    environment sets ``JAXINTERP_DISTRIBUTED=auto``, as ``tpu_configs/launch_tpu.sh`` does),
    which lets JAX detect a Cloud TPU slice or a SLURM/Open MPI job by itself.
    """
    config = config_from() if config is None else config
    auto = auto or os.environ.get("JAXINTERP_DISTRIBUTED") == "auto"
    if is_initialized():
        return jax.process_count() > 1
    if config.single_process or (config.num_processes is None and config.coordinator is None and not auto):
        return False
    jax.distributed.initialize(
        coordinator_address=config.coordinator,
        num_processes=config.num_processes,
        process_id=config.process_id,
        local_device_ids=list(config.local_device_ids) if config.local_device_ids is not None else None,
        initialization_timeout=config.timeout_s,
    )
    return jax.process_count() > 1


# ----------------------------------------------------------------------------- data


def process_slice(n: int, process_index: Optional[int] = None, process_count: Optional[int] = None) -> slice:
    """This process's contiguous block of ``n`` rows (blocks differ in size by at most one)."""
    i = jax.process_index() if process_index is None else process_index
    p = jax.process_count() if process_count is None else process_count
    if not 0 <= i < p:
        raise ValueError(f"process_index must lie in [0, {p}), got {i}")
    base, extra = divmod(n, p)
    start = i * base + min(i, extra)
    return slice(start, start + base + (i < extra))


def process_rows(data: Any, process_index: Optional[int] = None, process_count: Optional[int] = None) -> Any:
    """This process's rows of every array in ``data`` (a pytree with a common leading axis)."""
    leaves = jax.tree_util.tree_leaves(data)
    sl = process_slice(len(leaves[0]), process_index, process_count)
    return jax.tree_util.tree_map(lambda x: x[sl], data)


def global_batch(local_rows: np.ndarray, mesh: Mesh, spec: PartitionSpec = PartitionSpec(("data", "fsdp"))) -> jax.Array:
    """A global array from each process's rows (every process passes an equal-sized block).

    The leading axis of ``spec`` must be split over mesh axes whose devices are laid out
    process by process, as ``make_mesh`` does (device order = process order).
    """
    local_rows = np.asarray(local_rows)
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), local_rows)


def place_global(tree: Any, shardings: Any) -> Any:
    """Place host values that every process holds in full (an initial state built from the same
    seed) onto global shardings; each process uploads only its addressable shards."""
    def put(x, sharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree_util.tree_map(put, tree, shardings)


def gather(tree: Any) -> Any:
    """Full host (numpy) copies of global arrays on every process."""
    if jax.process_count() == 1:
        return jax.tree_util.tree_map(np.asarray, tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def host_seed(seed: int) -> int:
    """A per-process seed derived from a global one (for host-side data shuffles/augmentation)."""
    return int(np.random.SeedSequence([seed, jax.process_index()]).generate_state(1)[0])
