"""Splice of an identity dictionary recovers 100% of the loss; latent edits with the error term; metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinterp as ji
from jaxinterp.models.gpt2 import GPT2Config
from jaxinterp.sae import init_sae
from jaxinterp.sae.metrics import downstream_metrics, reconstruction_metrics
from jaxinterp.sae.splice import Splice


def _random_sae(family):
    sae = init_sae(family, jax.random.PRNGKey(0), 6, 12, k=3, input_scale=0.4)
    r = np.random.default_rng(1)
    p = {k: jnp.asarray(v + 0.2 * r.normal(size=v.shape), jnp.float32) for k, v in sae.params.items()}
    buffers = dict(sae.buffers)
    if family == "batchtopk":
        buffers["threshold"] = jnp.float32(0.3)
    return sae.replace(params=p, buffers=buffers)


def _identity_sae(d):
    """ReLU dictionary [I; -I]: relu(x) - relu(-x) = x exactly."""
    eye = jnp.eye(d, dtype=jnp.float32)
    sae = init_sae("relu", jax.random.PRNGKey(0), d, 2 * d)
    w_dec = jnp.concatenate([eye, -eye])  # [2D, D]
    return sae.replace(params={"W_enc": w_dec.T, "b_enc": jnp.zeros(2 * d), "W_dec": w_dec, "b_dec": jnp.zeros(d)})


def test_splice_identity_dictionary_recovers_all_loss():
    cfg = GPT2Config.tiny(vocab_size=23, d_model=16, n_layers=2, n_heads=2, d_mlp=32, max_seq_len=12)
    model = ji.init(cfg, 0)
    tokens = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (6, 12), 0, 23))
    site = "blocks.0.resid_post"
    sae = _identity_sae(16)
    out = downstream_metrics(model, tokens, site, sae, batch=4)
    assert abs(out["ce_zero"] - out["ce_clean"]) > 1e-3  # ablation changes the loss: the ratio is meaningful
    assert out["loss_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert out["kl"] == pytest.approx(0.0, abs=1e-6)
    acts = np.asarray(model.run(tokens, capture=site).cache[site]).reshape(-1, 16)
    rec = reconstruction_metrics(sae, acts)
    assert rec["fve"] == pytest.approx(1.0, abs=1e-6) and rec["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert rec["rel_recon_bias"] == pytest.approx(1.0, abs=1e-6)


def test_splice_latent_edit_with_error_term_and_reference_metrics():
    sae = _random_sae("relu")
    x = jnp.asarray(np.random.default_rng(5).normal(size=(3, 4, 6)), jnp.float32)
    assert np.allclose(Splice(sae, add_error=True).apply(x), x, atol=1e-5)  # error term restores x
    scale = jnp.ones(12).at[3].set(0.0)
    edited = Splice(sae, latent_scale=scale, add_error=True).apply(x)
    f = sae.encode(x)
    want = x - f[..., 3:4] * sae.params["W_dec"][3] / sae.buffers["input_scale"]
    np.testing.assert_allclose(edited, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="d_in=6"):
        Splice(sae).validate(jnp.zeros((2, 5)), "blocks.0.resid_post")
    # metrics against direct numpy formulas
    xs = np.asarray(x.reshape(-1, 6))
    rec = reconstruction_metrics(sae, xs, batch=5)
    xh = np.asarray(sae(jnp.asarray(xs)))
    fs = np.asarray(sae.encode(jnp.asarray(xs)))
    assert rec["l0"] == pytest.approx((fs != 0).sum(1).mean(), rel=1e-6)
    assert rec["mse"] == pytest.approx(((xs - xh) ** 2).sum(1).mean(), rel=1e-5)
    assert rec["fve"] == pytest.approx(1 - ((xs - xh) ** 2).sum() / ((xs - xs.mean(0)) ** 2).sum(), rel=1e-5)
    assert rec["rel_recon_bias"] == pytest.approx((xh ** 2).sum() / (xh * xs).sum(), rel=1e-5)
    assert rec["dead_frac"] == pytest.approx(np.mean((fs != 0).sum(0) == 0))
