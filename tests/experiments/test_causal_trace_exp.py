"""Causal-trace and ROME experiments end to end on a tiny facts-world model (smoke configs)."""

import dataclasses
import json

import jax
import numpy as np
import pytest

import jaxinterp as ji
from jaxinterp import cli
from jaxinterp.experiments.causal_trace.config import TraceExperimentConfig
from jaxinterp.experiments.data.facts_world import FactsWorld
from jaxinterp.experiments.rome.config import RomeExperimentConfig
from jaxinterp.experiments.rome.main import eval_record
from jaxinterp.experiments.rome.main import main as rome_main
from jaxinterp.experiments.train_lm.config import get_config
from jaxinterp.experiments.train_lm.main import build_model, export
from jaxinterp.editing.rome import counterfact_scores, target_logprobs


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_facts")
    cfg = get_config("tiny")
    world = FactsWorld(cfg.data.world)
    export(build_model(cfg, world, jax.random.PRNGKey(0)), world, path)
    return path


@pytest.mark.slow
def test_trace_experiment_numbers(tiny_dir, tmp_path, capsys):
    out = tmp_path / "ct"
    assert cli.main(["trace", "--model", str(tiny_dir), "--out", str(out), "--set", "n_facts=2", "max_lengths=1",
                     "n_samples=2", "known_only=false", "n_examples=1", "n_attribution=2"]) == 0
    res = json.loads((out / "results.json").read_text())
    for png in ("fact_0.png", "aie.png", "knockout.png"):
        assert (out / png).stat().st_size > 0
    assert "attribution vs activation" in capsys.readouterr().out
    model = ji.load(tiny_dir)
    facts = res["facts"]
    assert res["n_facts"] == len(facts) == 2
    kinds = {"resid_post", "mlp_out", "attn_out", "resid_post|freeze=mlp_out", "resid_post|freeze=attn_out"}
    assert set(res["aie"]) == kinds
    for f in facts:  # p_clean is the softmax probability of the true object in a plain forward
        logits = model.run(np.asarray([f["ids"]])).logits[0, -1]
        p = float(jax.nn.softmax(logits)[model_answer(f)])
        assert f["traces"]["resid_post"]["p_clean"] == pytest.approx(p, abs=1e-5)
    # AIE of the "last" class = mean over facts of (restored p at the last token - p_corrupt).
    for kind in kinds:
        rows = [np.asarray(f["traces"][kind]["probs"])[-1] - f["traces"][kind]["p_corrupt"] for f in facts]
        np.testing.assert_allclose(res["aie"][kind]["classes"]["last"], np.mean(rows, 0), atol=1e-6)
    # Whole-subject restoration = a direct forward: noise on the subject embeddings, the clean block
    # output patched at every subject token of one layer.
    from jaxinterp.patching import TraceConfig, gaussian_corruption

    direct = []
    for f in facts:
        b, e = f["traces"]["resid_post"]["subject"]
        toks = np.asarray([f["ids"]])
        corr = gaussian_corruption(model, toks[0], (b, e), res["sigma"], TraceConfig(n_samples=2))
        clean = model.run(toks, capture="blocks.*.resid_post").cache
        row = []
        for l in range(model.config.n_layers):
            ivs = {"embed": ji.Add(corr.delta),
                   f"blocks.{l}.resid_post": ji.Patch(clean[f"blocks.{l}.resid_post"][0],
                                                      mask=ji.positions_mask(toks.shape[1], list(range(b, e))))}
            logits = model.run(corr.tokens, interventions=ivs).logits[:, -1]
            row.append(float(jax.nn.softmax(logits)[:, model_answer(f)].mean()) - f["traces"]["resid_post"]["p_corrupt"])
        direct.append(row)
    np.testing.assert_allclose(res["subject_span"]["subject_span_ie"], np.mean(direct, 0), atol=1e-5)
    r = res["attribution_vs_activation"]["pearson_r"]
    assert -1.0 <= r <= 1.0 and res["attribution_vs_activation"]["n_cells"] > 0


def model_answer(fact):
    return fact["traces"]["resid_post"]["answer"]


@pytest.mark.slow
def test_rome_experiment_numbers(tiny_dir, tmp_path):
    assert rome_main(["--preset", "smoke", "--model", str(tiny_dir), "--set", "layers=0", "--out",
                      str(tmp_path / "rome")]) == 0
    cfg = RomeExperimentConfig.smoke(model=str(tiny_dir), layers=(0,))
    saved = json.loads((tmp_path / "rome" / "results.json").read_text())
    assert json.loads((tmp_path / "rome" / "config.json").read_text()) == json.loads(json.dumps(dataclasses.asdict(cfg)))
    assert list(saved["per_layer"]) == ["0"]
    assert (tmp_path / "rome" / "layer_sweep.png").stat().st_size > 0
    model = ji.load(tiny_dir)
    world = FactsWorld.from_dir(tiny_dir)
    records = world.counterfact(cfg.n_edits, seed=cfg.seed)
    direct = counterfact_scores(model, [eval_record(r) for r in records])
    assert {k: saved["unedited"][k] for k in direct} == pytest.approx(direct)
    # efficacy reads the rewrite prompt alone (CounterFact's ES); "templates" the other training
    # templates; both recomputed here from raw log-probabilities
    es, tmpl = [], []
    for r in records:
        lp = target_logprobs(model, [list(p.ids) for p in r.prompts], [[r.target_true_id], [r.target_new_id]])
        es.append(float(lp[0, 1] > lp[0, 0]))
        tmpl.append(float((lp[1:, 1] > lp[1:, 0]).mean()))
    assert saved["unedited"]["efficacy"] == pytest.approx(100 * np.mean(es))
    assert saved["unedited"]["templates"] == pytest.approx(100 * np.mean(tmpl))
    with pytest.raises(ValueError, match="'rewrite' or 'templates'"):
        eval_record(records[0], "all")
    for e in saved["per_layer"]["0"]["edits"]:
        for m in ("efficacy", "paraphrase", "neighborhood"):
            assert 0.0 <= e[m] <= 100.0


def test_configs_validate():
    with pytest.raises(ValueError, match="corruption must be one of"):
        TraceExperimentConfig(corruption="swap")
    assert TraceExperimentConfig.mamba().corruption == "alt"
    assert dataclasses.replace(RomeExperimentConfig(), layers=[1, 2]).layers == (1, 2)


def test_rome_frame_split(tiny_dir):
    from jaxinterp.experiments.rome.frames import frame, frame_split

    cfg = RomeExperimentConfig.smoke(model=str(tiny_dir), n_edits=1)
    res = frame_split(cfg, 0)
    world = FactsWorld.from_dir(tiny_dir)
    rec = world.counterfact(1, seed=cfg.seed)[0]
    # every other template and paraphrase prompt is scored once, and the groups partition them
    assert len(res["prompts"]) == len(rec.prompts) - 1 + len(rec.paraphrase_prompts)
    assert res["same_frame"]["n"] + res["other_frame"]["n"] == len(res["prompts"])
    hits = [r["success"] for r in res["prompts"] if r["same_frame"]]
    assert res["same_frame"]["success"] == pytest.approx(np.mean(hits)) if hits else np.isnan(res["same_frame"]["success"])
    # the frame is the tokens right before the subject, read from the token ids
    p = rec.prompts[0]
    assert frame(p, 2) == tuple(p.ids[p.subject_span[0] - 2:p.subject_span[0]]) or p.subject_span[0] < 2
    assert world.decode(p.ids[p.subject_span[0]:p.subject_span[1]]) == rec.subject
    with pytest.raises(ValueError, match="layer must lie in"):
        frame_split(cfg, 99)
