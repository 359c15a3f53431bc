"""train-saes and circuits end to end on facts-gpt (smoke presets, the circuits run reading the SAEs the
train-saes run wrote): every reported number is checked against its definition."""

import json

import numpy as np
import pytest

import jaxinterp as ji
from jaxinterp.experiments.circuits.main import main as circuits_main
from jaxinterp.experiments.train_saes.main import INDEX
from jaxinterp.experiments.train_saes.main import main as train_saes_main


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if "facts-gpt" not in ji.embedded_models():
        pytest.skip("facts-gpt is not shipped in this checkout")
    root = tmp_path_factory.mktemp("saetable")
    saes, out = root / "saes", root / "circuits"
    # compile time dominates: the fewest programs that still cover every stage of both commands
    assert train_saes_main(["--preset", "smoke", "--set", "steps=4", "eval_rows=4", "--out", str(saes)]) == 0
    assert circuits_main(["--preset", "smoke", "--set", f"saes={saes}", "steps=1", "check_nodes=0",
                          "neuron_kinds=resid_post", "--out", str(out)]) == 0
    return saes, out


def test_saes_report_the_standard_quality_numbers(runs):
    saes, _ = runs
    res = json.loads((saes / "results.json").read_text())
    index = json.loads((saes / "saes" / INDEX).read_text())
    assert index["sites"] == res["sites"] and res["sites"] == ["blocks.1.mlp_out", "blocks.1.resid_post"]
    for site, q in res["quality"].items():
        assert ji.sae.load(saes / "saes" / site).site == site
        assert q["l0"] == pytest.approx(16.0) and 0.0 <= q["dead_frac"] <= 1.0
        # CE loss recovered by its definition, from the three losses it is built from
        want = (q["ce_zero"] - q["ce_sae"]) / (q["ce_zero"] - q["ce_clean"])
        assert q["loss_recovered"] == pytest.approx(want, rel=1e-5)
    assert res["table"].count("\n") == 1 + len(res["sites"])


def test_circuit_curves_are_anchored_by_their_definition(runs):
    _, out = runs
    res = json.loads((out / "results.json").read_text())["tasks"]["recall"]
    for kind in ("features", "neurons"):
        c = res[kind]["curve"]
        f, comp, counts = np.array(c["faithfulness"]), np.array(c["completeness"]), c["counts"]
        # 0 nodes kept = m(empty) (faithfulness 0, completeness 1); every node kept = m(M) (1 and 0)
        assert counts[0] == 0 and f[0] == pytest.approx(0.0, abs=1e-6) and comp[0] == pytest.approx(1.0, abs=1e-5)
        assert np.allclose(f, (np.array(c["m_circuit"]) - c["m_empty"]) / (c["m_full"] - c["m_empty"]), atol=1e-6)
        assert c["n_nodes"] > max(counts)
    assert (out / "faithfulness.png").stat().st_size > 10_000 and (out / "recall_circuit.png").stat().st_size > 10_000
