"""End to end: the SAE board-game experiment's smoke preset on the shipped othello-gpt and its
random-init control, checked against the metrics' definitions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxinterp.experiments.sae_boardgame.main import main

FAMILIES = {"relu", "panneal", "topk", "batchtopk", "jumprelu", "gated"}


@pytest.mark.slow
def test_smoke_run_writes_consistent_results(tmp_path):
    assert main(["--preset", "smoke", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "frontier.png").stat().st_size > 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert json.loads((tmp_path / "config.json").read_text()) == results["config"]
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


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_results(tmp_path, monkeypatch, capsys):
    """A run killed mid-training, re-run with the same command, resumes from its checkpoint and
    ends with the results of an uninterrupted run; a different config in the same --out is refused."""
    from jaxinterp.experiments.sae_boardgame import main as mod

    args = ["--preset", "smoke", "--set", "families=relu"]

    def run(out):
        assert main(args + ["--out", str(out)]) == 0
        return json.loads((out / "results.json").read_text())

    full = run(tmp_path / "full")

    class Killed(Exception):
        pass

    real = mod.batch_fn_for

    def dies_at_step_12(acts, batch_size, seed):
        fn = real(acts, batch_size, seed)

        def batch(t):
            if t == 12:
                raise Killed
            return fn(t)

        return batch

    monkeypatch.setattr(mod, "batch_fn_for", dies_at_step_12)
    with pytest.raises(Killed):
        main(args + ["--out", str(tmp_path / "killed")])
    assert sorted(p.name for p in (tmp_path / "killed/ckpt/trained").iterdir()) == ["10", "12", "metrics.jsonl"]
    monkeypatch.setattr(mod, "batch_fn_for", real)
    resumed = run(tmp_path / "killed")
    # logged every 2 of the 20 steps; the resumed run trained from the step-12 checkpoint (rows 2..12 are
    # the killed run's, read back from metrics.jsonl, none twice) and logged the same numbers
    assert [r["step"] for r in full["trained"]["history"]] == list(range(2, 21, 2))
    assert [r["step"] for r in resumed["trained"]["history"]] == list(range(2, 21, 2))
    for a, b in zip(full["trained"]["history"], resumed["trained"]["history"], strict=True):
        np.testing.assert_allclose(a["relu"]["loss"], b["relu"]["loss"], rtol=1e-6)
    for name in ("trained", "random_init"):
        for a, b in zip(full[name]["rows"], resumed[name]["rows"], strict=True):
            assert a.keys() == b.keys()
            for key in a:
                if isinstance(a[key], float):
                    assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (name, a["family"], key)
                else:
                    assert a[key] == b[key], (name, a["family"], key)
    assert main(args + ["steps=30", "--out", str(tmp_path / "killed")]) == 2
    assert "different config (steps: 20 -> 30)" in capsys.readouterr().err
