"""The SAE dashboard experiment end to end (smoke preset on facts-gpt): trains, saves, reloads, refuses."""

import json

import pytest

import jaxinterp as ji
from jaxinterp.experiments.sae_dashboard.main import main


def test_smoke_run_trains_saves_and_rebuilds_the_same_page_from_the_saved_sae(tmp_path):
    if "facts-gpt" not in ji.embedded_models():
        pytest.skip("facts-gpt is not shipped in this checkout")
    res = main(["--preset", "smoke", "--out", str(tmp_path / "a")])
    assert res["l0"] == pytest.approx(16.0) and 0 < res["fve"] < 1 and res["ce_sae"] < res["ce_zero"]
    page = (tmp_path / "a" / "index.html").read_text()
    assert page.count('<section id="f') == 8 and json.loads((tmp_path / "a" / "results.json").read_text())["site"] \
        == "blocks.2.resid_post"
    again = main(["--preset", "smoke", "--sae", str(tmp_path / "a" / "sae"), "--out", str(tmp_path / "b")])
    assert again["fve"] == pytest.approx(res["fve"], abs=1e-5)
    assert (tmp_path / "b" / "index.html").read_text() == page  # the saved SAE (SAELens layout) gives the same page
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / ".lock").write_text("1")
    with pytest.raises(SystemExit, match="is being written by another run"):
        main(["--preset", "smoke", "--out", str(tmp_path / "c")])
