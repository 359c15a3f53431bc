"""`jaxinterp lens` end to end on facts-gpt (the `tiny` preset, seconds): results.json's fields,
its KL figures against a direct computation from the saved lens, the tuned lens beating the logit
lens at the early layers, and a run killed after a checkpoint resuming from it bit-identical."""

import json
import shutil

import jax
import numpy as np
import pytest

import jaxinterp as ji
from jaxinterp.experiments.lens.config import LensConfig
from jaxinterp.experiments.lens.main import main
from jaxinterp.experiments.sae_dashboard.main import facts_rows
from jaxinterp.train import read_metrics

pytestmark = pytest.mark.skipif("facts-gpt" not in ji.embedded_models(), reason="facts-gpt is not shipped")


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("lens") / "run"
    assert main(["--preset", "tiny", "--out", str(out)]) == 0
    return out


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_results_fields_and_figures_match_a_direct_computation(straight):
    res = json.loads((straight / "results.json").read_text())
    assert {p.name for p in straight.iterdir()} >= {"results.json", "config.json", "kl_to_final.png",
                                                    "tuned_lens.safetensors", "ckpt"}
    cfg = LensConfig.tiny()
    assert res["layers"] == [0, 1, 2, 3] and res["tuned_layers"] == [0, 1, 2]
    assert res["train_steps"] == cfg.steps and len(read_metrics(straight / "ckpt" / "metrics.jsonl")) == cfg.steps
    assert res["train_loss_last"] < 0.5 * res["train_loss_first"]
    model = ji.load(cfg.model)
    held, bos = facts_rows(cfg, model, cfg.rows, seed=cfg.seed + 2)
    keep = held != bos
    lens = ji.lens.TunedLens.load(straight / "tuned_lens.safetensors")
    out = model.run(held, capture=[f"blocks.{i}.resid_post" for i in range(4)])
    log_p = _log_softmax(out.logits)  # [B, T, V]
    for layer in range(4):
        h = np.asarray(out.cache[f"blocks.{layer}.resid_post"], np.float64)  # [B, T, D]
        views = {"kl_logit_lens": h}
        if layer < 3:  # the tuned lens: h + h W + b, by hand
            views["kl_tuned_lens"] = h + h @ np.asarray(lens.weight[layer], np.float64) + np.asarray(lens.bias[layer])
        for key, x in views.items():
            log_q = _log_softmax(ji.lens.apply_head(model, jax.numpy.asarray(x, np.float32)))
            kl = (np.exp(log_p) * (log_p - log_q)).sum(-1)[keep].mean()
            assert res[key][layer] == pytest.approx(kl, rel=1e-3, abs=1e-5), (key, layer)
    assert res["kl_logit_lens"][3] < 1e-5 and res["kl_tuned_lens"][3] == res["kl_logit_lens"][3]  # the model's output
    # the tuned lens's reason to exist: much closer to the final distribution at the early layers
    assert res["kl_tuned_lens"][0] < 0.5 * res["kl_logit_lens"][0]
    assert res["kl_tuned_lens"][1] < 0.8 * res["kl_logit_lens"][1]


def test_run_killed_after_a_checkpoint_resumes_bit_identical(straight, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(straight, out)  # as a run killed after step 20's checkpoint had left it:
    shutil.rmtree(out / "ckpt" / "40")  # no later checkpoint, metrics rows past 20, no outputs
    for name in ("results.json", "tuned_lens.safetensors", "kl_to_final.png"):
        (out / name).unlink()
    assert read_metrics(out / "ckpt" / "metrics.jsonl")[-1]["step"] == 40
    capsys.readouterr()
    assert main(["--preset", "tiny", "--out", str(out)]) == 0  # the same command: resumes at 20, runs to 40
    assert f"resumed from step 20 ({out / 'ckpt'})" in capsys.readouterr().out
    assert (out / "tuned_lens.safetensors").read_bytes() == (straight / "tuned_lens.safetensors").read_bytes()
    assert read_metrics(out / "ckpt" / "metrics.jsonl") == read_metrics(straight / "ckpt" / "metrics.jsonl")
    a, b = (json.loads((d / "results.json").read_text()) for d in (out, straight))
    assert a["kl_tuned_lens"] == b["kl_tuned_lens"] and a["kl_logit_lens"] == b["kl_logit_lens"]
