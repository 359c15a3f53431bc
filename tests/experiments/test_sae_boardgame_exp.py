"""End to end: the SAE board-game experiment's smoke preset on the shipped othello-gpt and its
random-init control, checked against the metrics' definitions."""

from __future__ import annotations

import json

import pytest

from jaxinterp.experiments.sae_boardgame.main import main

FAMILIES = {"relu", "panneal", "topk", "batchtopk", "jumprelu", "gated"}


@pytest.mark.slow
def test_smoke_run_writes_consistent_results(tmp_path):
    results = main(["--preset", "smoke", "--out", str(tmp_path)])
    assert (tmp_path / "frontier.png").stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(results))
    for name in ("trained", "random_init"):
        rows = results[name]["rows"]
        assert {r["family"] for r in rows} == FAMILIES
        for r in rows:
            assert 0.0 <= r["coverage"] <= 1.0 and 0.0 <= r["reconstruction"] <= 1.0
            assert 0.0 <= r["dead_frac"] <= 1.0 and 0.0 <= r["dense_frac"] <= 1.0
            # CE loss recovered, by definition, from the three losses it is built from.
            expected = (r["ce_zero"] - r["ce_sae"]) / (r["ce_zero"] - r["ce_clean"])
            assert r["loss_recovered"] == pytest.approx(expected, abs=1e-4)
            assert r["kl"] >= 0.0
            if name == "trained":  # zero-ablating a middle layer hurts the trained model
                assert r["ce_clean"] < r["ce_zero"]
            if r["family"] == "topk":  # exactly k latents fire per token
                assert r["l0"] == pytest.approx(r["k"], abs=1e-6)
    # The trained model predicts moves; the random-init control does not.
    assert results["trained"]["rows"][0]["ce_clean"] < results["random_init"]["rows"][0]["ce_clean"]
