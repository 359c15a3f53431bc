"""Interventions checked against direct computations on a small random GPT-2."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinterp as ji
from jaxinterp.grads import site_grads
from jaxinterp.models.gpt2 import GPT2Config

CFG = GPT2Config.tiny(vocab_size=97, d_model=32, n_layers=3, n_heads=4, d_mlp=64, max_seq_len=32)
T = 9


@pytest.fixture(scope="module")
def model():
    return ji.init(CFG, 0)


@pytest.fixture(scope="module")
def tokens():
    rng = np.random.default_rng(0)
    return jnp.asarray(rng.integers(0, CFG.vocab_size, size=(2, T)))


@pytest.fixture(scope="module")
def other_tokens():
    rng = np.random.default_rng(1)
    return jnp.asarray(rng.integers(0, CFG.vocab_size, size=(2, T)))


def test_sites_visited_in_order(model, tokens):
    from tests.hf_utils import visited_sites

    assert tuple(visited_sites(model, capture="all", shape=tokens.shape)) == model.sites


def test_capture_globs_and_all(model, tokens):
    out = model.run(tokens, capture="blocks.*.resid_post")
    assert sorted(out.cache) == [f"blocks.{i}.resid_post" for i in range(CFG.n_layers)]
    everything = model.run(tokens, capture="all")
    assert set(everything.cache) == set(model.sites)
    assert everything.cache["blocks.1.attn.pattern"].shape == (2, CFG.n_heads, T, T)
    assert everything.cache["blocks.1.attn.z"].shape == (2, T, CFG.n_heads, CFG.head_dim)
    # Captures do not perturb the computation.
    np.testing.assert_array_equal(everything.logits, model.run(tokens).logits)


def test_patch_resid_reproduces_other_run(model, tokens, other_tokens):
    """Patching the residual stream at every position with another run's values gives that run's logits."""
    layer = 1
    site = f"blocks.{layer}.resid_post"
    donor = model.run(other_tokens, capture=site)
    # The embedding (and so the input) differs everywhere before the patch; after it, only the patch matters.
    patched = model.run(tokens, interventions={site: ji.Patch(donor.cache[site])})
    np.testing.assert_allclose(patched.logits, donor.logits, atol=1e-5, rtol=0)


def test_patching_one_position_is_causal(model, tokens, other_tokens):
    pos = 5
    site = "blocks.0.resid_post"
    donor = model.run(other_tokens, capture=site).cache[site]
    clean = model.run(tokens).logits
    patched = model.run(tokens, interventions={site: ji.Patch(donor, ji.positions_mask(T, pos))}).logits
    np.testing.assert_array_equal(patched[:, :pos], clean[:, :pos])
    assert float(jnp.max(jnp.abs(patched[:, pos:] - clean[:, pos:]))) > 1e-3


def test_zero_ablate_head_equals_removing_its_weights(model, tokens):
    """Zeroing head h's z equals a model whose output projection has head h's rows removed."""
    layer, head = 1, 2
    dh = CFG.head_dim
    ablated = model.run(tokens, interventions={f"blocks.{layer}.attn.z": ji.ZeroAblate(ji.heads_mask(T, CFG.n_heads, head))})
    params = jax.tree_util.tree_map(lambda a: a, model.params)
    w = params["layers"]["attn"]["o"]["kernel"]  # [L, H*Dh, D]
    params["layers"]["attn"]["o"]["kernel"] = w.at[layer, head * dh:(head + 1) * dh].set(0.0)
    direct = model.replace(params=params).run(tokens)
    np.testing.assert_allclose(ablated.logits, direct.logits, atol=1e-5, rtol=0)


def test_vmap_over_patch_masks_equals_separate_runs(model, tokens, other_tokens):
    site = "blocks.1.resid_mid"
    donor = model.run(other_tokens, capture=site).cache[site]
    masks = jnp.eye(T, dtype=bool)[:8][:, None, :]  # 8 masks of shape [1, T], one position each

    @jax.jit
    def sweep(masks):
        return jax.vmap(lambda m: model.run(tokens, interventions={site: ji.Patch(donor, m)}).logits)(masks)

    batched = sweep(masks)
    for i in range(8):
        single = model.run(tokens, interventions={site: ji.Patch(donor, masks[i])}).logits
        np.testing.assert_allclose(batched[i], single, atol=1e-5, rtol=0)


def test_grad_wrt_added_vector_matches_finite_difference(model, tokens):
    site = "blocks.0.mlp_out"
    target = 7

    def metric(vec):
        out = model.run(tokens, interventions={site: ji.Add(vec, ji.positions_mask(T, [3, 4]))})
        return jax.nn.log_softmax(out.logits[0, -1])[target]

    vec = jnp.asarray(np.random.default_rng(3).normal(size=CFG.d_model) * 0.1, jnp.float32)
    g = jax.grad(metric)(vec)
    direction = jnp.asarray(np.random.default_rng(4).normal(size=CFG.d_model), jnp.float32)
    # Fourth-order central difference: with a float32 metric of size ~4, the two-point rule's
    # rounding error (~ulp / eps) is of the order of the tolerance; this stencil keeps eps large.
    h = 1e-2
    f = lambda s: metric(vec + s * direction)  # noqa: E731
    with jax.default_matmul_precision("highest"):
        fd = (8 * (f(h) - f(-h)) - (f(2 * h) - f(-2 * h))) / (12 * h)
    np.testing.assert_allclose(float(jnp.dot(g, direction)), float(fd), rtol=2e-3, atol=1e-5)


def test_site_grads_match_grad_of_added_zero(model, tokens):
    """d metric / d activation from site_grads equals a finite difference along a random direction."""
    site = "blocks.1.resid_pre"
    metric = lambda out: out.logits[0, -1, 3] - out.logits[0, -1, 5]
    value, acts, grads = site_grads(model, tokens, site, metric)
    assert acts[site].shape == grads[site].shape == (2, T, CFG.d_model)
    np.testing.assert_allclose(value, metric(model.run(tokens)), atol=1e-6)
    direction = jnp.asarray(np.random.default_rng(5).normal(size=acts[site].shape), jnp.float32)
    eps = 1e-3
    f = lambda d: metric(model.run(tokens, interventions={site: ji.Add(d)}))
    fd = (f(eps * direction) - f(-eps * direction)) / (2 * eps)
    np.testing.assert_allclose(float(jnp.sum(grads[site] * direction)), float(fd), rtol=2e-3, atol=1e-5)
    # Positions after the last one cannot influence it... and the first row's metric ignores row 1.
    assert float(jnp.max(jnp.abs(grads[site][1]))) == 0.0


def test_interventions_compose_in_order(model, tokens):
    site = "blocks.0.ln2"
    x = model.run(tokens, capture=site).cache[site]
    vec = jnp.full((CFG.d_model,), 0.5, jnp.float32)
    got = model.run(tokens, capture=site, interventions={site: [ji.Add(vec), ji.Scale(2.0)]}).cache[site]
    np.testing.assert_allclose(got, (x + vec) * 2.0, atol=1e-6)
    got2 = model.run(tokens, capture=site, interventions={site: ji.Compose([ji.Scale(2.0), ji.Add(vec)])}).cache[site]
    np.testing.assert_allclose(got2, x * 2.0 + vec, atol=1e-6)
    # Several keys matching one site apply in mapping order; callables work too.
    got3 = model.run(tokens, capture=site, interventions={"blocks.*.ln2": ji.Scale(3.0), site: lambda a: a - 1.0}).cache[site]
    np.testing.assert_allclose(got3, x * 3.0 - 1.0, atol=1e-5)


def test_mean_ablate_project_out_noise(model, tokens):
    site = "blocks.2.resid_pre"
    x = model.run(tokens, capture=site).cache[site]
    mean = x.mean(axis=(0, 1))
    got = model.run(tokens, capture=site, interventions={site: ji.MeanAblate(mean, ji.positions_mask(T, 2))}).cache[site]
    np.testing.assert_allclose(got[:, 2], jnp.broadcast_to(mean, (2, CFG.d_model)), atol=1e-6)
    np.testing.assert_array_equal(got[:, 3], x[:, 3])

    basis = jnp.asarray(np.random.default_rng(6).normal(size=(3, CFG.d_model)), jnp.float32)
    got = model.run(tokens, capture=site, interventions={site: ji.ProjectOut(basis)}).cache[site]
    np.testing.assert_allclose(got @ basis.T, 0.0, atol=1e-4)
    # Direct computation: x - P x with P the orthogonal projector onto the row space.
    proj = np.linalg.pinv(np.asarray(basis)) @ np.asarray(basis)
    np.testing.assert_allclose(got, np.asarray(x) - np.asarray(x) @ proj, atol=1e-4)

    noise = ji.Noise.from_key(jax.random.PRNGKey(0), x.shape, scale=0.3)
    got = model.run(tokens, capture=site, interventions={site: noise}).cache[site]
    np.testing.assert_allclose(got, x + 0.3 * noise.noise, atol=1e-6)


def test_attention_knockout_via_scores(model, tokens):
    """Blocking edges on `scores` zeroes them in `pattern` and renormalises the rest."""
    site = "blocks.0.attn.scores"
    mask = np.zeros((1, 1, T, T), bool)
    mask[..., T - 1, 1:4] = True
    out = model.run(tokens, capture="blocks.0.attn.pattern",
                    interventions={site: ji.Patch(jnp.asarray(jnp.finfo(jnp.float32).min), jnp.asarray(mask))})
    pattern = out.cache["blocks.0.attn.pattern"]
    np.testing.assert_array_equal(pattern[:, :, T - 1, 1:4], 0.0)
    np.testing.assert_allclose(pattern.sum(-1), 1.0, atol=1e-5)


def test_jit_and_grad_through_model(model, tokens):
    f = jax.jit(lambda m, t: m.run(t, capture="blocks.0.resid_post"))
    out = f(model, tokens)
    np.testing.assert_allclose(out.logits, model.run(tokens).logits, atol=1e-5)
    loss = lambda m: jnp.mean(jax.nn.log_softmax(m.run(tokens).logits)[..., 0])
    grads = jax.grad(loss)(model)
    assert isinstance(grads, ji.Model)
    assert float(jnp.abs(grads.params["embed"]).sum()) > 0


# --------------------------------------------------------------------------- errors


def test_unknown_site_names_close_matches(model, tokens):
    with pytest.raises(ji.UnknownSiteError, match=r"blocks\.1\.resid_post"):
        model.run(tokens, capture="blocks.1.resid_psot")
    with pytest.raises(ji.UnknownSiteError, match="unknown site"):
        model.run(tokens, interventions={"blocks.9.*": ji.ZeroAblate()})


def test_bad_shapes_and_dtypes(model, tokens):
    with pytest.raises(ValueError, match=r"do not broadcast to the site's shape \(2, 9, 32\)"):
        model.run(tokens, interventions={"blocks.0.resid_post": ji.Patch(jnp.zeros((5, 32)))})
    with pytest.raises(TypeError, match="cast them"):
        model.run(tokens, interventions={"blocks.0.resid_post": ji.Add(jnp.zeros((32,), jnp.float16))})
    with pytest.raises(ValueError, match="mask shape"):
        model.run(tokens, interventions={"blocks.0.resid_post": ji.ZeroAblate(jnp.ones((1, T + 1), bool))})
    with pytest.raises(TypeError, match="boolean"):
        model.run(tokens, interventions={"blocks.0.resid_post": ji.ZeroAblate(jnp.ones((1, T), jnp.int32))})
    with pytest.raises(ValueError, match="returned shape"):
        model.run(tokens, interventions={"embed": lambda a: a[:, :1]})
    with pytest.raises(TypeError, match="apply"):
        model.run(tokens, interventions={"embed": 3.0})


def test_bad_tokens(model):
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 97\)"):
        model.run(jnp.array([[1, 97]]))
    with pytest.raises(ValueError, match="exceeds this model's context of 32"):
        model.run(jnp.zeros((1, 33), jnp.int32))
    with pytest.raises(ValueError, match=r"shape \[batch, seq\]"):
        model.run(jnp.zeros((4,), jnp.int32))
    with pytest.raises(TypeError, match="integers"):
        model.run(jnp.zeros((1, 4), jnp.float32))


def test_head_contributions_sum_to_attn_out(model, tokens):
    from jaxinterp.heads import head_contributions, head_output_weights

    layer = 2
    out = model.run(tokens, capture=[f"blocks.{layer}.attn.z", f"blocks.{layer}.attn_out"])
    per_head = head_contributions(model, out.cache[f"blocks.{layer}.attn.z"], layer)
    assert per_head.shape == (2, T, CFG.n_heads, CFG.d_model)
    _, bias = head_output_weights(model, layer)
    np.testing.assert_allclose(per_head.sum(2) + bias, out.cache[f"blocks.{layer}.attn_out"], atol=1e-5)
    # Zero-ablating head 1 removes exactly its contribution from attn_out.
    ablated = model.run(tokens, capture=f"blocks.{layer}.attn_out", interventions={
        f"blocks.{layer}.attn.z": ji.ZeroAblate(ji.heads_mask(T, CFG.n_heads, 1))}).cache[f"blocks.{layer}.attn_out"]
    np.testing.assert_allclose(ablated, out.cache[f"blocks.{layer}.attn_out"] - per_head[:, :, 1], atol=1e-5)


def test_capture_costs_no_compute(model, tokens):
    """XLA's FLOP count of the compiled forward is the same (to fusion noise) with and without captures."""
    def flops(capture):
        compiled = jax.jit(lambda m, t: m.run(t, capture=capture)).lower(model, tokens).compile()
        cost = compiled.cost_analysis()
        return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]

    assert abs(flops("blocks.*.resid_post") / flops(None) - 1) < 0.01
    # Harvesting an early site: stop_at runs only the layers before it (no later layer, no unembedding).
    # (XLA's cost analysis counts a scan's body once, so the trip count is read from the program.)
    def scan_lengths(stop_at):
        jaxpr = jax.make_jaxpr(lambda m, t: m.run(t, capture="blocks.0.resid_post", stop_at=stop_at).cache)(
            model, tokens)
        return [e.params["length"] for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]

    assert scan_lengths(None) == [CFG.n_layers] and scan_lengths(1) == [1]
    out = model.run(tokens, capture="blocks.0.resid_post", stop_at=1)
    assert out.logits is None
    np.testing.assert_allclose(out.cache["blocks.0.resid_post"],
                               model.run(tokens, capture="blocks.0.resid_post").cache["blocks.0.resid_post"], atol=1e-6)
    with pytest.raises(ValueError, match="lie beyond it"):
        model.run(tokens, capture="blocks.1.resid_post", stop_at=1)


def test_cache_keeps_every_layer_stacked_and_slices_on_access(model, tokens):
    """A site captured at every layer is one [L, ...] array (no second copy per layer); partial captures are
    per-layer arrays; both read like a dict of the per-layer values."""
    every = model.run(tokens, capture=["blocks.*.resid_post", "blocks.1.attn.z", "embed"]).cache
    assert list(every) == ["embed", "blocks.0.resid_post", "blocks.1.attn.z", "blocks.1.resid_post",
                           "blocks.2.resid_post"]
    stacked = every.stacked("resid_post")
    assert stacked.shape == (CFG.n_layers, 2, T, CFG.d_model)
    one = model.run(tokens, capture="blocks.1.resid_post").cache
    np.testing.assert_array_equal(every["blocks.1.resid_post"], one["blocks.1.resid_post"])
    np.testing.assert_array_equal(stacked[1], one["blocks.1.resid_post"])
    assert "blocks.1.attn.z" in every and "blocks.0.attn.z" not in every
    with pytest.raises(KeyError):
        every["blocks.0.attn.z"]
    jitted = jax.jit(lambda m, t: m.run(t, capture="blocks.*.resid_post").cache)(model, tokens)
    assert sorted(jitted) == sorted(k for k in every if k.endswith("resid_post"))
