"""Load on ``jaxinterp serve``: concurrent clients with mixed interventions, co-tenant batching vs none.

Starts the server twice in a subprocess on 127.0.0.1 (``--max-batch 1``: every request alone;
``--max-batch N``: requests of several users with one structure run as one vmapped program), and
runs ``--clients`` threads, each sending ``--requests`` ``run`` requests over HTTP: a ``[--batch,
--seq]`` token batch of facts-gpt with one of four intervention structures (Add a vector, zero-ablate heads, patch
positions, steer; one site each), values drawn per request, logits at the last position, plus one
captured site for the first two kinds. A warm-up round (``--warmup`` requests per client, untimed, compile time included) comes
first, then the server's background compiles are awaited (``compile_wait_s``). JSON: per mode the failed requests, throughput (requests/s), p50/p99 latency, the server's
RSS before the warm-up, after it and after the load; the throughput ratio batched / alone; and the
server's execution alone (no HTTP) per kind: ``--max-batch`` requests one by one vs as one group.

    nice -n 10 .venv/bin/python benchmarks/serve_load.py                      # 16 clients x 50 requests
    nice -n 10 .venv/bin/python benchmarks/serve_load.py --clients 4 --requests 10 --warmup 10
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import httpx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxinterp as ji  # noqa: E402

KINDS = ("add", "ablate", "patch", "steer")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _request(rng, kind: str, cfg, capture: bool, b: int, t: int) -> dict:
    d, h = cfg["d_model"], cfg["n_heads"]
    f32 = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    layer = KINDS.index(kind) % cfg["n_layers"]  # four structures in all, values drawn per request
    ivs = {"add": {f"blocks.{layer}.resid_post": ji.Add(f32(d))},
           "ablate": {f"blocks.{layer}.attn.z": ji.ZeroAblate(jnp.asarray(rng.random((b, t, h)) < 0.3))},
           "patch": {f"blocks.{layer}.resid_pre": ji.Patch(f32(b, t, d), jnp.asarray(rng.random((b, t)) < 0.3))},
           "steer": {f"blocks.{layer}.resid_post": ji.Steer(f32(d), jnp.float32(rng.uniform(1, 4)))}}[kind]
    return {"tokens": rng.integers(1, cfg["vocab_size"], size=(b, t)).astype(np.int32), "interventions": ivs,
            "logits_at": -1, "capture": "blocks.1.mlp_out" if capture else None}


def _client(url: str, key: str, cfg, n: int, seed: int, latencies: list, failures: list, b: int, t: int) -> None:
    rng = np.random.default_rng(seed)
    kinds = [KINDS[(seed + i) % len(KINDS)] for i in range(n)]
    requests = [_request(rng, kind, cfg, kind in ("add", "patch"), b, t) for kind in kinds]
    with ji.remote.connect(url, key=key, timeout=600) as remote:
        for r in requests:
            t0 = time.perf_counter()
            try:
                out = remote.run(r["tokens"], capture=r["capture"], interventions=r["interventions"],
                                 logits_at=r["logits_at"])
                assert out.logits.shape == (b, cfg["vocab_size"])
            except Exception as e:  # noqa: BLE001 - counted and reported
                failures.append(f"{type(e).__name__}: {str(e)[:200]}")
            latencies.append(time.perf_counter() - t0)


def _phase(url, keys, cfg, clients: int, n: int, seed: int, b: int, t: int) -> dict:
    latencies, failures, threads = [], [], []
    users = list(keys)
    t0 = time.perf_counter()
    for c in range(clients):
        th = threading.Thread(target=_client, args=(url, keys[users[c]], cfg, n, seed + c, latencies, failures, b, t))
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    lat = np.asarray(latencies)
    return {"requests": len(latencies), "failed": len(failures), "failures": failures[:5], "wall_s": round(wall, 2),
            "throughput_rps": round(len(latencies) / wall, 2), "p50_ms": round(float(np.percentile(lat, 50)) * 1e3, 1),
            "p99_ms": round(float(np.percentile(lat, 99)) * 1e3, 1)}


def _mode(args, max_batch: int, keys_path: Path, keys: dict) -> dict:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "jaxinterp.cli", "serve", "--model", args.model, "--port", str(port),
                             "--keys", str(keys_path), "--rate", "1e6", "--burst", "1000000", "--max-batch",
                             str(max_batch)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited: {proc.stdout.read()[-2000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not come up in 180 s")
            time.sleep(0.2)
        cfg = httpx.get(f"{url}/info", headers={"Authorization": f"Bearer {keys['user0']}"}).json()["config"]
        rss_start = _rss_mb(proc.pid)
        warm = _phase(url, keys, cfg, args.clients, args.warmup, 10_000, args.batch, args.seq)
        auth = {"Authorization": f"Bearer {keys['user0']}"}
        t0 = time.perf_counter()
        while httpx.get(f"{url}/status", headers=auth).json().get("compiling"):  # background compiles finish
            if time.perf_counter() - t0 > 600:
                raise RuntimeError("the server's background compiles did not finish in 600 s")
            time.sleep(0.5)
        warm["compile_wait_s"] = round(time.perf_counter() - t0, 2)
        rss_warm = _rss_mb(proc.pid)
        before = httpx.get(f"{url}/status", headers=auth).json()["programs"]
        load = _phase(url, keys, cfg, args.clients, args.requests, 0, args.batch, args.seq)
        rss_end = _rss_mb(proc.pid)
        status = httpx.get(f"{url}/status", headers=auth).json()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return {"max_batch": max_batch, **load, "warmup": {k: warm[k] for k in ("requests", "failed", "wall_s", "compile_wait_s")},
            "rss_mb": {"start": round(rss_start, 1), "after_warmup": round(rss_warm, 1), "after_load": round(rss_end, 1),
                       "growth_during_load": round(rss_end / rss_warm - 1, 4)},
            "groups_by_size": status["batches"], "programs": status["programs"],
            "compiles_during_load": status["programs"]["misses"] - before["misses"]}


def _compute_only(args) -> dict:
    """The server's execution alone (no HTTP, no client), in this process: per kind, ``max_batch`` requests
    run one by one vs as one group (best of 3, after compiling), milliseconds."""
    import dataclasses

    from jaxinterp.remote.server import ServeConfig, Service

    model = ji.load(args.model)
    cfg = dataclasses.asdict(model.config)
    service = Service(model, {"u": "bench-key-0000"},
                      ServeConfig(max_batch=args.max_batch, compile_in_background=False), args.model)
    rng = np.random.default_rng(0)
    out = {}
    try:
        for kind in KINDS:
            jobs = [service.run_job("u", _request(rng, kind, cfg, kind in ("add", "patch"), args.batch, args.seq))
                    for _ in range(args.max_batch)]
            jobs[0].work(), jobs[0].batch_work(jobs)
            alone = group = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                for job in jobs:
                    job.work()
                alone = min(alone, time.perf_counter() - t0)
                t0 = time.perf_counter()
                jobs[0].batch_work(jobs)
                group = min(group, time.perf_counter() - t0)
            out[kind] = {"alone_ms": round(alone * 1e3, 1), "group_ms": round(group * 1e3, 1),
                         "ratio": round(alone / group, 2)}
    finally:
        service.close()
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="facts-gpt")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=50, help="timed requests per client")
    p.add_argument("--warmup", type=int, default=50, help="untimed requests per client first (compiles every "
                                                           "structure x group size)")
    p.add_argument("--batch", type=int, default=4, help="rows per request")
    p.add_argument("--seq", type=int, default=24, help="tokens per row")
    p.add_argument("--max-batch", type=int, default=8, help="co-tenant group size of the batched mode")
    args = p.parse_args(argv)
    keys = {f"user{i}": f"key-{i:04d}-serve-load" for i in range(args.clients)}
    with tempfile.TemporaryDirectory() as tmp:
        keys_path = Path(tmp) / "keys.json"
        keys_path.write_text(json.dumps(keys))
        alone = _mode(args, 1, keys_path, keys)
        batched = _mode(args, args.max_batch, keys_path, keys)
    out = {"model": args.model, "clients": args.clients, "requests_per_client": args.requests,
           "request_tokens": [args.batch, args.seq], "alone": alone,
           "batched": batched, "throughput_ratio_batched_vs_alone": round(
               batched["throughput_rps"] / alone["throughput_rps"], 3),
           "compute_only_group_vs_alone": _compute_only(args), "load_average": os.getloadavg()}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
