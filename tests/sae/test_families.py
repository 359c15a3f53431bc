"""Each SAE family's loss and gradients against independent formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp.sae import FAMILIES, Hparams, init_sae
from jaxinterp.sae.families import lp_penalty

D, F, B = 6, 10, 32


def _sae(family, k=3):
    sae = init_sae(family, jax.random.PRNGKey(1), D, F, k=k, k_max=4, input_scale=0.7)
    r = np.random.default_rng(2)
    p = {name: jnp.asarray(v + 0.3 * r.normal(size=v.shape), jnp.float32) for name, v in sae.params.items()}
    if family == "jumprelu":
        p["log_threshold"] = jnp.asarray(np.log(r.uniform(0.05, 0.6, F)), jnp.float32)
    return sae.replace(params=p)


def _x():
    return jnp.asarray(np.random.default_rng(3).normal(size=(B, D)) * 1.5, jnp.float32)


HP = Hparams.make(sparsity_coeff=0.07, p=0.6, bandwidth=0.4)


def ref_loss(family, p, x, k=3):
    """Independent plain-jnp formulas of each family's training loss (no aux terms)."""
    xn = x * 0.7
    pre = (xn - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    lam = 0.07
    if family in ("relu", "panneal"):
        f = jnp.maximum(pre, 0)
        expo = 1.0 if family == "relu" else 0.6
        pen = lam * jnp.sum(jnp.where(f > 0, jnp.where(f > 0, f, 1) ** expo, 0), -1).mean()
    elif family == "topk":
        r = jnp.maximum(pre, 0)
        kth = jnp.sort(r, -1)[:, -k][:, None]
        f = jnp.where(r >= kth, r, 0)
        pen = 0.0
    elif family == "batchtopk":
        r = jnp.maximum(pre, 0)
        kth = jnp.sort(r.ravel())[-k * B]
        f = jnp.where(r >= kth, r, 0)
        pen = 0.0
    elif family == "gated":
        mag = jnp.maximum((xn - p["b_dec"]) @ (p["W_enc"] * jnp.exp(p["r_mag"])) + p["b_mag"], 0)
        f = jnp.where(pre > 0, mag, 0)
        gate = jnp.maximum(pre, 0)
        wd, bd = jax.lax.stop_gradient(p["W_dec"]), jax.lax.stop_gradient(p["b_dec"])
        pen = lam * gate.sum(-1).mean() + jnp.sum((xn - gate @ wd - bd) ** 2, -1).mean()
    x_hat = f @ p["W_dec"] + p["b_dec"]
    return jnp.sum((xn - x_hat) ** 2, -1).mean() + pen


@pytest.mark.parametrize("family", ["relu", "panneal", "topk", "batchtopk", "gated"])
def test_loss_and_grads_match_reference(family):
    sae, x = _sae(family), _x()
    loss_fn = lambda p: sae.replace(params=p).loss(x, HP)[0]
    ref = lambda p: ref_loss(family, p, x)
    np.testing.assert_allclose(loss_fn(sae.params), ref(sae.params), rtol=1e-5)
    g, g_ref = jax.grad(loss_fn)(sae.params), jax.grad(ref)(sae.params)
    for name in g_ref:
        np.testing.assert_allclose(g[name], g_ref[name], rtol=1e-4, atol=1e-5, err_msg=f"{family} d/d{name}")


def test_jumprelu_loss_and_straight_through_grads():
    sae, x = _sae("jumprelu"), _x()
    p = {k: np.asarray(v, np.float64) for k, v in sae.params.items()}
    xn = np.asarray(x, np.float64) * 0.7
    theta, eps, lam = np.exp(p["log_threshold"]), 0.4, 0.07
    pre = (xn - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    on = pre > theta
    f = pre * on
    err = xn - (f @ p["W_dec"] + p["b_dec"])
    loss = np.sum(err ** 2, -1).mean() + lam * on.sum(-1).mean()
    # Rajamanoharan et al. 2024: d f/d theta = -(theta/eps) K, d H/d theta = -(1/eps) K, K rectangle
    kern = (np.abs((pre - theta) / eps) < 0.5) / eps
    d_f = -2 * err @ p["W_dec"].T / B  # dMSE/df  [B, F]
    d_theta = (d_f * (-theta * kern)).sum(0) + lam * (-kern).sum(0) / B
    d_pre = d_f * on
    d_w_enc = (xn - p["b_dec"]).T @ d_pre
    out, aux = sae.loss(x, HP)
    np.testing.assert_allclose(out, loss, rtol=1e-5)
    g = jax.grad(lambda q: sae.replace(params=q).loss(x, HP)[0])(sae.params)
    np.testing.assert_allclose(g["log_threshold"], d_theta * theta, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g["W_enc"], d_w_enc, rtol=1e-4, atol=1e-6)
    assert kern.sum() > 0  # the test exercises the kernel


def test_lp_penalty_and_zero_gradient_at_zero():
    f = jnp.array([[0.0, 0.5, 2.0]])
    np.testing.assert_allclose(lp_penalty(f, jnp.float32(0.5)), [np.sqrt(0.5) + np.sqrt(2.0)], rtol=1e-6)
    g = jax.grad(lambda a: lp_penalty(a, jnp.float32(0.3)).sum())(f)
    assert np.isfinite(np.asarray(g)).all() and g[0, 0] == 0


def test_auxk_uses_only_dead_latents():
    sae, x = _sae("topk"), _x()
    hp = Hparams.make(aux_coeff=1.0, aux_k=2, dead_tokens=5)
    assert float(sae.loss(x, hp)[1]["auxk"]) == 0.0  # nobody dead yet
    dead = np.zeros(F, np.int32)
    dead[[1, 4, 7]] = 10
    sae = sae.replace(buffers={**sae.buffers, "fired_ago": jnp.asarray(dead)})
    _, aux = sae.loss(x, hp)
    xn = x * 0.7
    p = sae.params
    pre = np.asarray((xn - p["b_dec"]) @ p["W_enc"] + p["b_enc"])
    r = np.where(dead >= 5, np.maximum(pre, 0), 0)
    kth = np.sort(r, -1)[:, -2][:, None]
    z = np.where((r >= kth) & (r > 0), r, 0)
    f = np.asarray(sae.train_acts(xn, hp)[0])
    e = np.asarray(xn) - (f @ np.asarray(p["W_dec"]) + np.asarray(p["b_dec"]))
    want = np.sum((e - z @ np.asarray(p["W_dec"])) ** 2, -1).mean() / np.sum(e ** 2, -1).mean()
    np.testing.assert_allclose(aux["auxk"], want, rtol=1e-4)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_encode_decode_raw_units(family):
    sae, x = _sae(family), _x()
    f = sae.encode(x)
    assert f.shape == (B, F) and (f >= 0).all()
    xn = x * 0.7
    np.testing.assert_allclose(sae.decode(f), (f @ sae.params["W_dec"] + sae.params["b_dec"]) / 0.7, rtol=1e-5)


def test_bad_family_and_k():
    with pytest.raises(ValueError, match="unknown SAE family 'l2'.*batchtopk"):
        init_sae("l2", jax.random.PRNGKey(0), 4, 8)
    with pytest.raises(ValueError, match="k <= k_max"):
        init_sae("topk", jax.random.PRNGKey(0), 4, 8, k=9)
