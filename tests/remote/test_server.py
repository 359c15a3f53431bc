"""The server in-process (FastAPI's TestClient) on facts-gpt: remote runs equal local ones; keys are
checked; bad input gets a 4xx naming the problem and the server keeps answering."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

import jaxinterp as ji  # noqa: E402
from jaxinterp.remote import WireError, encode, export_fn  # noqa: E402
from jaxinterp.remote.client import Client, RemoteError  # noqa: E402
from jaxinterp.remote.server import ServeConfig, create_app  # noqa: E402

KEYS = {"alice": "alice-key-0123", "bob": "bob-key-4567"}
T = 7


@pytest.fixture(scope="module")
def model():
    return ji.load("facts-gpt")


@pytest.fixture(scope="module")
def http(model):
    with TestClient(create_app(model, KEYS, ServeConfig(max_request_bytes=1 << 20))) as client:
        yield client


@pytest.fixture(scope="module")
def remote(http):
    return Client("http://testserver", KEYS["alice"], http=http)


@pytest.fixture(scope="module")
def tokens(model):
    return jnp.asarray(np.random.default_rng(0).integers(0, model.config.vocab_size, size=(2, T)), jnp.int32)


def test_health_needs_no_key_and_everything_else_does(http, model, remote):
    assert http.get("/health").json() == {"ok": True}
    assert http.get("/info").status_code == 401
    assert http.get("/info", headers={"Authorization": "Bearer wrong-key-000"}).status_code == 401
    assert http.post("/run", content=b"x", headers={"Authorization": KEYS["bob"]}).status_code == 401  # no scheme
    assert remote.sites == model.sites and remote.config["d_model"] == model.config.d_model


def test_remote_run_equals_local(model, remote, tokens):
    d, h = model.config.d_model, model.config.n_heads
    rng = np.random.default_rng(1)
    donor = model.run(tokens[::-1], capture="blocks.1.resid_post").cache["blocks.1.resid_post"]
    ivs = {
        "blocks.1.resid_post": ji.Patch(donor, ji.positions_mask(T, [2, 4], batch=2)),
        "blocks.2.attn.z": ji.ZeroAblate(ji.heads_mask(T, h, [0, 3], batch=2)),
        "blocks.*.mlp_out": [ji.Scale(0.5), ji.Add(jnp.asarray(rng.normal(size=d), jnp.float32))],
        "blocks.0.resid_post": ji.Compose((ji.ProjectOut(jnp.asarray(rng.normal(size=(2, d)), jnp.float32)),
                                           export_fn(lambda x: x * 1.5 + jnp.tanh(x), ("b", "t", d)))),
    }
    capture = ["blocks.*.resid_post", "blocks.3.attn.pattern"]
    want = model.run(tokens, capture=capture, interventions=ivs)
    got = remote.run(tokens, capture=capture, interventions=ivs)
    assert set(got.cache) == set(want.cache) and len(got.cache) == model.config.n_layers + 1
    np.testing.assert_allclose(got.logits, want.logits, atol=1e-6, rtol=0)
    for site in want.cache:
        np.testing.assert_allclose(got.cache[site], want.cache[site], atol=1e-6, rtol=0)
    assert not np.allclose(want.logits, model.run(tokens).logits)


def test_remote_text_run_equals_local(model, remote):
    texts = ["alice lives in", "the capital of"]
    want = model.run(texts, logits_at=-1)
    got = remote.run(texts, logits_at=-1)
    assert got.logits.shape == (2, model.config.vocab_size)
    np.testing.assert_allclose(got.logits, want.logits, atol=1e-6, rtol=0)


def _post(http, body, key=KEYS["bob"]):
    return http.post("/run", content=body, headers={"Authorization": f"Bearer {key}"})


def test_bad_requests_get_4xx_naming_the_problem(http, remote, tokens, model):
    with pytest.raises(RemoteError, match="blocks.9.resid_post") as err:
        remote.run(tokens, interventions={"blocks.9.resid_post": ji.ZeroAblate()})
    assert err.value.status == 422
    with pytest.raises(RemoteError, match="shape") as err:
        remote.run(tokens, interventions={"blocks.0.resid_post": ji.Patch(jnp.zeros((3, 5), jnp.float32))})
    assert err.value.status == 422
    with pytest.raises(WireError, match="export_fn"):  # refused before it leaves the client
        remote.run(tokens, interventions={"embed": ji.Fn(lambda x: x)})
    cases = {
        b"": 400, b"\x80\x04\x95pickle": 400, encode({"tokens": tokens})[:-3]: 400,
        encode({"tokens": tokens, "oops": 1}): 422, encode([1, 2]): 422, encode({"tokens": 5}): 422,
        encode({"tokens": np.zeros((2, 3), np.float32) + 1e9}): 422,
        encode({"tokens": np.full((1, 3), 10**6, np.int32)}): 422,  # out-of-vocabulary ids
        encode({"tokens": tokens, "capture": 5}): 422,
        encode({"tokens": tokens, "interventions": "rm -rf /"}): 422,
        b"\0" * (2 << 20): 413,
    }
    for body, status in cases.items():
        r = _post(http, body)
        assert r.status_code == status, (body[:40], r.status_code, r.text[:300])
        assert r.json()["detail"]
    assert http.get("/health").status_code == 200
    np.testing.assert_allclose(remote.run(tokens).logits, model.run(tokens).logits, atol=1e-6, rtol=0)


def test_host_callback_module_refused_by_server(http, tokens):
    from tests.remote.test_wire import _host_callback_module

    exported = _host_callback_module()
    fn = ji.Fn(ji.remote.ExportedFn(exported, exported.serialize()))
    r = _post(http, encode({"tokens": tokens, "interventions": {"embed": fn}}))
    assert r.status_code == 400 and "xla_ffi_python_cpu_callback" in r.json()["detail"]


def test_cli_serve_bad_keys_file_is_one_line_error(tmp_path):
    bad = tmp_path / "keys.json"
    bad.write_text(json.dumps({"alice": "short"}))
    for keys in (tmp_path / "missing.json", bad):
        p = subprocess.run([sys.executable, "-m", "jaxinterp.cli", "serve", "--model", "facts-gpt", "--keys", str(keys)],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and "keys file" in p.stderr, p.stderr
