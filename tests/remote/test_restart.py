"""A server killed (SIGKILL) with several users' requests queued and restarted on the same port: every
client sees a clean connection error rather than a hang, the client's bounded retry gets every result
(equal to a local run) from the restarted server, and nothing is left queued or running."""

import json
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

pytest.importorskip("fastapi")
import httpx  # noqa: E402

import jaxinterp as ji  # noqa: E402
from tests.remote.tiny import free_port, wait_healthy  # noqa: E402
from jaxinterp.remote.client import Client  # noqa: E402

KEYS = {"alice": "alice-key-0123", "bob": "bob-key-4567"}


def _start(port: int, keys) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "jaxinterp.cli", "serve", "--model", "facts-gpt", "--port",
                             str(port), "--keys", str(keys), "--rate", "1000", "--burst", "1000", "--max-batch", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_healthy(f"http://127.0.0.1:{port}", [proc], 90)
    return proc


def test_server_killed_mid_queue_and_restarted_loses_no_result(tmp_path):
    model = ji.load("facts-gpt")
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps(KEYS))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # distinct shapes: each request compiles its own program, so several wait in the queue at the kill
    requests = [(user, np.arange(3 * t, dtype=np.int32).reshape(3, t) % model.config.vocab_size)
                for t in (3, 4, 5) for user in KEYS]
    want = [np.asarray(model.run(tokens, logits_at=-1).logits) for _, tokens in requests]

    proc = _start(port, keys)
    results: dict = {}
    errors: dict = {}

    def ask(i, user, tokens, retries):
        try:
            with Client(url, KEYS[user], timeout=120, retries=retries, max_wait_s=1.0) as c:
                results[i] = np.asarray(c.run(tokens, logits_at=-1).logits)
        except Exception as e:  # noqa: BLE001 - checked below
            errors[i] = e

    try:
        # first pass, no retry: killed mid-queue, each client gets a prompt connection error (or its answer)
        threads = [threading.Thread(target=ask, args=(i, u, t, 0)) for i, (u, t) in enumerate(requests)]
        for th in threads:
            th.start()
        auth = {"Authorization": f"Bearer {KEYS['alice']}"}
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/status", headers=auth, timeout=30).json()["queue"] < 3:
            assert time.monotonic() < deadline, "requests never queued"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        t0 = time.monotonic()
        for th in threads:
            th.join(timeout=30)
        assert not any(th.is_alive() for th in threads), "a client hangs on a killed server"
        assert time.monotonic() - t0 < 10
        assert len(errors) >= 3 and all(isinstance(e, httpx.TransportError) for e in errors.values()), errors
        for i, got in results.items():  # answered before the kill: the right user's result
            np.testing.assert_allclose(got, want[i], atol=1e-6, rtol=0)

        # second pass: the lost requests again with the client's retry, while the server restarts
        lost, errors = sorted(errors), {}
        threads = [threading.Thread(target=ask, args=(i, *requests[i], 30)) for i in lost]
        for th in threads:
            th.start()
        time.sleep(0.3)  # the clients are already retrying against the closed port
        proc = _start(port, keys)
        for th in threads:
            th.join(timeout=120)
        assert not errors, errors
        assert sorted(results) == list(range(len(requests)))
        for i, got in results.items():
            np.testing.assert_allclose(got, want[i], atol=1e-6, rtol=0, err_msg=str(requests[i][0]))
        s = httpx.get(f"{url}/status", headers=auth, timeout=30).json()
        assert s["queue"] == 0 and s["running"] == 0
        assert all(u["queued"] == 0 for u in s["users"].values())
    finally:
        proc.kill()
        proc.wait(timeout=30)
