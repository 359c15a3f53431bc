"""A tiny random GPT-2 for the server tests, built from its abstract params (no compiled init), once per process;
and ``rewrite_header``, which edits the JSON header of an encoded request (hostile-payload tests)."""

import functools
import json
import struct

import jax
import jax.numpy as jnp
import numpy as np

import jaxinterp as ji
from jaxinterp.models.gpt2 import GPT2Config

CFG = GPT2Config.tiny(vocab_size=31, d_model=16, n_layers=2, n_heads=2, d_mlp=32, max_seq_len=8)


@functools.cache
def tiny_model() -> ji.Model:
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda s: jnp.asarray(rng.normal(size=s.shape) * 0.2, s.dtype),
                                    ji.model.abstract_params(CFG))
    return ji.Model(params, CFG, "gpt2")


def rewrite_header(blob: bytes, edit) -> bytes:
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + blob[8 + n:]


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, procs, timeout: float, what: str = "server") -> None:
    """Poll ``url``/health until it answers 200; fail at once if one of ``procs`` exits (with the end of
    its output when piped) and after ``timeout`` seconds."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while True:
        dead = [p for p in procs if p.poll() is not None]
        assert not dead, [f"{what} exited"] + [p.stdout.read()[-3000:] for p in dead if p.stdout is not None]
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"{what} did not come up"
        time.sleep(0.1)
