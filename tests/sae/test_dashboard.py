"""Feature dashboards: statistics against a plain loop, output tokens against the unembedding
recovered from the model's own logits, and the page rendered in headless Chromium."""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinterp as ji
from jaxinterp.models.gpt2 import GPT2Config
from jaxinterp.sae import Reads, init_sae
from jaxinterp.sae.dashboard import (DashboardConfig, build_dashboard, context_latents, feature_stats, logit_weights,
                                     render_dashboard, token_strings)

SITE = "blocks.1.resid_post"


def _setup(d=8, f=12, n=10, t=12, vocab=23):
    model = ji.init(GPT2Config.tiny(vocab_size=vocab, d_model=d, n_layers=2, n_heads=2, d_mlp=32, max_seq_len=t), 0)
    tokens = np.asarray(np.random.default_rng(1).integers(0, vocab, (n, t)))
    sae = init_sae("relu", jax.random.PRNGKey(2), d, f, input_scale=0.5)
    r = np.random.default_rng(3)
    params = {k: jnp.asarray(v + 0.5 * r.normal(size=v.shape), jnp.float32) for k, v in sae.params.items()}
    return model, tokens, sae.replace(params=params, reads=Reads(site=SITE))


def _np_latents(sae, x):
    p = {k: np.asarray(v, np.float64) for k, v in sae.params.items()}
    return np.maximum((np.asarray(x, np.float64) * float(sae.buffers["input_scale"]) - p["b_dec"]) @ p["W_enc"]
                      + p["b_enc"], 0)


def test_feature_stats_match_a_plain_loop():
    model, tokens, sae = _setup()
    mask = np.ones(tokens.shape, bool)
    mask[:, 0] = False
    stats = feature_stats(model, sae, tokens, mask=mask, top_contexts=3, bins=5, batch=3)  # 4 batches merged
    a = _np_latents(sae, model.run(tokens, capture=SITE).cache[SITE]) * mask[..., None]  # [N, T, F]
    assert 0.1 < (a[mask] > 0).mean() < 0.9
    for i in range(sae.d_sae):
        vals = a[..., i]
        np.testing.assert_allclose(stats.freq[i], (vals[mask] > 0).mean(), rtol=1e-6)
        np.testing.assert_allclose(stats.max_act[i], vals.max(), rtol=1e-4)
        seq_max = vals.max(1)
        for rank in range(3):
            s = np.argsort(-seq_max, kind="stable")[rank]
            assert stats.top_seq[i, rank] == s and stats.top_pos[i, rank] == vals[s].argmax()
            np.testing.assert_allclose(stats.top_value[i, rank], seq_max[s], rtol=1e-4)
        nz = vals[vals > 0]
        np.testing.assert_array_equal(stats.counts[i], np.histogram(nz, bins=5, range=(0, vals.max()))[0])
    assert stats.n_tokens == mask.sum()


def test_logit_weights_are_decoder_directions_through_the_unembedding():
    model, tokens, sae = _setup()
    # W_U from the model's own logits: logits = final_norm @ W_U, with noise added at final_norm (a LayerNorm's
    # outputs span only D - 1 directions when its bias is 0) so that the captured values span all D
    noise = jnp.asarray(np.random.default_rng(4).normal(size=tokens.shape + (8,)), jnp.float32)
    out = model.run(tokens, capture="final_norm", interventions={"final_norm": lambda x: x + noise})
    h = np.asarray(out.cache["final_norm"], np.float64).reshape(-1, 8)
    w_u = np.linalg.lstsq(h, np.asarray(out.logits, np.float64).reshape(len(h), -1), rcond=None)[0]  # [D, V]
    want = np.asarray(sae.params["W_dec"], np.float64) / 0.5 @ w_u
    np.testing.assert_allclose(logit_weights(model, sae, batch=5), want, rtol=1e-4, atol=1e-4)
    wide = init_sae("relu", jax.random.PRNGKey(0), 32, 12).replace(reads=Reads(site="blocks.0.mlp.post"))
    assert logit_weights(model, wide) is None  # not a residual-stream direction


def test_page_lists_selected_features_with_their_contexts():
    model, tokens, sae = _setup()
    vocab = [f"tok{i}" for i in range(23)]
    stats = feature_stats(model, sae, tokens, top_contexts=2)
    i, j, dead = (int(n) for n in [*np.flatnonzero(stats.freq > 0)[:2], np.flatnonzero(stats.freq == 0)[0]])
    cfg = DashboardConfig(features=(i, j, dead), top_contexts=2, context_before=2, context_after=1)
    page = render_dashboard(stats, logit_weights(model, sae), tokens, vocab,
                            context_latents(model, sae, tokens, stats, cfg.features), cfg)
    assert page.count("<section id=\"f") == 3 and f'href="#f{j}"' in page
    section = page[page.index(f'<section id="f{j}">'):]
    section = section[:section.index("</section>")]
    s, p = stats.top_seq[j, 0], stats.top_pos[j, 0]
    value = f"{stats.top_value[j, 0]:.4g}"
    assert f'<span class="max" style="background:rgba(240,110,20,1.00)" title="{value}">{vocab[tokens[s, p]]}</span>' \
        in section  # the strongest context's maximum: outlined, fully shaded
    assert section.count('<div class="ctx">') == 2 and section.count("<tr>") == 2 * (1 + 8)  # promoted + suppressed
    dead_section = page[page.index(f'<section id="f{dead}">'):]
    assert "never fires" in dead_section[:dead_section.index("</section>")]
    with pytest.raises(ValueError, match="features \\[99\\] out of range: the SAE has 12 latents"):
        render_dashboard(stats, None, tokens, vocab, {}, DashboardConfig(features=(99,)))


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install -y chromium)")
def test_dashboard_renders_in_headless_chromium(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    model = ji.load("facts-gpt")
    vocab = token_strings(ji.loading.embedded_dir("facts-gpt") / "tokenizer.json", model.config.vocab_size)
    tokens = np.asarray(np.random.default_rng(0).integers(3, len(vocab), (16, 24)))
    sae = init_sae("relu", jax.random.PRNGKey(0), 128, 64).replace(reads=Reads(site="blocks.2.resid_post"))
    sae = sae.replace(params={**sae.params, "b_enc": jnp.full(64, -0.5)})
    path, stats = build_dashboard(model, sae, tokens, vocab, tmp_path / "index.html",
                                  cfg=DashboardConfig(n_features=6, top_contexts=4))
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(path.resolve().as_uri())
        n_sections = page.locator("section[id^=f]").count()
        n_bars = page.locator("section#f%d svg rect" % int(np.flatnonzero(stats.freq > 0)[0])).count()
        shot = page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
        browser.close()
    assert n_sections == 6 and n_bars == 24
    from PIL import Image
    import io

    pixels = np.asarray(Image.open(io.BytesIO(shot)).convert("L"), np.float64)
    assert pixels.shape[0] > 900 and pixels.std() > 20  # a long page with text, bars and shading, not blank
