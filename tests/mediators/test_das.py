"""Interchange interventions and DAS against direct computations on a tiny random GPT-2: the full
space is full patching, a k-dim interchange is x + RᵀR(s - x), an SAE-latent swap is
x + (f_j(s) - f_j(x)) d_j, IIA equals a plain per-pair loop, the trained rotation stays orthonormal."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinterp as ji
from jaxinterp import mediators as M
from jaxinterp.models.gpt2.config import GPT2Config

V, T, N = 50, 6, 8
SITE = "blocks.0.resid_post"


@pytest.fixture(scope="module")
def setup():
    model = ji.init(GPT2Config.tiny(n_layers=2, vocab_size=V), key=3)
    rng = np.random.default_rng(0)
    base = rng.integers(1, V, (N, T)).astype(np.int32)
    source = rng.integers(1, V, (N, T)).astype(np.int32)
    mask = np.ones((N, T), bool)
    mask[:3, :2] = False  # left padding on a few rows
    b_at, s_at = rng.integers(2, T, N), rng.integers(2, T, N)
    # counterfactual labels: the source run's own answers (what full patching at the last layer gives)
    labels = np.asarray(jax.jit(lambda t: ji.run(model, t, logits_at=T - 1).logits.argmax(-1))(source))
    data = M.interchange_data(model, SITE, (base, mask, b_at), (source, np.ones((N, T), bool), s_at), labels)
    src_acts = np.asarray(M.capture(model, [SITE], source, np.ones((N, T), bool))[SITE])  # [N, T, D]
    return model, data, base, mask, b_at, s_at, src_acts, labels


@pytest.fixture(scope="module")
def direct(setup):
    """``direct(row_fn)``: logits at the last token, one pair at a time, with the site replaced by
    ``row_fn(i, x_i)`` through a plain ``Patch`` (two jitted programs shared by the tests)."""
    model, _, base, mask, *_ = setup
    acts = jax.jit(lambda t, m: ji.run(model, t, capture=SITE, attention_mask=m, stop_at=1).cache[SITE])
    patched = jax.jit(lambda t, m, v: ji.run(model, t, interventions={SITE: ji.Patch(v)}, attention_mask=m,
                                             logits_at=T - 1).logits)

    def loop(row_fn):
        out = []
        for i in range(len(base)):
            x = np.asarray(acts(base[i:i + 1], mask[i:i + 1]))[0]  # [T, D]
            out.append(np.asarray(patched(base[i:i + 1], mask[i:i + 1], jnp.asarray(row_fn(i, x)[None])))[0])
        return np.stack(out)  # [N, V]

    return loop


def test_full_space_is_full_patching(setup, direct):
    model, data, base, mask, b_at, s_at, src, labels = setup
    d = src.shape[-1]
    full = M.Subspace(M.orthonormal_rows(jax.random.normal(jax.random.key(0), (d, d))))  # a rotated full basis

    def patch(i, x):  # the source's vector replaces the base's at the base position
        x = x.copy()
        x[b_at[i]] = src[i, s_at[i]]
        return x

    ref = jax.nn.log_softmax(jnp.asarray(direct(patch)))
    pred, logp = M.predict(model, SITE, full, data)
    assert np.abs(logp - np.asarray(ref)[np.arange(N), labels]).max() < 1e-4
    assert (pred == np.asarray(ref).argmax(-1)).all()


def test_iia_and_interchange_match_a_plain_loop(setup, direct):
    model, data, base, mask, b_at, s_at, src, labels = setup
    d = src.shape[-1]
    sub = M.Subspace.random(jax.random.key(1), d, 3)
    r = np.asarray(sub.basis, np.float64)  # [3, D]

    def interchange(i, x):
        x = x.astype(np.float64).copy()
        s = src[i, s_at[i]].astype(np.float64)
        x[b_at[i]] += (s - x[b_at[i]]) @ r.T @ r
        return x.astype(np.float32)

    ref = direct(interchange)
    pred, logp = M.predict(model, SITE, sub, data, batch_size=5)  # 2 chunks, the last one wraps
    ref_logp = jax.nn.log_softmax(jnp.asarray(ref))[np.arange(N), labels]
    assert np.abs(logp - np.asarray(ref_logp)).max() < 1e-4
    assert (pred == ref.argmax(-1)).all()
    assert M.iia(model, SITE, sub, data) == pytest.approx(float(np.mean(ref.argmax(-1) == labels)))
    # a stack of single-neuron mediators (vmapped) = each neuron on its own
    stack = M.Subspace(jax.nn.one_hot(jnp.array([[0], [5]]), d))  # [2, 1, D]
    many = M.iia(model, SITE, stack, data, many=True)
    assert many.shape == (2,)
    assert many[1] == M.iia(model, SITE, M.Subspace.neurons(5, d), data)


def test_sae_feature_interchange_matches_direct(setup, direct):
    model, data, base, mask, b_at, s_at, src, _ = setup
    d = src.shape[-1]
    sae = ji.sae.init_sae("relu", jax.random.key(2), d, 16)
    sae = sae.replace(params={**sae.params, "b_enc": jnp.full((16,), 0.3)})
    j = 4
    enc = lambda v: np.asarray(sae.encode(jnp.asarray(v)))[..., j]
    direction = np.asarray(sae.params["W_dec"][j] / sae.buffers["input_scale"])

    def swap(i, x):
        x = x.copy()
        x[b_at[i]] += (enc(src[i, s_at[i]]) - enc(x[b_at[i]])) * direction
        return x

    ref = direct(swap)
    _, logp = M.predict(model, SITE, M.SAEFeature(sae, jnp.int32(j)), data)
    assert np.abs(logp - np.asarray(jax.nn.log_softmax(jnp.asarray(ref)))[np.arange(N), data.label]).max() < 1e-4


def test_das_rotation_stays_orthonormal_and_resumes(setup, tmp_path):
    model, data, *_ = setup
    cfg = M.DASConfig(k=4, steps=30, batch_size=8, lr=0.1)
    sub, history = M.train_das(model, SITE, data, cfg, directory=tmp_path / "das")
    r = np.asarray(sub.basis, np.float64)
    assert r.shape == (4, data.source.shape[-1])
    assert np.abs(r @ r.T - np.eye(4)).max() <= 1e-5
    assert history[-1]["loss"] < history[0]["loss"]
    again, _ = M.train_das(model, SITE, data, cfg, directory=tmp_path / "das")  # resumes at the end: same subspace
    assert np.array_equal(np.asarray(again.basis), np.asarray(sub.basis))


def test_bad_input_is_one_line(setup):
    model, data, *_ = setup
    cases = [
        (lambda: M.train_das(model, SITE, data, M.DASConfig(k=500)), "k=500 exceeds the width"),
        (lambda: M.iia(model, "blocks.0.resid_pots", M.Subspace.full(4), data), "unknown site"),
        (lambda: M.layer_site(model, 2), "layer 2 is outside the model: it has 2 layers"),
        (lambda: M.DASConfig(k=0), "DASConfig.k must be >= 1"),
    ]
    for fn, words in cases:
        with pytest.raises((ValueError, KeyError)) as err:
            fn()
        assert words in str(err.value) and "\n" not in str(err.value), str(err.value)
