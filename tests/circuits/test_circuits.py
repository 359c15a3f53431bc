"""Circuit discovery checked against direct computations on a small random GPT-2 with random SAEs:
integrated-gradient node effects against a per-feature patching loop, edges against finite
differences, faithfulness against plain-jnp ablations, bad input as one-line errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinterp as ji
from jaxinterp.circuits import (ERROR, Y, Neurons, Node, Sites, ablated_metrics, discover, edge_effects,
                                exact_effects, faithfulness_curve, keep_masks, mean_nodes, node_effects)
from jaxinterp.circuits.nodes import NodeValues, encode_nodes
from jaxinterp.models.gpt2 import GPT2Config
from jaxinterp.sae import init_sae

SITES = ("blocks.0.resid_post", "blocks.1.attn_out", "blocks.1.mlp_out", "blocks.1.resid_post")
V, T, B = 23, 6, 4


@pytest.fixture(scope="module")
def setup():
    model = ji.init(GPT2Config.tiny(vocab_size=V, d_model=16, n_layers=2, n_heads=2, d_mlp=32, max_seq_len=8), 0)
    model = model.replace(params=jax.tree_util.tree_map(lambda a: a * 3.0, model.params))  # larger signals
    saes = {}
    for i, s in enumerate(SITES):
        sae = init_sae("relu", jax.random.PRNGKey(10 + i), 16, 24)
        saes[s] = sae.replace(params={**sae.params, "b_enc": jnp.full(24, -0.2)})
    rng = np.random.default_rng(0)
    clean = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    patch = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    good, bad = jnp.asarray(rng.integers(0, V, B)), jnp.asarray(rng.integers(0, V, B))
    return model, saes, clean, patch, good, bad


def logit_diff(logits, good, bad):
    rows = jnp.arange(logits.shape[0])
    return jnp.mean(logits[rows, good] - logits[rows, bad])


@jax.jit
def _metric(model, tokens, good, bad, interventions):
    return logit_diff(model.run(tokens, interventions=interventions, logits_at=-1).logits, good, bad)


def metric_of(model, tokens, good, bad, interventions=None):
    """The metric by a plain forward (jitted: the interventions' arrays are arguments, not constants)."""
    return float(_metric(model, tokens, good, bad, interventions))


def test_ig_node_effects_converge_to_single_feature_patching_loop(setup):
    """Each node patched alone (the rest of its site clean): IG of that node -> the exact effect (a loop of
    forward passes with the feature replaced by hand) as the steps grow; 1 step is attribution patching."""
    model, saes, clean, _, good, bad = setup
    site = "blocks.0.resid_post"
    x = model.run(clean, capture=site).cache[site]
    f, e = encode_nodes(saes[site], x)
    active = np.argsort(-np.asarray((f != 0).sum((0, 1))))[:4]
    base = metric_of(model, clean, good, bad)
    cache = model.run(clean, capture=list(SITES)).cache
    clean_nodes = {s: encode_nodes(saes[s], cache[s]) for s in SITES}
    for i in active:  # patch value of feature i: 0 (zero-ablation of that one feature), others clean
        f_patch = f.at[..., i].set(0.0)
        patch = {**clean_nodes, site: (f_patch, e)}
        x_ablated = saes[site].decode(f_patch) + e
        exact = metric_of(model, clean, good, bad, {site: ji.Patch(x_ablated)}) - base
        errors = []
        for steps in (1, 4, 32):
            eff = node_effects(model, saes, clean, logit_diff, patch=patch, steps=steps, metric_args=(good, bad))
            others = np.delete(eff.features[site], i)
            assert np.all(others == 0) and eff.errors[site] == 0  # only the patched node moved
            errors.append(abs(eff.features[site][i] - exact))
        assert errors[-1] <= 0.03 * abs(exact) + 1e-5, (i, exact, errors)
        assert errors[-1] <= errors[0] + 1e-6
    atp = node_effects(model, saes, clean, logit_diff, patch=patch, method="atp", metric_args=(good, bad))
    ig1 = node_effects(model, saes, clean, logit_diff, patch=patch, steps=1, metric_args=(good, bad))
    np.testing.assert_allclose(atp.features[site], ig1.features[site], rtol=1e-5, atol=1e-6)


def test_ig_effects_of_a_site_sum_to_patching_the_whole_site(setup):
    """Completeness: with counterfactual tokens, a site's features + error effects -> the exact effect of
    patching the site's activation from the patch run (ji.Patch), for every site; exact_effects = a loop."""
    model, saes, clean, patch, good, bad = setup
    eff = node_effects(model, saes, clean, logit_diff, patch=patch, steps=64, metric_args=(good, bad))
    base = metric_of(model, clean, good, bad)
    assert eff.m_clean == pytest.approx(base, abs=1e-4)
    assert eff.m_patch == pytest.approx(metric_of(model, patch, good, bad), abs=1e-4)
    for s in SITES:
        donor = model.run(patch, capture=s).cache[s]
        exact = metric_of(model, clean, good, bad, {s: ji.Patch(donor)}) - base
        assert eff.site_total(s) == pytest.approx(exact, rel=0.03, abs=1e-3), s
    top = [n for n, _ in eff.ranked()[:3]]
    exact = exact_effects(model, saes, clean, logit_diff, eff, top, metric_args=(good, bad))
    for n in top:  # the loop's quantity, computed here by hand
        i = SITES.index(n.site)
        (f, e), (df, de) = eff.clean[i], eff.deltas[i]
        f2, e2 = (f, e + de) if n.is_error else (f.at[..., n.index].add(df[..., n.index]), e)
        x2 = saes[n.site].decode(f2) + e2
        assert exact[n] == pytest.approx(metric_of(model, clean, good, bad, {n.site: ji.Patch(x2)}) - base, abs=1e-4)


def test_neuron_nodes_and_per_position_effects(setup):
    """Neurons (identity dictionaries, no error node): per-position IG effects sum over positions to the
    summed ones and over a site to patching the site."""
    model, _, clean, patch, good, bad = setup
    neurons = {"blocks.1.mlp.post": Neurons(32), "blocks.1.resid_post": Neurons(16)}
    eff = node_effects(model, neurons, clean, logit_diff, patch=patch, steps=64, metric_args=(good, bad))
    pos = node_effects(model, neurons, clean, logit_diff, patch=patch, steps=64, metric_args=(good, bad),
                       per_position=True)
    assert pos.features["blocks.1.mlp.post"].shape == (T, 32)
    np.testing.assert_allclose(pos.features["blocks.1.mlp.post"].sum(0), eff.features["blocks.1.mlp.post"], atol=1e-5)
    assert not any(n.is_error for n in eff.nodes()) and len(eff.nodes()) == 48
    donor = model.run(patch, capture="blocks.1.mlp.post").cache["blocks.1.mlp.post"]
    exact = metric_of(model, clean, good, bad, {"blocks.1.mlp.post": ji.Patch(donor)}) - eff.m_clean
    assert eff.site_total("blocks.1.mlp.post") == pytest.approx(exact, rel=0.03, abs=1e-3)


@functools.partial(jax.jit, static_argnames=("up", "down", "between"))
def _direct_downstream(model, saes, clean, values, *, up, down, between):
    """Downstream nodes with ``up`` set to ``values`` and the sites between frozen at their clean values."""
    frozen = model.run(clean, capture=list(between)).cache if between else {}
    ivs = {up: NodeValues(saes[up], *values), **{s: ji.Patch(frozen[s]) for s in between}}
    return encode_nodes(saes[down], model.run(clean, capture=down, interventions=ivs).cache[down])


def test_edges_match_finite_differences(setup):
    """IE(u -> d) = grad_d m . (d d/d u) . delta_u with stop-gradients between: the Jacobian term by central
    differences with the sites in between frozen (what a stop-gradient means), for feature and error nodes
    on both ends and for an edge into the metric past a site."""
    model, saes, clean, patch, good, bad = setup
    eff = node_effects(model, saes, clean, logit_diff, patch=patch, steps=3, metric_args=(good, bad))
    nodes = [n for n, _ in eff.ranked()[:30]]
    edges = edge_effects(model, saes, clean, eff, nodes, metric=logit_diff, metric_args=(good, bad))
    pairs = {(u.site, d.site) for u, d in edges}
    assert ("blocks.0.resid_post", "blocks.1.mlp_out") in pairs and ("blocks.1.resid_post", "y") in pairs
    assert ("blocks.0.resid_post", "y") not in pairs  # resid_post of layer 1 lies between
    eps, checked = 1e-3, 0
    for (u, d), w in edges.items():
        if d == Y or (u.site, d.site) not in {("blocks.0.resid_post", "blocks.1.mlp_out"),
                                              ("blocks.1.attn_out", "blocks.1.resid_post")}:
            continue
        between = tuple(s for s in SITES if SITES.index(u.site) < SITES.index(s) < SITES.index(d.site))
        iu, idn = SITES.index(u.site), SITES.index(d.site)
        (fc, ec), (df, de) = eff.clean[iu], eff.deltas[iu]
        tangent = (jnp.zeros_like(fc), de) if u.is_error else \
            (jnp.zeros_like(fc).at[..., u.index].set(df[..., u.index]), jnp.zeros_like(ec))
        where = dict(up=u.site, down=d.site, between=between)
        hi = _direct_downstream(model, saes, clean, (fc + eps * tangent[0], ec + eps * tangent[1]), **where)
        lo = _direct_downstream(model, saes, clean, (fc - eps * tangent[0], ec - eps * tangent[1]), **where)
        gf, ge = eff.grads[idn]
        fd = float((((hi[1] - lo[1]) / (2 * eps)) * ge).sum()) if d.is_error else \
            float((((hi[0] - lo[0])[..., d.index] / (2 * eps)) * gf[..., d.index]).sum())
        assert w == pytest.approx(fd, rel=2e-2, abs=2e-4), (str(u), str(d))
        checked += 1
    assert checked >= 10


def test_edge_into_the_metric_past_a_site_matches_finite_differences(setup):
    """Without a residual site after them, attn_out -> y passes mlp_out: the edge is the metric's derivative
    along delta with mlp_out frozen at its clean value."""
    model, saes, clean, patch, good, bad = setup
    sub = {s: saes[s] for s in ("blocks.1.attn_out", "blocks.1.mlp_out")}
    eff = node_effects(model, sub, clean, logit_diff, patch=patch, steps=2, metric_args=(good, bad))
    only = [n for n, _ in eff.ranked() if n.site == "blocks.1.attn_out"][:3]
    y_edges = edge_effects(model, sub, clean, eff, only, metric=logit_diff, metric_args=(good, bad))
    (fc, ec), (df, de) = eff.clean[0], eff.deltas[0]
    frozen = model.run(clean, capture="blocks.1.mlp_out").cache["blocks.1.mlp_out"]
    eps = 1e-3
    for n in only:
        def m_at(s, n=n):
            f, e = (fc, ec + s * de) if n.is_error else (fc.at[..., n.index].add(s * df[..., n.index]), ec)
            ivs = {"blocks.1.attn_out": NodeValues(saes["blocks.1.attn_out"], f, e),
                   "blocks.1.mlp_out": ji.Patch(frozen)}
            return metric_of(model, clean, good, bad, ivs)

        assert y_edges[(n, Y)] == pytest.approx((m_at(eps) - m_at(-eps)) / (2 * eps), rel=2e-2, abs=2e-4)


def test_edge_rule_follows_the_residual_stream():
    pairs = {(u, d): b for u, d, b in Sites(("embed", "blocks.0.attn_out", "blocks.0.mlp_out",
                                             "blocks.0.resid_post", "blocks.1.attn_out")).edge_pairs()}
    assert pairs == {("embed", "blocks.0.attn_out"): (), ("blocks.0.attn_out", "blocks.0.mlp_out"): (),
                     ("embed", "blocks.0.mlp_out"): ("blocks.0.attn_out",),
                     ("blocks.0.mlp_out", "blocks.0.resid_post"): (),
                     ("blocks.0.attn_out", "blocks.0.resid_post"): ("blocks.0.mlp_out",),
                     ("embed", "blocks.0.resid_post"): ("blocks.0.attn_out", "blocks.0.mlp_out"),
                     ("blocks.0.resid_post", "blocks.1.attn_out"): (), ("blocks.1.attn_out", "y"): (),
                     ("blocks.0.resid_post", "y"): ("blocks.1.attn_out",)}


def _reference_ablation(saes, keep, means):
    """Plain-jnp ablation per site (independent of NodeAblate): kept nodes clean, the others at their means."""

    def make(s):
        sae, (kf, ke), (mf, me) = saes[s], keep[s], means[s]

        def fn(x):
            f = sae.encode(x)
            e = x - sae.decode(f)
            f = f * kf + mf * (1 - kf)
            e = e * ke + me * (1 - ke)
            return sae.decode(f) + e

        return ji.Fn(fn)

    return {s: make(s) for s in saes}


def test_faithfulness_curve_against_direct_ablations(setup):
    model, saes, clean, patch, good, bad = setup
    eff = node_effects(model, saes, clean, logit_diff, patch=patch, steps=2, metric_args=(good, bad))
    means = mean_nodes(model, saes, clean)
    assert means["blocks.1.mlp_out"][0].shape == (T, 24)  # per position (no attention mask)
    curve = faithfulness_curve(model, saes, clean, logit_diff, eff, (0, 5, 10_000), means=means,
                               metric_args=(good, bad))
    assert curve["counts"] == [0, 5, len(eff.ranked())]
    assert curve["m_full"] == pytest.approx(eff.m_clean, abs=1e-4)
    assert curve["faithfulness"][-1] == pytest.approx(1.0, abs=1e-4) and curve["completeness"][0] == \
        pytest.approx(1.0, abs=1e-4)
    top5 = [n for n, _ in eff.ranked()[:5]]
    masks = keep_masks(eff, [top5])
    keep = {s: (masks[s][0][0].astype(np.float32), masks[s][1][0].astype(np.float32)) for s in SITES}
    ref = metric_of(model, clean, good, bad, _reference_ablation(saes, keep, means))
    assert curve["m_circuit"][1] == pytest.approx(ref, abs=1e-4)
    nothing = {s: (np.zeros(24, np.float32), np.float32(0)) for s in SITES}
    assert curve["m_empty"] == pytest.approx(metric_of(model, clean, good, bad,
                                                       _reference_ablation(saes, nothing, means)), abs=1e-4)
    both = ablated_metrics(model, saes, clean, logit_diff, keep_masks(eff, [top5, []]), means,
                           metric_args=(good, bad))
    np.testing.assert_allclose(both, [curve["m_circuit"][1], curve["m_empty"]], atol=1e-5)


def test_discover_writes_a_graph(setup, tmp_path):
    model, saes, clean, patch, good, bad = setup
    circuit, eff = discover(model, saes, clean, logit_diff, patch=patch, steps=2, node_threshold=0.01,
                            edge_threshold=0.001, max_nodes_per_site=3, metric_args=(good, bad))
    assert 0 < len(circuit.nodes) <= 3 * len(SITES)
    assert all(abs(v) > 0.01 for v in circuit.nodes.values())
    assert all(abs(w) > 0.001 and u in circuit.nodes and (d == Y or d in circuit.nodes)
               for (u, d), w in circuit.edges.items())
    data = circuit.to_json()
    assert {n["id"] for n in data["nodes"]} >= {str(n) for n in circuit.nodes} | {"y"}
    for suffix in ("json", "png", "svg"):
        path = tmp_path / f"c.{suffix}"
        circuit.save_json(path) if suffix == "json" else circuit.render(path)
        assert path.stat().st_size > 500
    assert (tmp_path / "c.svg").read_text().lstrip().startswith("<?xml")


def test_bad_input_is_one_line(setup):
    model, saes, clean, patch, good, bad = setup
    wrong = {**saes, "blocks.1.mlp_out": init_sae("relu", jax.random.PRNGKey(0), 12, 24)}
    cases = [
        (wrong, logit_diff, ValueError, "reads d_in=12 features but the site has width 16"),
        ({"blocks.1.mlp_outt": saes["blocks.1.mlp_out"]}, logit_diff, KeyError, "unknown site 'blocks.1.mlp_outt'"),
        ({"blocks.*.mlp_out": saes["blocks.1.mlp_out"]}, logit_diff, ValueError, "concrete site names"),
        (saes, lambda logits, g, b: logits[:, 0], ValueError, "must return a scalar"),
    ]
    for dicts, metric, err, text in cases:
        with pytest.raises(err) as info:
            node_effects(model, dicts, clean, metric, patch=patch, metric_args=(good, bad))
        assert text in str(info.value) and "\n" not in str(info.value), str(info.value)
    with pytest.raises(ValueError, match="patch tokens must have the clean tokens' shape"):
        node_effects(model, saes, clean, logit_diff, patch=patch[:, :3], metric_args=(good, bad))
    with pytest.raises(ValueError, match="method must be one of"):
        node_effects(model, saes, clean, logit_diff, method="exact", metric_args=(good, bad))
    with pytest.raises(ValueError, match="readout 'blocks.0.resid_post' comes before"):
        node_effects(model, saes, clean, lambda r: r.sum(), readout="blocks.0.resid_post")


def test_node_names():
    assert str(Node("blocks.1.mlp_out", 7)) == "blocks.1.mlp_out/7"
    assert str(Node("blocks.1.mlp_out", ERROR, 3)) == "blocks.1.mlp_out@3/err"
