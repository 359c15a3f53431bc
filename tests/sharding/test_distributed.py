"""Two local processes with ``jax.distributed`` train an SAE (with an orbax checkpoint and
restart in the middle) and end with the parameters of a one-process run; a patching
experiment with its prompts split over both processes gathers the one-process tables."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp.sharding import distributed

WORKER = Path(__file__).with_name("mp_sae_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_sae_like_one(tmp_path):
    pytest.importorskip("jaxinterp.sae")
    sys.path.insert(0, str(WORKER.parent))
    import mp_sae_worker as worker

    steps = 5
    cfg, state, step = worker.sae_setup(steps)
    xs = worker.data(steps)
    for t in range(steps):
        state, _ = jax.jit(step)(state, jnp.asarray(xs[t]))

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, str(WORKER), "--coordinator", f"127.0.0.1:{port}",
                               "--num-processes", "2", "--process-id", str(i), "--steps", str(steps),
                               "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "params.npz")],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    logs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=400)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        logs.append(out)
    assert all(p.returncode == 0 for p in procs), "\n\n".join(l[-3000:] for l in logs)
    assert (tmp_path / "ckpt" / "2").exists()
    got = np.load(tmp_path / "params.npz")
    assert {f for f in got.files if not f.startswith("patch_")} == set(state.sae.params)
    for name, value in state.sae.params.items():
        np.testing.assert_allclose(got[name], np.asarray(value), atol=1e-5, rtol=0, err_msg=name)
    # the experiment whose prompts were split over the two processes gathers the same tables
    from jaxinterp import sharding as jsh

    ref = worker.patching_run(jsh.make_mesh({"data": 1}, jax.devices()[:1]))
    for key, value in ref.items():
        np.testing.assert_allclose(got[f"patch_{key}"], value, atol=1e-5, rtol=0, err_msg=key)


def test_process_slices_partition_rows():
    for n, p in [(10, 3), (8, 2), (2, 4)]:
        slices = [distributed.process_slice(n, i, p) for i in range(p)]
        covered = np.concatenate([np.arange(n)[s] for s in slices])
        np.testing.assert_array_equal(covered, np.arange(n))
        assert max(s.stop - s.start for s in slices) - min(s.stop - s.start for s in slices) <= 1
    with pytest.raises(ValueError, match="process_index"):
        distributed.process_slice(4, 2, 2)


def test_config_from_flags_env_and_slurm():
    env = {"JAXINTERP_COORDINATOR": "10.0.0.1:1234", "JAXINTERP_NUM_PROCESSES": "4", "JAXINTERP_PROCESS_ID": "3"}
    cfg = distributed.config_from(env=env)
    assert (cfg.coordinator, cfg.num_processes, cfg.process_id) == ("10.0.0.1:1234", 4, 3)
    slurm = {"SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]"}
    cfg = distributed.config_from(env=slurm)
    assert (cfg.num_processes, cfg.process_id) == (2, 1) and cfg.coordinator.endswith(":12355")
    assert cfg.coordinator.startswith("gpu07")
    parser = distributed.add_flags(__import__("argparse").ArgumentParser())
    args = parser.parse_args(["--coordinator", "127.0.0.1:9", "--num-processes", "2", "--process-id", "0"])
    assert distributed.config_from(args, env=env).num_processes == 2
    assert not distributed.initialize(distributed.DistributedConfig())  # nothing configured: one process
    with pytest.raises(ValueError, match="host:port"):
        distributed.DistributedConfig(coordinator="nohost")
    with pytest.raises(ValueError, match="process_id"):
        distributed.DistributedConfig(num_processes=2, process_id=2)
