"""Views: the numbers they show come from the model, the PNGs are real images, the page renders and
responds in headless Chromium, and treescope renders caches and interventions."""

import io
import json
import shutil

import numpy as np
import pytest

import jaxinterp as ji
from jaxinterp.models.gpt2.config import GPT2Config

TEXT = "Bren qua wyn prefers the color white Lur el"


@pytest.fixture(scope="module")
def facts():
    return ji.load("facts-gpt")


def test_view_data_matches_captures_and_logit_lens(facts):
    data = ji.viz.view_data(facts, TEXT, top_k=3)
    ids, mask = facts.to_tokens(TEXT)
    assert data.tokens.tolist() == np.asarray(ids)[0].tolist() and data.labels[1] == "Bren"
    out = facts.run(ids, capture="blocks.*.attn.pattern")
    for i in range(facts.config.n_layers):
        np.testing.assert_allclose(data.patterns[i], out.cache[f"blocks.{i}.attn.pattern"][0], atol=1e-6)
    lens = np.asarray(ji.lens.logit_lens(facts, ids, embed=True))[:, 0]  # [1 + L, T, V]
    probs = np.exp(lens - lens.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    order = np.argsort(-probs, -1)[..., :3]
    np.testing.assert_array_equal(data.lens_ids, order)
    np.testing.assert_allclose(data.lens_probs, np.take_along_axis(probs, order, -1), atol=1e-5)
    assert data.lens_sites[0] == "embed" and data.lens_sites[-1] == "blocks.3.resid_post"


def test_attention_heatmaps_write_pngs(tmp_path):
    from PIL import Image

    model = ji.init(GPT2Config.tiny(n_layers=3, vocab_size=50), key=0)  # no tokenizer: labels are #ids
    paths = ji.viz.attention_heatmaps(model, np.arange(9) % 50, tmp_path, layers=[0, -1])
    assert [p.name for p in paths] == ["layer0.png", "layer2.png"]
    for p in paths:
        pixels = np.asarray(Image.open(p).convert("L"), np.float64)
        assert pixels.shape[0] > 200 and pixels.std() > 20
    with pytest.raises(ValueError, match="one sequence"):
        ji.viz.attention_heatmaps(model, np.zeros((2, 4), np.int32), tmp_path)
    with pytest.raises(ValueError, match=r"layers must lie in \[-3, 3\)"):
        ji.viz.attention_heatmaps(model, np.arange(4), tmp_path, layers=[3])


def test_page_is_self_contained(tmp_path, facts):
    path = ji.viz.attention_page(facts, TEXT, tmp_path / "view.html", title="t</script><b>")
    page = path.read_text()
    assert "src=" not in page and "href=" not in page and "http" not in page  # nothing fetched
    assert "t&lt;/script&gt;&lt;b&gt;" in page  # the title is escaped
    data = json.loads(page[page.index('id="data">') + 10:page.index("</script>", page.index('id="data">'))])
    assert data["n_layers"] == 4 and data["n_heads"] == 4 and len(data["lens_sites"]) == 5


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian's chromium (apt-get install -y chromium)")
def test_page_renders_and_responds_in_headless_chromium(tmp_path, facts):
    sync_api = pytest.importorskip("playwright.sync_api")
    path = ji.viz.attention_page(facts, TEXT, tmp_path / "view.html")
    data = ji.viz.view_data(facts, TEXT)
    t = len(data.tokens)
    errors = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(path.resolve().as_uri())
        page.wait_for_selector("body[data-ready='1']", timeout=10_000)
        n_cells = page.locator("#grid td.c").count()
        n_lens_rows = page.locator("#lens tr").count()
        page.select_option("#layer", "2")
        page.select_option("#head", "1")
        title = page.locator("#grid tr").nth(5).locator("td.c").nth(1).get_attribute("title")
        page.locator("#lens tr").nth(2).locator("td").nth(3).click()  # layer 2 (rows run from the top layer down)
        detail = page.locator("#detail").inner_text()
        shot = page.screenshot(path=str(tmp_path / "view.png"), full_page=True)
        browser.close()
    assert not errors
    assert n_cells == t * t and n_lens_rows == 1 + 5
    # the cell shows layer 2, head 1, query 4 -> key 1 of the model's own pattern
    assert title.endswith(f"{data.patterns[2, 1, 4, 1]:.3f}")
    top = data.vocab[int(data.lens_ids[3, 3, 0])]  # lens row 3 = blocks.2.resid_post
    assert detail.startswith("blocks.2.resid_post at") and json.dumps(top) in detail
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(shot)).convert("L"), np.float64)
    assert pixels.shape[0] > 600 and pixels.std() > 20  # heatmap, tables and text, not blank


def test_treescope_renders_cache_and_interventions(facts):
    out = facts.run(np.arange(1, 6)[None], capture=["blocks.0.resid_post", "embed", "blocks.1.attn.pattern"])
    assert len(ji.viz.render_html(out)) > 1000
    html = ji.viz.render_html(out, compressed=False)
    assert html.index("embed") < html.index("blocks.0.resid_post") < html.index("blocks.1.attn.pattern")
    mask = ji.heads_mask(5, 4, [2])
    html = ji.viz.render_html({"blocks.3.attn.z": ji.ZeroAblate(mask), "blocks.0.resid_post": ji.Scale(0.5)},
                              arrays=False, compressed=False)
    assert "ZeroAblate" in html and "Scale" in html and "blocks.3.attn.z" in html
