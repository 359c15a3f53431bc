"""SHIFT experiment: the splits' counts, the judge, feature ablation through the SAE splice, the concept-erasure
projection, and the smoke preset end to end on random SAEs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinterp as ji

if "facts-gpt" not in ji.embedded_models():
    pytest.skip("facts-gpt is not shipped in this checkout", allow_module_level=True)

from jaxinterp.circuits.nodes import encode_nodes  # noqa: E402
from jaxinterp.experiments.data.facts_world import load_world_model  # noqa: E402
from jaxinterp.experiments.shift import main as shift  # noqa: E402
from jaxinterp.experiments.shift.data import make_splits  # noqa: E402
from jaxinterp.model import run  # noqa: E402
from jaxinterp.sae import Reads  # noqa: E402
from jaxinterp.sae.families import init_sae  # noqa: E402

DOMAINS, LEADS = ("astronomy", "cuisine"), ("Everyone knows that", "It is said that")


@pytest.fixture(scope="module")
def world_model():
    return load_world_model("facts-gpt")


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory, world_model):
    """Random SAEs at every attn_out / mlp_out / resid_post of layers 0-1, in train-saes' layout."""
    model, _ = world_model
    root = tmp_path_factory.mktemp("saes")
    sites = [f"blocks.{l}.{k}" for l in (0, 1) for k in ("attn_out", "mlp_out", "resid_post")]
    for i, site in enumerate(sites):
        sae = init_sae("relu", jax.random.PRNGKey(i), model.config.d_model, 64).replace(reads=Reads(site=site))
        ji.sae.save(sae, root / "saes" / site, model_name="facts-gpt")
    (root / "saes" / "index.json").write_text(json.dumps({"model": "facts-gpt", "sites": sites}))
    return root


def test_splits_counted_from_the_texts(world_model):
    _, world = world_model
    splits = make_splits(world, DOMAINS, LEADS, templates=2, n_judge=3, n_test=3, seed=1)
    domain_of = {e.name: e.domain for e in world.entities if e.domain in DOMAINS}
    names = {}
    for key, split in splits.items():
        counts = np.zeros((2, 2), int)
        names[key] = set()
        for row, w in zip(split.tokens, split.weights):
            text = world.decode(row[w > 0])
            lead = [i for i, p in enumerate(LEADS) if text.startswith(p + " ")]
            name = [n for n in domain_of if f" {n} " in f" {text[len(LEADS[lead[0]]):]} "]
            assert len(lead) == 1 and len(name) >= 1, text
            name = max(name, key=len)  # a name may extend a shorter one
            names[key].add(name)
            counts[DOMAINS.index(domain_of[name]), lead[0]] += 1
        np.testing.assert_array_equal(counts, shift.group_counts(split))  # the labels match the texts
        if key == "train":
            assert counts[0, 1] == counts[1, 0] == 0 and counts[0, 0] == counts[1, 1] > 0  # perfectly correlated
        else:
            assert np.all(counts == counts[0, 0]) and counts[0, 0] > 0  # balanced: 4 equal cells
    assert names["train"] == names["oracle"]
    assert not (names["train"] & names["judge"]) and not (names["train"] & names["test"])
    assert not (names["judge"] & names["test"])


def test_judge_picks_the_copies():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 0, 1], 50)
    s = np.repeat([0, 0, 1, 1], 50)
    acts = np.stack([s + 0.3 * rng.normal(size=200), y + 0.3 * rng.normal(size=200),
                     2 * s + y + 0.1 * rng.normal(size=200), 0.5 * y + 0.1 * rng.normal(size=200)], 1)
    is_spur, zi, zs = shift.judge(acts, y, s)
    assert is_spur.tolist() == [True, False, True, False]
    # the association is the standardised mean difference, computed directly for the first column
    a, b = acts[s == 1, 0], acts[s == 0, 0]
    np.testing.assert_allclose(zs[0], abs(a.mean() - b.mean()) / np.sqrt((a.var() + b.var()) / 2), rtol=1e-6)


def test_ablation_removes_exactly_the_chosen_features(world_model, sae_dir):
    model, world = world_model
    saes = shift.ensure_saes(sae_dir, "facts-gpt")
    site = "blocks.1.resid_post"
    tokens = jnp.asarray(np.stack([world.encode("It is said that Cor rin lives in")] * 2))
    fwd = jax.jit(lambda m, t, ivs: run(m, t, capture=[site], interventions=ivs, stop_at=2).cache[site])
    clean = fwd(model, tokens, None)
    f, e = encode_nodes(saes[site], clean)
    chosen = [int(i) for i in np.flatnonzero(np.asarray(f).max((0, 1)) > 0)[:3]]
    assert len(chosen) == 3
    out = fwd(model, tokens, shift.feature_ablation(saes, {site: chosen}))
    f_expected = np.asarray(f).copy()
    f_expected[..., chosen] = 0.0
    expected = saes[site].decode(jnp.asarray(f_expected)) + e
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-4)
    assert not np.allclose(np.asarray(out), np.asarray(clean), atol=1e-3)
    means = np.random.default_rng(0).uniform(0.5, 1.0, saes[site].d_sae).astype(np.float32)
    out = fwd(model, tokens, shift.feature_ablation(saes, {site: chosen}, {site: means}))
    f_expected[..., chosen] = means[chosen]  # mean ablation: the chosen features at their given means
    expected = saes[site].decode(jnp.asarray(f_expected)) + e
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-4)


def test_concept_erasure_is_orthogonal_to_the_direction():
    rng = np.random.default_rng(1)
    s = np.repeat([0, 1], 40)
    x = rng.normal(size=(80, 16)).astype(np.float32) + 3.0 * s[:, None] * rng.normal(size=16).astype(np.float32)
    proj = shift.erasure_projection(x, s)
    d = x[s == 1].mean(0) - x[s == 0].mean(0)
    erased = x @ proj
    np.testing.assert_allclose(erased @ d / np.linalg.norm(d), 0.0, atol=1e-4)
    np.testing.assert_allclose(erased[s == 1].mean(0), erased[s == 0].mean(0), atol=1e-4)
    np.testing.assert_allclose(erased @ proj, erased, atol=1e-4)  # a projection


def test_smoke_end_to_end_and_bad_set(tmp_path, sae_dir, capsys):
    out = tmp_path / "out"
    assert shift.main(["--preset", "smoke", "--set", f"saes={sae_dir}", "layer=0", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["rows"]) == set(shift.ROWS)
    for row in res["rows"].values():
        assert 0.0 <= row["worst_group"] <= row["accuracy"] <= 1.0
    assert (out / "config.json").exists() and "wrote" in capsys.readouterr().out
    assert shift.main(["--set", "layer=banana", "--out", str(tmp_path / "bad")]) == 2
    assert shift.main(["--set", "domains=astronomy", "--out", str(tmp_path / "bad2")]) == 2
