"""Sparse TopK / BatchTopK training path (decode from the kept latents only) against the dense path.

The dense path is itself checked against independent formulas in ``test_families.py``; here
the sparse path must give the same loss, metrics and gradients, and the same SAEs after
optimiser steps (single SAE and vmapped grid, AuxK active).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp.sae import Hparams, SAETrainConfig, SAETrainer, init_sae
from jaxinterp.sae.families import SPARSE_MIN_RATIO

D, F, B = 6, 40, 32


def _sae(family, dead):
    sae = init_sae(family, jax.random.PRNGKey(1), D, F, k=3, k_max=4, input_scale=0.7)
    r = np.random.default_rng(2)
    p = {name: jnp.asarray(v + 0.3 * r.normal(size=v.shape), jnp.float32) for name, v in sae.params.items()}
    fired_ago = np.zeros(F, np.int32)
    if dead:
        fired_ago[::3] = 100
    return sae.replace(params=p, buffers={**sae.buffers, "fired_ago": jnp.asarray(fired_ago)})


X = jnp.asarray(np.random.default_rng(3).normal(size=(B, D)) * 1.5, jnp.float32)
HP = Hparams.make(aux_coeff=0.5, aux_k=5, dead_tokens=50)


@pytest.mark.parametrize("family", ["topk", "batchtopk"])
@pytest.mark.parametrize("dead", [False, True])
def test_sparse_loss_metrics_and_grads_equal_dense(family, dead):
    sae = _sae(family, dead)
    results = {}
    for sparse in (False, True):
        s = sae.replace(sparse=sparse)
        assert s.sparse_training is sparse
        for any_dead in (None, jnp.asarray(dead)):  # AuxK unconditional, and behind the lax.cond
            fn = lambda q: s.replace(params=q).loss(X, HP, any_dead=any_dead)
            results[sparse, any_dead is None] = jax.jit(jax.value_and_grad(fn, has_aux=True))(s.params)
    (loss0, aux0), g0 = results[False, True]
    assert (float(aux0["auxk"]) > 0) == dead
    for key, ((loss, aux), g) in results.items():
        np.testing.assert_allclose(loss, loss0, rtol=1e-6, err_msg=str(key))
        for name in g0:
            np.testing.assert_allclose(g[name], g0[name], rtol=1e-5, atol=1e-6, err_msg=f"{key} d/d{name}")
        for name in ("mse", "auxk", "l0", "fired", "f") + (("min_kept",) if family == "batchtopk" else ()):
            np.testing.assert_allclose(aux[name], aux0[name], rtol=1e-6, atol=1e-7, err_msg=f"{key} {name}")


@pytest.mark.parametrize("family", ["topk", "batchtopk"])
def test_sparse_gradient_wrt_inputs(family):
    sae = _sae(family, dead=False)
    grads = [jax.jit(jax.grad(lambda x: sae.replace(sparse=s).loss(x, HP)[0]))(X) for s in (False, True)]
    np.testing.assert_allclose(grads[1], grads[0], rtol=1e-5, atol=1e-6)


def _batch(t, n=16, d=8, f=48):
    r = np.random.default_rng(1000 + t)
    dirs = np.random.default_rng(0).normal(size=(f, d))
    acts = (r.random((n, f)) < 0.1) * r.random((n, f))
    return (acts @ dirs + 0.05 * r.normal(size=(n, d)) + 0.3).astype(np.float32)


@pytest.mark.parametrize("family", ["topk", "batchtopk"])
@pytest.mark.parametrize("grid", [[{}], [{"k": 2, "seed": 0}, {"k": 5, "seed": 3}]], ids=["single", "grid"])
def test_sparse_training_equals_dense(family, grid):
    """Eight Adam steps (decoder projection + renorm, dead-latent counts, AuxK active from step 3 or 4)."""
    out = []
    for sparse in (False, True):
        cfg = SAETrainConfig(family=family, d_in=8, d_sae=48, steps=8, lr=1e-3, lr_warmup_steps=1, k=4,
                             dead_tokens=32, aux_k=4, sparse=sparse)
        trainer = SAETrainer({"r": (cfg, grid)})
        states, hist = trainer.fit(trainer.init(np.concatenate([_batch(-i) for i in range(1, 5)])), _batch, progress=False, log_every=1)
        assert bool(states["r"].sae.sparse_training) is sparse
        out.append((states, hist))
    (a, hist_a), (b, hist_b) = out
    assert max(h["r"]["auxk"][0] for h in hist_a) > 0 and max(h["r"]["dead_frac"][0] for h in hist_a) > 0
    # Adam's first update is ~lr * sign(g): a latent whose step-0 gradient is a near-cancelling ~1e-8
    # (seen: batchtopk, 1.5e-8 vs 1.4e-8 for one column) turns rounding into up to ~6e-5 = 0.06 lr,
    # which later steps carry along. A wrong gradient would move a latent by ~lr per step (1e-3);
    # the tight gradient equality is test_sparse_loss_metrics_and_grads_equal_dense's job.
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-4, err_msg=f"{family} {path}")
    for ma, mb in zip(hist_a, hist_b, strict=True):
        for name in ("loss", "mse", "l0", "auxk", "dead_frac"):
            np.testing.assert_allclose(ma["r"][name], mb["r"][name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_auto_choice_and_bad_flags():
    k_max = 4
    small = init_sae("topk", jax.random.PRNGKey(0), 4, SPARSE_MIN_RATIO * k_max, k=2, k_max=k_max)
    assert small.sparse is None and small.sparse_training  # d_sae = ratio x k_max: sparse
    big_k = init_sae("batchtopk", jax.random.PRNGKey(0), 4, SPARSE_MIN_RATIO * k_max - 1, k=2, k_max=k_max)
    assert not big_k.sparse_training
    assert init_sae("topk", jax.random.PRNGKey(0), 4, 64, k=2, sparse=False).sparse_training is False
    assert not init_sae("relu", jax.random.PRNGKey(0), 4, 64).sparse_training
    with pytest.raises(ValueError, match="sparse=True needs family in.*topk.*'relu'"):
        init_sae("relu", jax.random.PRNGKey(0), 4, 64, sparse=True)
    with pytest.raises(ValueError, match="sparse=True needs family in.*'gated'"):
        SAETrainConfig(family="gated", d_in=4, d_sae=64, sparse=True)
