"""Causal tracing vs a plain Python loop of single-cell restorations (ROME's way)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinterp as ji
from jaxinterp.models.gpt2 import GPT2Config
from jaxinterp.patching import (
    TraceConfig,
    alt_subject_corruption,
    average_indirect_effect,
    embedding_sigma,
    gaussian_corruption,
    layer_window,
    prepare_batch,
    restore_probs,
    token_classes,
    trace,
    trace_batch,
)

TOL = 1e-5
SEQ, SUBJECT = 6, (1, 3)
CFG = TraceConfig(n_samples=3, window=2, position_buckets=2)


def _amplified(config, factor=3.0):
    """Larger-than-default weights so that restorations move the probabilities visibly."""
    m = ji.init(config, 0)
    big = lambda path, p: p * factor if getattr(path[-1], "key", None) in ("kernel", "embed", "pos_embed") else p  # noqa: E731
    return m.replace(params=jax.tree_util.tree_map_with_path(big, m.params))


@pytest.fixture(scope="module")
def model():
    return _amplified(GPT2Config.tiny(n_layers=3, vocab_size=97))


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(1).integers(0, 97, SEQ)


@pytest.fixture(scope="module")
def sigma(model, tokens):
    return embedding_sigma(model, [tokens[SUBJECT[0]:SUBJECT[1]]])


@functools.partial(jax.jit, static_argnames=("site", "freeze_site"))
def _one_forward(model, batch, delta, answer, restore, frozen, bad_cache, *, site, freeze_site):
    """[clean; corrupted] rows; clean row 0 copied into rows 1.. where restore[l, t] (reference way)."""
    n_layers = model.config.n_layers
    rows = jnp.arange(batch.shape[0])[:, None] > 0
    ivs = {"embed": ji.Add(delta)}
    for j in range(n_layers):
        sel = (rows & restore[j][None])[:, :, None]
        ivs[f"blocks.{j}.{site}"] = lambda x, sel=sel: jnp.where(sel, x[:1], x)
        if freeze_site is not None:
            fsel = (rows & frozen[j][None])[:, :, None]
            ivs[f"blocks.{j}.{freeze_site}"] = lambda x, fsel=fsel, v=bad_cache[j]: jnp.where(fsel, v, x)
    logits = ji.run(model, batch, interventions=ivs).logits
    return jax.nn.softmax(logits[1:, -1], axis=-1)[:, answer].mean()


def loop_table(model, tokens, corruption, answer, kind, window, freeze=None):
    """One forward per (t, l) cell, written as plainly as possible."""
    n_layers, seq = model.config.n_layers, len(tokens)
    batch = jnp.concatenate([jnp.asarray(tokens)[None], corruption.tokens]).astype(jnp.int32)
    delta = jnp.concatenate([jnp.zeros_like(corruption.delta[:1]), corruption.delta])
    bad_cache = None
    if freeze is not None:  # pass 1: corrupted values of the frozen site (clean row included)
        cache = ji.run(model, batch, capture=f"blocks.*.{freeze}", interventions={"embed": ji.Add(delta)}).cache
        bad_cache = jnp.stack([cache[f"blocks.{j}.{freeze}"] for j in range(n_layers)])
    table = np.zeros((seq, n_layers))
    for t in range(seq):
        for l in range(n_layers):
            restore = np.zeros((n_layers, seq), bool)
            restore[list(layer_window(l, window, n_layers)), t] = True
            frozen = np.zeros((n_layers, seq), bool)
            frozen[l + 1:, t] = True
            table[t, l] = _one_forward(model, batch, delta, answer, restore, frozen, bad_cache, site=kind,
                                       freeze_site=freeze)
    return table


@pytest.mark.parametrize("kind,engine", [("resid_post", "full"), ("resid_post", "incremental"),
                                         ("mlp_out", "incremental"),
                                         pytest.param("attn_out", "incremental", marks=pytest.mark.slow),
                                         pytest.param("mlp_out", "full", marks=pytest.mark.slow)])
def test_sweep_matches_loop(model, tokens, sigma, kind, engine):
    cfg = TraceConfig(n_samples=3, window=2, position_buckets=2, engine=engine)
    res = trace(model, tokens, SUBJECT, kind=kind, sigma=sigma, config=cfg)
    corr = gaussian_corruption(model, tokens, SUBJECT, sigma, cfg)
    ref = loop_table(model, tokens, corr, res.answer, kind, res.window)
    assert res.probs.shape == (SEQ, model.config.n_layers)
    np.testing.assert_allclose(res.probs, ref, atol=TOL, rtol=0)
    assert np.ptp(ref) > 1e-3, "the toy must make restorations matter, else the test cannot fail"
    assert res.window == (1 if kind == "resid_post" else 2)


def _family_model(name):
    from jaxinterp.models.gpt_neox import GPTNeoXConfig
    from jaxinterp.models.llama import LlamaConfig
    from jaxinterp.models.mamba import MambaConfig

    small = dict(vocab_size=97, n_layers=3)
    config = {
        "neox-parallel": lambda: GPTNeoXConfig.tiny(**small, d_model=32, d_mlp=64),
        "neox-sequential": lambda: GPTNeoXConfig.tiny(**small, d_model=32, d_mlp=64, parallel_residual=False),
        "llama-gqa": lambda: LlamaConfig.llama_tiny(**small, d_model=32, d_mlp=48),
        "mistral-window": lambda: LlamaConfig.mistral_tiny(**small, d_model=32, d_mlp=48, sliding_window=3),
        "mamba": lambda: MambaConfig.tiny(**small, d_model=32),
    }[name]()
    return _amplified(config, {"mamba": 5.0, "neox-parallel": 6.0, "neox-sequential": 6.0}.get(name, 3.0))


@pytest.mark.parametrize("name,kind", [
    ("neox-parallel", "resid_post"), ("neox-sequential", "mlp_out"), ("llama-gqa", "resid_post"),
    ("llama-gqa", "attn_out"), ("mistral-window", "mlp.post"), ("mamba", "resid_post"), ("mamba", "mixer_out"),
    ("mamba", "mixer.ssm_in")])
def test_incremental_engine_matches_loop_on_every_family(tokens, name, kind):
    """The incremental engine (each family's own stepper) equals one full forward per cell."""
    model = _family_model(name)
    sigma = embedding_sigma(model, [tokens[SUBJECT[0]:SUBJECT[1]]])
    cfg = TraceConfig(n_samples=3, window=2, position_buckets=2, engine="incremental")
    res = trace(model, tokens, SUBJECT, kind=kind, sigma=sigma, config=cfg)
    ref = loop_table(model, tokens, gaussian_corruption(model, tokens, SUBJECT, sigma, cfg), res.answer, kind,
                     res.window)
    np.testing.assert_allclose(res.probs, ref, atol=TOL, rtol=0)
    assert np.ptp(ref) > 1e-3, "the toy must make restorations matter, else the test cannot fail"


def test_severed_matches_loop(model, tokens, sigma):
    res = trace(model, tokens, SUBJECT, kind="resid_post", freeze="mlp_out", sigma=sigma, config=CFG)
    corr = gaussian_corruption(model, tokens, SUBJECT, sigma, CFG)
    ref = loop_table(model, tokens, corr, res.answer, "resid_post", 1, freeze="mlp_out")
    np.testing.assert_allclose(res.probs, ref, atol=TOL, rtol=0)
    plain = trace(model, tokens, SUBJECT, kind="resid_post", sigma=sigma, config=CFG)
    assert np.abs(plain.probs - res.probs).max() > 1e-4  # severing changes something


def test_restore_all_and_nothing(model, tokens, sigma):
    corr = gaussian_corruption(model, tokens, SUBJECT, sigma, CFG)
    n_layers = model.config.n_layers
    masks = np.stack([np.ones((n_layers, SEQ), bool), np.zeros((n_layers, SEQ), bool)])
    probs, p_clean, p_corrupt, _ = restore_probs(model, tokens, corr, masks, kind="resid_post")
    assert abs(p_clean - p_corrupt) > 1e-3
    np.testing.assert_allclose(probs[0], p_clean, atol=1e-6, rtol=0)
    np.testing.assert_allclose(probs[1], p_corrupt, atol=1e-6, rtol=0)
    # Direct reference for p_clean / p_corrupt.
    logits = ji.run(model, np.asarray(tokens)[None]).logits[0, -1]
    answer = int(jnp.argmax(logits))
    assert abs(float(jax.nn.softmax(logits)[answer]) - float(p_clean)) < 1e-6
    bad = ji.run(model, corr.tokens, interventions={"embed": ji.Add(corr.delta)}).logits[:, -1]
    assert abs(float(jax.nn.softmax(bad)[:, answer].mean()) - float(p_corrupt)) < 1e-6


def test_rows_before_subject_equal_p_corrupt(model, tokens, sigma):
    res = trace(model, tokens, SUBJECT, kind="resid_post", sigma=sigma, config=CFG)
    np.testing.assert_allclose(res.probs[: SUBJECT[0]], res.p_corrupt, atol=1e-7)
    # Restoring the last layer at the last token recovers the clean probability exactly.
    assert abs(res.probs[-1, -1] - res.p_clean) < 1e-6


def test_explicit_noise_and_default_seed(model, tokens, sigma):
    noise = np.random.RandomState(1).randn(3, SUBJECT[1] - SUBJECT[0], model.config.d_model)
    a = gaussian_corruption(model, tokens, SUBJECT, sigma, CFG)
    b = gaussian_corruption(model, tokens, SUBJECT, sigma, CFG, noise=noise)
    np.testing.assert_array_equal(a.delta, b.delta)
    np.testing.assert_allclose(a.delta[:, SUBJECT[0]:SUBJECT[1]], 3 * sigma * noise, rtol=1e-6)
    assert float(jnp.abs(a.delta[:, : SUBJECT[0]]).max()) == 0 and float(jnp.abs(a.delta[:, SUBJECT[1]:]).max()) == 0
    with pytest.raises(ValueError, match="noise must have shape"):
        gaussian_corruption(model, tokens, SUBJECT, sigma, CFG, noise=noise[:, :1])


def test_alt_subject_engines_agree(model, tokens):
    alts = [[5, 6], [7, 8], [9, 10]]
    full = trace(model, tokens, SUBJECT, kind="resid_post", alt_subjects=alts, config=TraceConfig(
        n_samples=3, engine="full"))
    inc = trace(model, tokens, SUBJECT, kind="resid_post", alt_subjects=alts, config=CFG)
    np.testing.assert_allclose(inc.probs, full.probs, atol=TOL)
    corr = alt_subject_corruption(model, tokens, SUBJECT, alts)
    assert corr.tokens[1].tolist() == [tokens[0], 7, 8, *tokens[3:]]
    logits = ji.run(model, corr.tokens).logits[:, -1]
    assert abs(float(jax.nn.softmax(logits)[:, inc.answer].mean()) - inc.p_corrupt) < 1e-6
    with pytest.raises(ValueError, match="has 3 tokens"):
        alt_subject_corruption(model, tokens, SUBJECT, [[1, 2, 3]])


def test_batch_equals_single(model, sigma):
    toks = np.random.default_rng(3).integers(0, 97, (2, SEQ))
    spans = [(1, 3), (2, 4)]
    batch = trace_batch(model, toks, spans, kind="resid_post", sigma=sigma, config=CFG)
    for i, span in enumerate(spans):
        one = trace(model, toks[i], span, kind="resid_post", sigma=sigma, config=CFG)
        np.testing.assert_allclose(batch[i].probs, one.probs, atol=TOL)
        assert batch[i].p_clean == pytest.approx(one.p_clean, abs=1e-6)


def test_prepare_batch_plan_table_equals_trace(model, sigma):
    """The public per-prompt entry (used by the sharded runner): plan.table of one prompt == trace()."""
    toks = np.random.default_rng(4).integers(0, 97, (2, SEQ))
    spans = [(1, 3), (2, 4)]
    batch = prepare_batch(model, toks, spans, kind="mlp_out", sigma=sigma, answers=[5, -1], config=CFG)
    assert batch.plan.skip_before == 1 and batch.plan.window == CFG.window and batch.corruption.tokens.shape == (
        2, CFG.n_samples, SEQ)
    table = jax.jit(batch.plan.table)
    for i, span in enumerate(spans):
        corr = ji.patching.Corruption(batch.corruption.tokens[i], batch.corruption.delta[i])
        probs, p_clean, p_corrupt, ans = table(model, jnp.asarray(batch.tokens[i]), corr, batch.answers[i])
        one = trace(model, toks[i], span, kind="mlp_out", sigma=sigma, answer=[5, None][i], config=CFG)
        np.testing.assert_allclose(np.asarray(probs)[span[0]:], one.probs[span[0]:], atol=TOL)
        assert float(p_corrupt) == pytest.approx(one.p_corrupt, abs=1e-6) and int(ans) == one.answer
    with pytest.raises(ValueError, match="one list per prompt"):
        prepare_batch(model, toks, spans, alt_subjects=[[[1, 2]]], config=CFG)
    with pytest.raises(ValueError, match="one token id per prompt"):
        prepare_batch(model, toks, spans, sigma=sigma, answers=[1, 2, 3], config=CFG)


def test_embedding_sigma_is_token_embedding_std(model):
    subs = [[1, 2, 3], [4]]
    rows = np.asarray(model.params["embed"])[[1, 2, 3, 4]]
    assert embedding_sigma(model, subs) == pytest.approx(rows.std(ddof=1), rel=1e-6)


def test_token_classes_and_aie():
    assert token_classes((1, 4), 8) == {"first_subject": [1], "middle_subject": [2], "last_subject": [3],
                                        "first_subsequent": [4], "further": [5, 6], "last": [7]}
    assert token_classes((0, 1), 3)["first_subsequent"] == [1] and token_classes((0, 2), 3)["first_subsequent"] == []
    from jaxinterp.patching import TraceResult

    probs = np.arange(8 * 2, dtype=float).reshape(8, 2)
    r = TraceResult(probs, 20.0, 1.0, 0, "resid_post", (1, 4), 1)
    aie = average_indirect_effect([r, r])
    assert aie["classes"]["further"] == [(10 + 12) / 2 - 1, (11 + 13) / 2 - 1]
    assert aie["classes"]["last"] == [13.0, 14.0] and aie["n"]["middle_subject"] == 2


def test_bad_inputs(model, tokens, sigma):
    with pytest.raises(ValueError, match="unknown trace kind 'mlp'.*mlp_out"):
        trace(model, tokens, SUBJECT, kind="mlp", sigma=sigma, config=CFG)
    with pytest.raises(ValueError, match="subject span"):
        trace(model, tokens, (4, 2), sigma=sigma, config=CFG)
    with pytest.raises(ValueError, match="needs sigma"):
        trace(model, tokens, SUBJECT, config=CFG)
    with pytest.raises(ValueError, match="engine must be one of"):
        TraceConfig(engine="fast")
