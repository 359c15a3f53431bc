"""The server in-process (FastAPI's TestClient) on facts-gpt: remote runs equal local ones; keys are
checked; bad input gets a 4xx naming the problem and the server keeps answering."""

import io
import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

import jaxinterp as ji  # noqa: E402
from tests.remote.tiny import free_port, wait_healthy  # noqa: E402
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


_PLAIN = {}


def _plain(model, tokens):
    """The local logits without interventions (computed once)."""
    if "logits" not in _PLAIN:
        _PLAIN["logits"] = model.run(tokens).logits
    return _PLAIN["logits"]


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
    # The local reference runs jitted too (the eager run takes seconds); the server's program is its own.
    want = jax.jit(lambda m, t, i: m.run(t, capture=capture, interventions=i))(model, tokens, ivs)
    got = remote.run(tokens, capture=capture, interventions=ivs)
    assert set(got.cache) == set(want.cache) and len(got.cache) == model.config.n_layers + 1
    np.testing.assert_allclose(got.logits, want.logits, atol=1e-6, rtol=0)
    for site in want.cache:
        np.testing.assert_allclose(got.cache[site], want.cache[site], atol=1e-6, rtol=0)
    assert not np.allclose(want.logits, _plain(model, tokens))


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
    np.testing.assert_allclose(remote.run(tokens).logits, _plain(model, tokens), atol=1e-6, rtol=0)
    served = http.get("/status", headers={"Authorization": f"Bearer {KEYS['bob']}"}).json()["requests"]
    assert served["bob"] == 0 and served["alice"] >= 1  # refused requests are not counted


def test_host_callback_module_refused_by_server(http, tokens):
    from tests.remote.test_wire import _host_callback_module

    exported = _host_callback_module()
    fn = ji.Fn(ji.remote.ExportedFn(exported, exported.serialize()))
    r = _post(http, encode({"tokens": tokens, "interventions": {"embed": fn}}))
    assert r.status_code == 400 and "xla_ffi_python_cpu_callback" in r.json()["detail"]


def test_cli_serve_bad_input_is_one_line_error(tmp_path, capsys):
    from jaxinterp.cli import main

    bad = tmp_path / "keys.json"
    bad.write_text(json.dumps({"alice": "short"}))
    for keys, what in ((tmp_path / "missing.json", "does not exist"), (bad, "at least 8 characters")):
        assert main(["serve", "--model", "facts-gpt", "--keys", str(keys)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and what in err, err
    bad.write_text(json.dumps(KEYS))
    assert main(["serve", "--model", "no-such-model", "--keys", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no-such-model" in err, err
    for mesh, what in (("data=1,pipeline=2", "valid axes"), ("tensor=two", "axis=size"), ("data=64", "devices")):
        assert main(["serve", "--model", "facts-gpt", "--keys", str(bad), "--mesh", mesh]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and what in err, err


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`jaxinterp serve --model facts-gpt` in a subprocess on 127.0.0.1: ``(url, process)``."""
    import time

    import httpx

    keys = tmp_path_factory.mktemp("serve") / "keys.json"
    keys.write_text(json.dumps(KEYS))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "jaxinterp.cli", "serve", "--model", "facts-gpt", "--port", str(port),
                             "--keys", str(keys), "--rate", "1000", "--burst", "1000"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, [proc], 90)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_cli_serves_a_real_server_on_localhost(served, model):
    """`jaxinterp serve` in a subprocess: a client over real HTTP gets the local result; keys never logged."""
    url, proc = served
    with ji.remote.connect(url, key=KEYS["bob"]) as remote:
        v = jnp.asarray(np.random.default_rng(2).normal(size=model.config.d_model), jnp.float32)
        ivs = {"blocks.2.resid_post": ji.Add(v)}
        got = remote.run(["bob works at"], capture="blocks.3.mlp_out", interventions=ivs, logits_at=-1)
        want = model.run(["bob works at"], capture="blocks.3.mlp_out", interventions=ivs, logits_at=-1)
        np.testing.assert_allclose(got.logits, want.logits, atol=1e-6, rtol=0)
        np.testing.assert_allclose(got.cache["blocks.3.mlp_out"], want.cache["blocks.3.mlp_out"], atol=1e-6, rtol=0)
        with pytest.raises(RemoteError) as err:
            ji.remote.connect(url, key="not-a-key-000").info()
        assert err.value.status == 401


def test_remote_generate_equals_local(served, model):
    """Sampling (seeded) with a steering vector and a head ablation, captured sites: the same Generation."""
    from jaxinterp.generate import Generation, prompt_batch

    url, _ = served
    d, h = model.config.d_model, model.config.n_heads
    v = jnp.asarray(np.random.default_rng(3).normal(size=d), jnp.float32)
    prompts = ["alice works at", "the capital of"]
    width = prompt_batch(model, prompts)[0].shape[1] + 5
    kwargs = dict(max_new_tokens=5, temperature=0.8, top_k=20, seed=7,
                  capture=["blocks.1.resid_post", "blocks.2.attn.pattern"],
                  interventions={"blocks.1.resid_post": ji.Steer(v, jnp.float32(3.0), where="generated"),
                                 "blocks.0.attn.z": ji.ZeroAblate(ji.heads_mask(width, h, [1], batch=2))})
    with ji.remote.connect(url, key=KEYS["alice"]) as remote:
        got = remote.generate(prompts, **kwargs)
    want = ji.generate(model, prompts, **kwargs)
    assert isinstance(got, Generation)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.sequences, want.sequences)
    np.testing.assert_array_equal(got.attention_mask, want.attention_mask)
    np.testing.assert_array_equal(got.lengths, want.lengths)
    assert got.text == want.text and got.steps == want.steps and list(got.cache) == list(want.cache)
    for site in want.cache:
        np.testing.assert_allclose(got.cache[site], want.cache[site], atol=1e-6, rtol=0)


def _logit_diff(logits, answers, wrong):
    rows = jnp.arange(logits.shape[0])
    return jnp.mean(logits[rows, answers] - logits[rows, wrong])


def test_remote_sweep_equals_local(served, model):
    from jaxinterp.patching import PatchingResult, activation_patching

    url, _ = served
    clean, mask = model.to_tokens(["alice works at", "bob lives in"])
    corrupt = np.asarray(clean).copy()
    corrupt[:, 1] = (corrupt[:, 1] + 5) % model.config.vocab_size
    answers, wrong = jnp.asarray([5, 9], jnp.int32), jnp.asarray([11, 3], jnp.int32)
    sites = ["blocks.1.resid_pre", "blocks.2.attn.z"]
    kwargs = dict(per="position", metric_args=(answers, wrong), attention_mask=mask, chunk=2,
                  corrupt_interventions={"embed": ji.Scale(1.01)})
    with ji.remote.connect(url, key=KEYS["alice"]) as remote:
        got = remote.sweep(clean, corrupt, sites, _logit_diff, **kwargs)
    want = activation_patching(model, clean, corrupt, sites, _logit_diff, **kwargs)
    assert isinstance(got, PatchingResult) and got.per == "position" and list(got.effects) == sites
    for site in sites:
        assert got.effects[site].shape == (clean.shape[1],)
        np.testing.assert_allclose(got.effects[site], want.effects[site], atol=1e-6, rtol=0)
    assert abs(got.clean - want.clean) <= 1e-6 and abs(got.corrupt - want.corrupt) <= 1e-6
    assert np.ptp(want.effects["blocks.1.resid_pre"]) > 0.1  # the corrupted position matters


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install -y chromium)")
def test_status_page_in_headless_chromium(served, tmp_path):
    """The HTML status page (HTTP Basic user:key, as a browser sends it) shows the model, the queue and usage."""
    sync_api = pytest.importorskip("playwright.sync_api")
    url, _ = served
    with ji.remote.connect(url, key=KEYS["bob"]) as remote:
        remote.run(np.ones((1, 3), np.int32), logits_at=-1)
        want = remote.status()
    assert want["models"][0]["name"] == "facts-gpt" and want["users"]["bob"]["requests"] >= 1
    errors = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        context = browser.new_context(viewport={"width": 1000, "height": 700},
                                      http_credentials={"username": "bob", "password": KEYS["bob"]})
        page = context.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        response = page.goto(f"{url}/status")
        model_cell = page.locator("#models td.model").inner_text()
        users = page.locator("#users tr").all_inner_texts()
        queue = page.locator("#queue").inner_text()
        shot = page.screenshot(path=str(tmp_path / "status.png"), full_page=True)
        root = context.new_page().goto(f"{url}/")
        browser.close()
    import httpx

    denied = httpx.get(f"{url}/status", headers={"Accept": "text/html"}, auth=("bob", "wrong-key-0000"))
    assert response.status == 200 and root.status == 200 and denied.status_code == 401 and not errors
    assert model_cell == "facts-gpt" and queue == "0"
    bob = next(row for row in users if row.startswith("bob"))
    assert int(bob.split()[1]) >= want["users"]["bob"]["requests"]
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(shot)).convert("L"), np.float64)
    assert pixels.shape[0] > 300 and pixels.std() > 20  # tables and text, not blank


def test_a_client_killed_mid_request_leaves_no_stuck_job(served, model):
    """A client process killed while its request runs: other users are answered, the queue drains."""
    import time

    import httpx

    url, _ = served
    auth = {"Authorization": f"Bearer {KEYS['bob']}"}

    def status():
        return httpx.get(f"{url}/status", headers=auth, timeout=60).json()

    tokens = np.asarray(model.to_tokens(["carol lives in"])[0])
    alice = ji.remote.connect(url, key=KEYS["alice"])
    want = alice.run(tokens, logits_at=-1).logits
    served_before = status()["users"]["bob"]["requests"]
    script = ("import sys, httpx; httpx.post(sys.argv[1] + '/run', content=sys.stdin.buffer.read(), "
              "headers={'Authorization': 'Bearer ' + sys.argv[2]}, timeout=600)")
    proc = subprocess.Popen([sys.executable, "-c", script, url, KEYS["bob"]], stdin=subprocess.PIPE)
    proc.stdin.write(encode({"tokens": np.ones((3, 11), np.int32), "capture": "all"}))  # a new program: it compiles
    proc.stdin.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until the server has the request (or already answered it)
        s = status()
        if s["running"] or s["queue"] or s["users"]["bob"]["requests"] > served_before:
            break
        time.sleep(0.02)
    proc.kill()
    proc.wait(timeout=30)
    with alice:  # answered as before the kill
        np.testing.assert_array_equal(alice.run(tokens, logits_at=-1).logits, want)
    while True:
        s = status()
        if not s["running"] and not s["queue"]:
            break
        assert time.monotonic() < deadline, s
        time.sleep(0.05)
    assert s["users"]["bob"]["queued"] == 0


def test_server_log_never_shows_a_key(served):
    url, proc = served
    proc.terminate()
    proc.wait(timeout=30)
    log = proc.stdout.read()
    assert "serving facts-gpt" in log and "not-a-key-000" not in log
    assert not any(k in log for k in KEYS.values())
