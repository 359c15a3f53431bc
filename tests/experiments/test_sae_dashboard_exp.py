"""The SAE dashboard experiment end to end (smoke preset on facts-gpt): trains, saves, reloads, refuses."""

import json
import subprocess
import sys

import pytest

import jaxinterp as ji
from jaxinterp.experiments.sae_dashboard.main import main


def test_smoke_run_trains_saves_and_rebuilds_the_same_page_from_the_saved_sae(tmp_path):
    if "facts-gpt" not in ji.embedded_models():
        pytest.skip("facts-gpt is not shipped in this checkout")
    assert main(["--preset", "smoke", "--out", str(tmp_path / "a")]) == 0
    res = json.loads((tmp_path / "a" / "results.json").read_text())
    assert res["l0"] == pytest.approx(16.0) and 0 < res["fve"] < 1 and res["ce_sae"] < res["ce_zero"]
    page = (tmp_path / "a" / "index.html").read_text()
    assert page.count('<section id="f') == 8 and json.loads((tmp_path / "a" / "results.json").read_text())["site"] \
        == "blocks.2.resid_post"
    assert main(["--preset", "smoke", "--set", f"sae={tmp_path / 'a' / 'sae'}", "--out", str(tmp_path / "b")]) == 0
    again = json.loads((tmp_path / "b" / "results.json").read_text())
    assert again["fve"] == pytest.approx(res["fve"], abs=1e-5)
    assert (tmp_path / "b" / "index.html").read_text() == page  # the saved SAE (SAELens layout) gives the same page
    # refused while another process holds the output directory's lock
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from jaxinterp.checkpoint import OutputLock; "
                               f"OutputLock({str(tmp_path / 'c')!r}).acquire(); print('held', flush=True); "
                               "time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["--preset", "smoke", "--out", str(tmp_path / "c")]) == 2
    finally:
        holder.kill()
        holder.wait()
