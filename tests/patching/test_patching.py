"""Activation / attribution patching and knockouts against direct per-cell runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinterp as ji
from jaxinterp.models.gpt2 import GPT2Config
from jaxinterp.patching.activation import activation_patching, attribution_patching
from jaxinterp.patching.causal_trace import layer_window
from jaxinterp.patching.knockout import attention_knockout, mean_ablation_knockout, site_means

SEQ = 6
A, B = 3, 7  # metric: logit difference between these two tokens


def logit_diff(logits):
    return (logits[:, A] - logits[:, B]).mean()


@pytest.fixture(scope="module")
def model():
    m = ji.init(GPT2Config.tiny(n_layers=2, vocab_size=61), 0)
    big = lambda path, p: p * 3.0 if getattr(path[-1], "key", None) in ("kernel", "embed", "pos_embed") else p  # noqa: E731
    return m.replace(params=jax.tree_util.tree_map_with_path(big, m.params))


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(0)
    clean = rng.integers(0, 61, (2, SEQ))
    corrupt = clean.copy()
    corrupt[:, 1:3] = rng.integers(0, 61, (2, 2))
    return clean, corrupt


def _direct(model, tokens, site, value, mask):
    logits = ji.run(model, tokens, interventions={site: ji.Patch(value, mask=mask)}).logits[:, -1]
    return float(logit_diff(logits))


def test_activation_patching_per_position_matches_loop(model, pair):
    clean, corrupt = pair
    res = activation_patching(model, clean, corrupt, "blocks.*.resid_pre", logit_diff)
    cache = ji.run(model, clean, capture="blocks.*.resid_pre").cache
    for layer in range(2):
        site = f"blocks.{layer}.resid_pre"
        ref = [_direct(model, corrupt, site, cache[site], ji.positions_mask(SEQ, t)) for t in range(SEQ)]
        np.testing.assert_allclose(res.effects[site], ref, atol=1e-5)
    assert res.clean == pytest.approx(float(logit_diff(ji.run(model, clean).logits[:, -1])), abs=1e-5)
    assert res.corrupt == pytest.approx(float(logit_diff(ji.run(model, corrupt).logits[:, -1])), abs=1e-5)
    # Patching the whole residual at layer 0 at every position of the edited span recovers "clean" at t=0 only
    # when nothing else differs; the position before the edit cannot matter:
    assert res.effects["blocks.0.resid_pre"][0] == pytest.approx(res.corrupt, abs=1e-5)
    norm = res.normalized()["blocks.0.resid_pre"]
    assert norm.shape == (SEQ,)


def test_activation_patching_per_head_matches_loop(model, pair):
    clean, corrupt = pair
    site = "blocks.1.attn.z"
    res = activation_patching(model, clean, corrupt, site, logit_diff, per="head")
    value = ji.run(model, clean, capture=site).cache[site]
    h = model.config.n_heads
    assert res.effects[site].shape == (SEQ, h)
    for t in (2, SEQ - 1):
        for head in range(h):
            ref = _direct(model, corrupt, site, value, ji.heads_mask(SEQ, h, head, positions=t))
            assert res.effects[site][t, head] == pytest.approx(ref, abs=1e-5)
    whole = activation_patching(model, clean, corrupt, site, logit_diff, per="site")
    assert whole.effects[site] == pytest.approx(_direct(model, corrupt, site, value, None), abs=1e-5)


def test_attribution_approximates_activation_patching_near_linear(model, pair):
    """With a tiny corruption (noise 1e-3 on the embeddings) the first-order estimate is near exact."""
    clean, _ = pair
    noise = 1e-3 * jax.random.normal(jax.random.PRNGKey(0), (2, SEQ, model.config.d_model))
    ivs = {"embed": ji.Add(noise)}
    sites = ["blocks.*.resid_pre", "blocks.*.mlp_out", "blocks.*.attn.z"]
    act = activation_patching(model, clean, clean, sites[:2], logit_diff, corrupt_interventions=ivs)
    att = attribution_patching(model, clean, clean, sites[:2], logit_diff, corrupt_interventions=ivs)
    assert att.corrupt == pytest.approx(act.corrupt, abs=1e-5) and att.clean == pytest.approx(act.clean, abs=1e-5)
    a = np.concatenate([act.effects[k] - act.corrupt for k in act.effects])
    b = np.concatenate([att.effects[k] - att.corrupt for k in act.effects])
    assert np.abs(a).max() > 1e-4  # effects are not trivially zero
    assert np.corrcoef(a, b)[0, 1] > 0.999
    assert np.abs(a - b).max() < 0.02 * np.abs(a).max()
    heads = attribution_patching(model, clean, clean, "blocks.0.attn.z", logit_diff, per="head",
                                 corrupt_interventions=ivs)
    heads_act = activation_patching(model, clean, clean, "blocks.0.attn.z", logit_diff, per="head",
                                    corrupt_interventions=ivs)
    x, y = heads_act.effects["blocks.0.attn.z"].ravel(), heads.effects["blocks.0.attn.z"].ravel()
    assert np.corrcoef(x, y)[0, 1] > 0.99


def test_attention_knockout_matches_direct(model, pair):
    tokens = pair[0]
    res = attention_knockout(model, tokens, [1, 2], window=1)
    base = ji.run(model, tokens).logits[:, -1]
    answers = jnp.argmax(base, -1)
    for centre in range(2):
        mask = np.zeros((1, 1, SEQ, SEQ), bool)
        mask[0, 0, SEQ - 1, [1, 2]] = True
        scores = {f"blocks.{centre}.attn.scores": ji.Patch(jnp.float32(jnp.finfo(jnp.float32).min), mask=mask)}
        out = ji.run(model, tokens, interventions=scores, capture=f"blocks.{centre}.attn.pattern")
        pattern = out.cache[f"blocks.{centre}.attn.pattern"]
        assert float(jnp.abs(pattern[:, :, -1, 1:3]).max()) == 0.0  # the edges are really cut
        p = jax.nn.softmax(out.logits[:, -1])[jnp.arange(2), answers].mean()
        assert res.probs[centre] == pytest.approx(float(p), abs=1e-6)
    assert res.p_base == pytest.approx(float(jax.nn.softmax(base)[jnp.arange(2), answers].mean()), abs=1e-6)
    assert np.abs(res.relative_change).max() > 1e-4


def test_mean_ablation_knockout_matches_direct(model, pair):
    tokens = pair[0]
    res = mean_ablation_knockout(model, tokens, [2], site="mlp.post", window=2)
    means = site_means(model, tokens, "mlp.post")
    base = ji.run(model, tokens).logits[:, -1]
    answers = jnp.argmax(base, -1)
    for centre in range(2):
        ivs = {f"blocks.{j}.mlp.post": ji.MeanAblate(means[j], mask=ji.positions_mask(SEQ, 2))
               for j in layer_window(centre, 2, 2)}
        logits = ji.run(model, tokens, interventions=ivs).logits[:, -1]
        p = jax.nn.softmax(logits)[jnp.arange(2), answers].mean()
        assert res.probs[centre] == pytest.approx(float(p), abs=1e-6)


def test_bad_inputs(model, pair):
    clean, corrupt = pair
    with pytest.raises(ValueError, match="per must be one of"):
        activation_patching(model, clean, corrupt, "blocks.0.resid_pre", logit_diff, per="token")
    with pytest.raises(ValueError, match="per='site'"):
        activation_patching(model, clean, corrupt, "blocks.0.attn.pattern", logit_diff)
    with pytest.raises(ValueError, match="same shape"):
        activation_patching(model, clean, corrupt[:, :3], "blocks.0.resid_pre", logit_diff)
    with pytest.raises(ValueError, match="unknown site 'mixer.in_x'"):
        mean_ablation_knockout(model, clean, [1])
    with pytest.raises(ValueError, match="source positions"):
        attention_knockout(model, clean, [SEQ + 3])



def test_padded_prompts_patch_like_each_prompt_alone(model):
    """A left-padded batch of two prompts of different lengths: each row patched in its padded form equals
    the prompt patched alone at its real positions, and the batch's effect is the mean of its rows' (the
    metric reads each row's last real token)."""
    rng = np.random.default_rng(11)
    lengths, width, site = (5, 7), 7, "blocks.1.resid_pre"
    clean = np.zeros((2, width), np.int32)
    mask = np.zeros((2, width), bool)
    for i, n in enumerate(lengths):
        clean[i, width - n:], mask[i, width - n:] = rng.integers(1, 61, n), True
    corrupt = clean.copy()
    corrupt[:, -3] = (corrupt[:, -3] + 3) % 61
    batch = activation_patching(model, clean, corrupt, site, logit_diff, attention_mask=mask).effects[site]
    rows = []
    for i, n in enumerate(lengths):
        padded = activation_patching(model, clean[i:i + 1], corrupt[i:i + 1], site, logit_diff,
                                     attention_mask=mask[i:i + 1]).effects[site]
        alone = activation_patching(model, clean[i:i + 1, width - n:], corrupt[i:i + 1, width - n:], site,
                                    logit_diff).effects[site]
        np.testing.assert_allclose(padded[width - n:], alone, atol=1e-5)
        rows.append(padded)
    np.testing.assert_allclose(batch, np.mean(rows, axis=0), atol=1e-5)
    assert np.ptp(batch[mask.any(0)]) > 1e-3  # patching matters, so the comparison can fail
    attr = attribution_patching(model, clean, corrupt, site, logit_diff, attention_mask=mask).effects[site]
    assert attr.shape == (width,) and np.isfinite(attr).all()
