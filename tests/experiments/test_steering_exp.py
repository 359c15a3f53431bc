"""The steering experiment end to end on facts-gpt (a short sweep): its rates against a direct
computation (one plain forward per prompt set, the vector added with ji.Add, argmax of the last
logits), and the recall-contrast finding (steering at layer 2 turns most answers to the target)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinterp as ji
from jaxinterp.experiments.data.facts_world import load_world_model
from jaxinterp.experiments.steering.config import SteeringConfig
from jaxinterp.experiments.steering.main import contrast_sets, eval_sets, main, split_entities


@jax.jit
def _last_logits(model, tokens, mask, interventions):
    return ji.run(model, tokens, interventions=interventions, attention_mask=mask, logits_at=-1).logits  # [B, V]


def _first_tokens(model, prompts, interventions):
    """Greedy next token of each prompt from a plain padded forward (no generate, no cache)."""
    width = max(len(p.ids) for p in prompts)
    tokens = np.zeros((len(prompts), width), np.int32)
    mask = np.zeros((len(prompts), width), bool)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p.ids):], mask[i, width - len(p.ids):] = p.ids, True
    return np.asarray(jnp.argmax(_last_logits(model, tokens, mask, interventions), -1))


def test_steering_sweep_matches_a_direct_computation(tmp_path):
    if "facts-gpt" not in ji.embedded_models():
        pytest.skip("facts-gpt is not shipped in this checkout")
    argv = ["--preset", "smoke", "--set", "scales=0,3", "free_tokens=1", "n_examples=0", "--out", str(tmp_path)]
    assert main(argv) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert {p.name for p in tmp_path.iterdir()} >= {"results.json", "config.json", "sweep.png", "tradeoff.png"}
    rows = res["sweep"]["recall"]["2"]["rows"]

    cfg = SteeringConfig.smoke()
    model, world = load_world_model(cfg.model)
    target = world.encode(cfg.target)[0]
    vectors, evaluated = split_entities(world, cfg)
    pos, neg = contrast_sets(world, vectors, cfg, target)["recall"]
    sets = eval_sets(world, evaluated, cfg)
    v = ji.steering.mean_difference(model, pos, neg, "blocks.2.resid_post")
    answers = np.asarray([p.answer_id for p in sets["unrelated"]])
    for row in rows:
        iv = {"blocks.2.resid_post": ji.Add(row["scale"] * v)}
        first = _first_tokens(model, sets["steered"], iv)
        assert row["target_rate"] == pytest.approx(np.mean(first == target))
        assert row["unrelated_recall"] == pytest.approx(np.mean(_first_tokens(model, sets["unrelated"], iv) == answers))
    assert rows[0]["target_rate"] == 0 and rows[0]["unrelated_recall"] > 0.9  # facts-gpt knows its facts
    assert rows[1]["target_rate"] > 0.9 and rows[1]["unrelated_recall_drop"] > 0.3  # steers, at a cost
