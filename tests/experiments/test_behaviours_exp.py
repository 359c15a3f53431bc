"""Unsupervised behaviours: planted clusters are recovered from synthetic gradients, gradient sketches equal
a count sketch of per-context gradients from a plain loop, and the experiment's HTML index (smoke run on
facts-gpt with a random SAE) is browsable in headless Chromium: index -> cluster page -> circuit."""

from __future__ import annotations

import io
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxinterp as ji
from jaxinterp.circuits import gradient_sketches, spectral_clusters
from jaxinterp.circuits.clusters import _sketch_tables, kmeans
from jaxinterp.models.gpt2 import GPT2Config
from jaxinterp.sae import Reads, init_sae


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether labelings ``a`` and ``b`` group the rows identically (up to renaming the clusters)."""
    return all(len(set(b[a == c])) == 1 for c in set(a)) and len(set(a)) == len(set(b))


def test_spectral_clusters_recover_planted_gradient_clusters():
    rng = np.random.default_rng(0)
    k, d, sizes = 5, 200, [40, 30, 20, 12, 8]
    directions = rng.normal(size=(k, d))
    truth = np.repeat(np.arange(k), sizes)
    # gradients of one mechanism point the same way with per-context magnitudes and noise (cosine ~0.7 within)
    x = directions[truth] * rng.uniform(0.5, 3.0, (len(truth), 1)) + 0.7 * rng.normal(size=(len(truth), d)) \
        * np.linalg.norm(directions[truth], axis=1, keepdims=True) / np.sqrt(d) * rng.uniform(0.5, 3.0, (len(truth), 1))
    perm = rng.permutation(len(truth))
    labels = spectral_clusters(x[perm], k, seed=1)
    assert _same_partition(truth[perm], labels)
    np.testing.assert_array_equal(np.bincount(labels), sorted(sizes, reverse=True))  # 0 = the largest
    assert _same_partition(truth, kmeans(directions[truth] + 0.1 * rng.normal(size=(len(truth), d)), k, seed=0))
    with pytest.raises(ValueError, match="k must lie in"):
        spectral_clusters(x, len(x) + 1)


def test_gradient_sketches_equal_a_count_sketch_of_per_context_gradients():
    model = ji.init(GPT2Config.tiny(vocab_size=19, d_model=8, n_layers=1, n_heads=2, d_mlp=16, max_seq_len=8), 0)
    rng = np.random.default_rng(1)
    tokens, targets = rng.integers(0, 19, (3, 6)), rng.integers(0, 19, 3)
    got = gradient_sketches(model, tokens, targets, dim=64, seed=3, chunk=2)  # 2 chunks, the last padded

    def loss(params, t, y):
        logits = model.replace(params=params).run(jnp.asarray(t)[None]).logits[0, -1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y))

    tables = _sketch_tables(model.params, 64, 3)
    grad = jax.jit(jax.grad(loss))
    for i in range(len(tokens)):
        g = jax.tree_util.tree_leaves(grad(model.params, tokens[i], targets[i]))
        want = np.zeros(64)
        for leaf, (bucket, sign) in zip(g, tables):
            np.add.at(want, np.asarray(bucket), np.asarray(leaf, np.float64).ravel() * np.asarray(sign))
        np.testing.assert_allclose(got[i], want, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    if "facts-gpt" not in ji.embedded_models():
        pytest.skip("facts-gpt is not shipped in this checkout")
    from jaxinterp.experiments.behaviours.main import main

    root = tmp_path_factory.mktemp("behaviours")
    sites = ("blocks.2.resid_post",)
    for i, site in enumerate(sites):  # a random SAE in a train-saes output layout (no training in a test)
        sae = init_sae("relu", jax.random.PRNGKey(i), 128, 32).replace(reads=Reads(site=site))
        ji.sae.save(sae, root / "saes" / "saes" / site)
    (root / "saes" / "saes" / "index.json").write_text(json.dumps({"model": "facts-gpt", "sites": list(sites)}))
    out = root / "out"
    assert main(["--preset", "smoke", "--set", f"saes={root / 'saes'}", "n_contexts=16", "pool=32", "k=2",
                 "steps=1", "sketch_dim=256", "circuit_contexts=2", "examples=3", "node_threshold=0", "--out", str(out)]) == 0
    return out


def test_smoke_run_writes_clusters_and_circuits(smoke_run):
    res = json.loads((smoke_run / "results.json").read_text())
    labels = np.array(res["labels"])
    assert len(labels) == 16 and [c["size"] for c in res["clusters"]] == np.bincount(labels).tolist()
    for c in res["clusters"]:
        circuit = json.loads((smoke_run / f"cluster_{c['id']}_circuit.json").read_text())
        assert circuit["info"]["n_nodes"] == len(c["circuit"]["nodes"]) > 0
        assert {n["site"] for n in circuit["nodes"]} == {"blocks.2.resid_post", "y"}
        assert (smoke_run / f"cluster_{c['id']}_circuit.svg").stat().st_size > 1000


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install -y chromium)")
def test_index_links_to_cluster_pages_with_circuits_in_headless_chromium(smoke_run):
    sync_api = pytest.importorskip("playwright.sync_api")
    from PIL import Image

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1100, "height": 800})
        page.goto((smoke_run / "index.html").resolve().as_uri())
        n_links = page.locator("a[href^=cluster_]").count()
        index_shot = page.screenshot(path=str(smoke_run / "index_shot.png"), full_page=True)
        page.locator("a[href^=cluster_]").first.click()
        page.wait_for_load_state()
        url, n_examples = page.url, page.locator("span.tgt").count()
        img_width = page.evaluate("document.querySelector('img').naturalWidth")
        shot = page.screenshot(path=str(smoke_run / "cluster_shot.png"), full_page=True)
        browser.close()
    assert n_links == 2 and url.endswith("cluster_0.html")
    assert n_examples >= 1 and img_width > 300  # example contexts with highlighted targets; the circuit SVG loaded
    for png in (index_shot, shot):
        pixels = np.asarray(Image.open(io.BytesIO(png)).convert("L"), np.float64)
        assert pixels.std() > 20  # text and tables, not a blank page
