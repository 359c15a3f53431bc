"""The jaxinterp CLI: recall (dispatched to experiments/train_lm/evaluate.py) numbers vs a direct loop, errors."""

import json

import jax
import numpy as np
import pytest

import jaxinterp as ji
from jaxinterp import cli
from jaxinterp.experiments.data.facts_world import FactsWorld
from jaxinterp.experiments.train_lm.config import get_config
from jaxinterp.experiments.train_lm.main import build_model, export


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_model")
    cfg = get_config("tiny")
    world = FactsWorld(cfg.data.world)
    export(build_model(cfg, world, jax.random.PRNGKey(0)), world, path)
    return path


def _direct_accuracy(model, items):
    """One unpadded forward per prompt: is the argmax at the last position the answer?"""
    last = jax.jit(lambda m, t: m.run(t).logits[0, -1])  # compiled once per prompt length
    hits = [int(np.argmax(np.asarray(last(model, np.array([it.ids]))))) == it.answer_id for it in items]
    return float(np.mean(hits))


def test_recall_matches_direct_loop(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["recall", "--model", str(tiny_dir), "--out", str(out), "--set", "n_prompts=1000",
                     "n_passages=8"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert (out / "recall.png").stat().st_size > 0
    model = ji.load(tiny_dir)
    world = FactsWorld.from_dir(tiny_dir)
    assert res["train_n"] == len(world.fact_prompts("train"))
    assert res["train_acc"] == pytest.approx(_direct_accuracy(model, world.fact_prompts("train")))
    assert res["paraphrase_acc"] == pytest.approx(_direct_accuracy(model, world.fact_prompts("paraphrase")))
    passages = world.context_passages(8, seed=1000)
    assert res["copy_acc"] == pytest.approx(_direct_accuracy(model, passages))
    printed = capsys.readouterr().out
    assert "in-context copy accuracy" in printed and "accuracy: share of prompts" in printed
    assert printed.strip().splitlines()[-1].startswith(f"wrote {out / 'results.json'}, {out / 'config.json'}")
    assert json.loads((out / "config.json").read_text())["n_passages"] == 8


def test_recall_on_embedded_model_by_default(tmp_path, capsys):
    if "facts-gpt" not in ji.embedded_models():
        pytest.skip("facts-gpt is not shipped yet")
    assert cli.main(["recall", "--out", str(tmp_path), "--set", "n_prompts=16", "n_passages=8"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["model"] == "facts-gpt" and res["train_n"] == 16
    assert res["train_acc"] >= 0.8  # a trained model, on a small sample
    assert (tmp_path / "recall.png").exists()
    assert "ALL" in capsys.readouterr().out


def test_commands_registry_and_errors(tmp_path, capsys):
    assert cli.DEFAULT in cli.COMMANDS
    assert cli.main(["models"]) == 0
    assert capsys.readouterr().out.split() == ji.embedded_models()
    assert cli.main(["frobnicate"]) == 2
    assert cli.main(["recall", "--model", str(tmp_path / "missing")]) == 2
    (tmp_path / "m").mkdir()  # a directory, but no model in it
    assert cli.main(["recall", "--model", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and "unknown command 'frobnicate'" in err[0]
    assert f"model directory '{tmp_path / 'missing'}' does not exist" in err[1] and "no config.json" in err[2]
