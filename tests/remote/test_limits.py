"""Limits and hostile input on an in-process server (a tiny random GPT-2, no tokenizer): rate limit (429 +
Retry-After, fake clock), request / capture / response size limits, time limit (504), and a fuzz of 200+
malformed or hostile payloads that gets only 4xx answers from a server that keeps answering."""

import json
import pickle
import struct

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

import jaxinterp as ji  # noqa: E402
from jaxinterp.remote import encode  # noqa: E402
from jaxinterp.remote.server import ServeConfig, create_app  # noqa: E402
from tests.remote.tiny import CFG, rewrite_header, tiny_model  # noqa: E402

KEYS = {"alice": "alice-key-0123", "eve": "eve-key-666666"}
AUTH = {"Authorization": f"Bearer {KEYS['eve']}"}
B, T, D = 2, 6, 16


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, CFG.vocab_size, size=(B, T)).astype(np.int32)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_rate_and_size_limits(model, tokens):
    clock = Clock()
    cfg = ServeConfig(rate=1.0, burst=4, max_request_bytes=4096, max_capture_bytes=2000, max_response_bytes=1000)
    with TestClient(create_app(model, KEYS, cfg, clock=clock)) as http:
        post = lambda body, user="eve": http.post(  # noqa: E731
            "/run", content=body, headers={"Authorization": f"Bearer {KEYS[user]}"})
        r = post(encode({"tokens": tokens, "capture": "all"}))
        assert r.status_code == 413 and "captured sites take" in r.json()["detail"]
        r = post(encode({"tokens": tokens}))  # logits [2, 6, 31] f32 = 1488 bytes > 1000
        assert r.status_code == 413 and "the result has" in r.json()["detail"]
        r = post(b"\0" * 5000)
        assert r.status_code == 413 and "4096" in r.json()["detail"]
        r = post(encode({"tokens": tokens, "logits_at": -1}))  # [2, 31] fits
        assert r.status_code == 200
        for _ in range(3):  # the bucket (4) is empty: 429 with Retry-After, until a second passes
            r = post(encode({"tokens": tokens, "logits_at": -1}))
            assert r.status_code == 429 and r.headers["Retry-After"] == "1" and "rate limit" in r.json()["detail"]
        assert post(encode({"tokens": tokens, "logits_at": -1}), user="alice").status_code == 200  # per user
        clock.now += 1.0
        assert post(encode({"tokens": tokens, "logits_at": -1})).status_code == 200
        usage = http.get("/status", headers=AUTH).json()["users"]
        assert usage["eve"]["rate_limited"] == 3 and usage["eve"]["requests"] == 2 and usage["eve"]["refused"] == 3
        assert usage["alice"]["requests"] == 1


def test_time_limit_answers_504_and_the_server_goes_on(model, tokens):
    with TestClient(create_app(model, KEYS, ServeConfig(timeout_s=1e-4))) as http:
        r = http.post("/run", content=encode({"tokens": tokens}), headers=AUTH)  # compiling takes far longer
        assert r.status_code == 504 and "time limit" in r.json()["detail"]
        assert http.get("/health").json() == {"ok": True}
        assert http.get("/status", headers=AUTH).json()["users"]["eve"]["timeouts"] == 1


def _set_structure(structure):
    def edit(header):
        header["__metadata__"]["structure"] = structure if isinstance(structure, str) else json.dumps(structure)
    return edit


def _payloads(tokens, seed: int = 0) -> list[tuple[str, str, bytes]]:
    """(category, endpoint, body): every one malformed or hostile by construction."""
    rng = np.random.default_rng(seed)
    good = encode({"tokens": tokens, "capture": ["blocks.0.resid_post"],
                   "interventions": {"blocks.1.resid_post": [ji.Add(np.ones(D, np.float32)), ji.Scale(2.0)]}})
    (n,) = struct.unpack("<Q", good[:8])
    out = []
    for cut in rng.integers(0, len(good) - 1, size=60):  # truncated safetensors
        out.append(("truncated", str(rng.choice(["/run", "/generate", "/sweep"])), good[:int(cut)]))
    for _ in range(20):  # huge declared header length
        blob = bytearray(good)
        blob[int(rng.integers(3, 8))] = int(rng.integers(1, 256))
        out.append(("header_length", "/run", bytes(blob)))
    for _ in range(20):  # huge declared tensor sizes / offsets
        big = int(rng.integers(30, 62))
        edit = [lambda h: h["t0"].update(shape=[1 << big, 1 << big]),
                lambda h: h["t0"].update(data_offsets=[0, 1 << big]),
                lambda h: h["t1"].update(shape=[1 << big]),
                lambda h: h["t0"].update(shape=[-(1 << big), 3])][int(rng.integers(0, 4))]
        out.append(("huge_sizes", "/run", rewrite_header(good, edit)))
    for _ in range(20):  # wrong dtypes: float / bool / out-of-int32 tokens, a non-0/1 mask
        dtype = [np.float32, np.float16, np.bool_, np.int64][int(rng.integers(0, 4))]
        bad = tokens.astype(np.int64) * (1 << 40) if dtype == np.int64 else tokens.astype(dtype)
        body = [{"tokens": bad}, {"tokens": tokens, "attention_mask": np.full((B, T), 3, np.uint8)},
                {"tokens": tokens, "attention_mask": np.full((B, T), 0.5, np.float32)}][int(rng.integers(0, 3))]
        out.append(("dtype", "/run", encode(body)))
    for _ in range(20):  # wrong shapes
        shape = tuple(int(s) for s in rng.integers(1, 5, size=int(rng.integers(1, 4))))
        which = int(rng.integers(0, 4))
        body = [{"tokens": np.zeros(shape, np.int32)} if len(shape) != 2 else {"tokens": np.zeros((1, 9), np.int32)},
                {"tokens": tokens, "interventions": {"blocks.0.resid_post": ji.Patch(np.ones((3, 5, 7), np.float32))}},
                {"tokens": tokens, "attention_mask": np.ones(shape + (7,), bool)},
                {"tokens": tokens, "logits_at": np.zeros((B + 1,), np.int32)}][which]
        out.append(("shape", "/run", encode(body)))
    names = ["blocks.9.resid_post", "../../etc/passwd", "/etc/shadow", "blocks.0.nothing", "embedd", "*.x", ""]
    for i in range(20):  # unknown sites
        name = names[i % len(names)] + ("" if i < len(names) else f".{i}")
        body = [{"tokens": tokens, "capture": name}, {"tokens": tokens, "interventions": {name: ji.ZeroAblate()}}][i % 2]
        out.append(("site", "/run", encode(body)))
    for depth in rng.integers(40, 20000, size=15):  # deep JSON (the structure, and the header itself)
        deep = '{"list": [' * int(depth) + "1" + "]}" * int(depth)
        out.append(("deep", "/run", rewrite_header(good, _set_structure(deep))))
        text = b'{"a":' * int(depth) + b"1" + b"}" * int(depth)
        out.append(("deep", "/run", struct.pack("<Q", len(text)) + text))
    objs = [{"tokens": tokens}, [1, 2], "x", np.ones(3), ji.Add(np.ones(D, np.float32))]
    for i in range(15):  # pickles
        out.append(("pickle", "/run", pickle.dumps(objs[i % len(objs)], protocol=i % 6)))
    paths = ["/etc/passwd", "../../../etc/passwd", "file:///etc/passwd", "~/.ssh/id_rsa"]
    for i in range(16):  # paths outside the server: as text (no tokenizer), as a field, as a tensor or module name
        p = paths[i % 4]
        out.append(("path", "/run", [
            encode({"tokens": p}), encode({"tokens": tokens, "load": p}),
            rewrite_header(good, _set_structure({"dict": {"tokens": {"array": p}}})),
            rewrite_header(good, _set_structure({"iv": "Fn", "module": p}))][i // 4]))
    gen = [{"prompts": [[1, 2, 3]], "max_new_tokens": 10**9}, {"prompts": [[1, 2, 3]], "max_new_tokens": -1},
           {"prompts": [[1, 2, 3]], "max_new_tokens": True}, {"prompts": "text, no tokenizer", "max_new_tokens": 2},
           {"prompts": [[1, 99]], "max_new_tokens": 2}, {"prompts": [["a"]], "max_new_tokens": 2},
           {"prompts": [[1, 2]], "max_new_tokens": 2, "temperature": -1.0},
           {"prompts": [[1, 2]], "max_new_tokens": 7}, {"prompts": [[1, 2]]}, {"max_new_tokens": 2}]
    for body in gen:
        out.append(("generate", "/generate", encode(body)))
    sweeps = [{"clean_tokens": tokens, "corrupt_tokens": tokens, "sites": "embed", "metric": "lambda x: x"},
              {"clean_tokens": tokens, "corrupt_tokens": tokens, "sites": "embed",
               "metric": ji.remote.ExportedFn.__new__(ji.remote.ExportedFn)} if False else
              {"clean_tokens": tokens, "corrupt_tokens": tokens[:1], "sites": "embed", "metric": 3},
              {"clean_tokens": tokens.astype(np.float32), "corrupt_tokens": tokens, "sites": "embed", "metric": 1},
              {"clean_tokens": tokens, "corrupt_tokens": tokens, "sites": 5, "metric": 1},
              {"clean_tokens": tokens, "corrupt_tokens": tokens, "sites": "embed", "metric": 1, "chunk": 0}]
    for body in sweeps:
        out.append(("sweep", "/sweep", encode(body)))
    metric_module = rewrite_header(encode({"clean_tokens": tokens, "corrupt_tokens": tokens, "sites": "embed",
                                            "metric": np.frombuffer(b"\x01" * 64, np.uint8)}),
                                    _set_structure({"dict": {"clean_tokens": {"array": "t0"},
                                                             "corrupt_tokens": {"array": "t1"}, "sites": "embed",
                                                             "metric": {"exported": "t2"}}}))
    out.append(("sweep", "/sweep", metric_module))
    return out


def test_fuzz_gets_only_4xx_and_the_server_keeps_answering(model, tokens):
    payloads = _payloads(tokens)
    assert len(payloads) >= 200
    statuses = {}
    with TestClient(create_app(model, KEYS, ServeConfig(rate=1e6, burst=10**6)), raise_server_exceptions=False) as http:
        for category, endpoint, body in payloads:
            r = http.post(endpoint, content=body, headers=AUTH)
            assert 400 <= r.status_code < 500 and r.status_code not in (401, 429), (category, r.status_code, r.text[:300])
            assert r.json()["detail"], (category, r.text[:300])
            statuses.setdefault(category, set()).add(r.status_code)
        assert http.get("/health").json() == {"ok": True}
        r = http.post("/run", content=encode({"tokens": tokens, "logits_at": -1}), headers=AUTH)
        assert r.status_code == 200
    assert statuses["truncated"] == {400} and statuses["pickle"] == {400} and 422 in statuses["site"]


class _Flaky:
    """An httpx.Client stand-in: a lost connection, a 503 (server restarting), then the answer."""

    def __init__(self, answer: bytes):
        import httpx

        self.answers = [httpx.ConnectError("connection refused"),
                        httpx.Response(503, headers={"Retry-After": "0"}, json={"detail": "shutting down; retry"}),
                        httpx.Response(200, content=answer)]
        self.calls = 0

    def post(self, path, content, headers):
        self.calls += 1
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


def test_client_retries_a_restarting_server(monkeypatch):
    from jaxinterp.remote import client

    monkeypatch.setattr(client.time, "sleep", lambda s: None)
    logits = np.arange(6, dtype=np.float32).reshape(2, 3)
    http = _Flaky(encode({"logits": logits, "cache": {}}))
    out = client.Client("http://x", KEYS["eve"], http=http, retries=2).run(np.zeros((2, 3), np.int32))
    np.testing.assert_array_equal(out.logits, logits)
    assert http.calls == 3
    http = _Flaky(b"")
    with pytest.raises(client.RemoteError) as err:  # out of retries: the 503 is reported, not swallowed
        client.Client("http://x", KEYS["eve"], http=http, retries=1).run(np.zeros((2, 3), np.int32))
    assert err.value.status == 503 and "retry" in str(err.value)
