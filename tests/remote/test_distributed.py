"""``jaxinterp serve`` as a 2-process ``jax.distributed`` job on 127.0.0.1 (2 simulated CPU devices each,
the model sharded over all 4): runs with interventions and captures from two users at once (co-tenant
batching decided on process 0, followed by process 1), a seeded generation and a patching sweep sent
over HTTP to process 0 equal ONE process running the same sharded model (<= 1e-6; an unsharded local
run differs by the order of float sums, <= 1e-5); stopping process 0 stops process 1."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

import jaxinterp as ji  # noqa: E402
from tests.remote.tiny import free_port, wait_healthy  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
import dist_cases  # noqa: E402

KEYS = {"alice": "alice-key-0123", "bob": "bob-key-4567"}
MESH = "data=1,fsdp=2,tensor=2"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two server processes and the one-process reference: ``(url, [process 0, process 1], reference)``."""
    tmp = tmp_path_factory.mktemp("dist")
    (tmp / "keys.json").write_text(json.dumps(KEYS))
    port, coordinator = free_port(), free_port()

    def env(devices):
        return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}

    procs = [subprocess.Popen([sys.executable, "-m", "jaxinterp.cli", "serve", "--model", "facts-gpt", "--port",
                               str(port), "--keys", str(tmp / "keys.json"), "--rate", "1000", "--burst", "1000",
                               "--mesh", MESH, "--coordinator", f"127.0.0.1:{coordinator}", "--num-processes", "2",
                               "--process-id", str(i)],
                              env=env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    ref = subprocess.Popen([sys.executable, dist_cases.__file__, str(tmp / "ref.npz"), MESH], env=env(4),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, procs, 120, "the distributed server")
        assert ref.wait(timeout=120) == 0, ref.stdout.read()[-3000:]
        yield url, procs, dict(np.load(tmp / "ref.npz"))
    finally:
        for p in [*procs, ref]:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)


def test_two_process_server_equals_one_process(cluster):
    url, procs, reference = cluster
    model = ji.load("facts-gpt")
    tokens, runs, gen, (corrupt, metric, sweep) = dist_cases.cases(model)
    got, errors = {}, []

    def ask(name):
        try:
            with ji.remote.connect(url, key=KEYS[name.rstrip("2")]) as remote:
                r = remote.run(tokens, **runs[name])
            got[f"run/{name}/logits"] = r.logits
            got.update({f"run/{name}/{site}": r.cache[site] for site in r.cache})
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(name,)) for name in runs]  # at once: co-tenant batching
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not errors, errors
    with ji.remote.connect(url, key=KEYS["bob"]) as remote:
        g = remote.generate(dist_cases.GEN_PROMPT, **gen)
        got["gen/tokens"], got["gen/cache"] = g.tokens, g.cache["blocks.1.resid_post"]
        got["sweep"] = remote.sweep(tokens, corrupt, [dist_cases.SWEEP_SITE], metric, **sweep).effects[
            dist_cases.SWEEP_SITE]
        status = remote.status()
    assert status["queue"] == 0 and status["users"]["alice"]["requests"] == 2

    local = dist_cases.results(model)  # unsharded, this process
    assert set(got) == set(reference) == set(local)
    for key in reference:
        np.testing.assert_allclose(np.asarray(got[key]), reference[key], atol=1e-6, rtol=0, err_msg=key)
        np.testing.assert_allclose(np.asarray(got[key]), local[key], atol=1e-5, rtol=0, err_msg=key)

    procs[0].terminate()  # process 0 stops: it tells process 1 to exit
    logs = [p.communicate(timeout=60)[0] for p in procs]
    assert procs[1].returncode == 0, logs[1][:4000]
    assert "2 processes, 4 devices" in logs[0] and "process 0 stopped" in logs[1], logs
