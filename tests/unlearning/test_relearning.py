"""Relearning attack and the ridge probe against direct computations."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxinterp as ji
from jaxinterp.models.gpt2 import GPT2Config
from jaxinterp.unlearning import metrics as um

CFG = GPT2Config.tiny(vocab_size=37, max_seq_len=32, n_layers=2)


@pytest.fixture(scope="module")
def model():
    return ji.init(CFG, 0)


def _batches(step: int) -> dict:
    rng = np.random.default_rng([5, step])
    tokens = rng.integers(3, 37, (3, 9)).astype(np.int32)
    valid = np.ones((3, 9), bool)
    valid[1, 6:] = False  # a shorter row: its padded tail is not trained on
    return {"tokens": tokens, "valid": valid}


def _direct_targets(batch):
    """(weight, target) [B, T]: weight 1 at t when tokens t and t + 1 are both valid, target = tokens[t + 1]."""
    tokens, valid = np.asarray(batch["tokens"]), np.asarray(batch["valid"])
    weight = np.zeros(tokens.shape, np.float32)
    targets = np.zeros(tokens.shape, np.int32)
    for b in range(tokens.shape[0]):
        for t in range(tokens.shape[1] - 1):
            if valid[b, t] and valid[b, t + 1]:
                weight[b, t], targets[b, t] = 1.0, tokens[b, t + 1]
    return weight, targets


@jax.jit
def _direct_grad(params, model, tokens, weight, targets):
    def loss(p):
        logp = jax.nn.log_softmax(model.replace(params=p).run(tokens).logits, -1)
        picked = jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
        return -(picked * weight).sum() / weight.sum()
    return jax.grad(loss)(params)


def test_relearning_attack_matches_direct_steps(model):
    lr = 0.05
    snapshots = um.relearning_attack(model, _batches, (0, 1, 3), lambda m: jax.device_get(m.params),
                                     optimizer=optax.sgd(lr))
    assert sorted(snapshots) == [0, 1, 3]
    # k = 0 is the model as given (no attack), and the input model is left unchanged
    for a, b in zip(jax.tree_util.tree_leaves(snapshots[0]), jax.tree_util.tree_leaves(model.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # k steps == k plain gradient steps on the direct loss of batches 0 .. k - 1
    params = model.params
    for step in range(3):
        batch = _batches(step)
        grads = _direct_grad(params, model.replace(params={}), batch["tokens"], *_direct_targets(batch))
        params = jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads)
        if step + 1 in snapshots:
            for a, b in zip(jax.tree_util.tree_leaves(snapshots[step + 1]), jax.tree_util.tree_leaves(params)):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                for a, b in zip(jax.tree_util.tree_leaves(snapshots[3]), jax.tree_util.tree_leaves(model.params)))
    assert moved > 1e-3
    with pytest.raises(ValueError, match="step counts"):
        um.relearning_attack(model, _batches, (-1,), lambda m: 0, optimizer=optax.sgd(lr))


def test_ridge_probe_equals_augmented_least_squares():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 6)), rng.integers(0, 3, 40)
    x_test = rng.normal(size=(7, 6))
    l2 = 0.1
    got = um.ridge_probe(x, y, x_test, 3, l2=l2)
    # the same objective as a plain least-squares problem with penalty rows (bias unpenalised)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    a = np.concatenate([(x - mu) / sd, np.ones((40, 1))], 1)
    pen = np.sqrt(l2 * 40) * np.eye(7)[:6]
    w = np.linalg.lstsq(np.concatenate([a, pen]), np.concatenate([np.eye(3)[y], np.zeros((6, 3))]), rcond=None)[0]
    np.testing.assert_allclose(got, np.concatenate([(x_test - mu) / sd, np.ones((7, 1))], 1) @ w, atol=1e-8)
    # a linearly readable label is read back on held-out points
    centers = rng.normal(size=(3, 6)) * 4
    labels = rng.integers(0, 3, 60)
    pts = centers[labels] + rng.normal(size=(60, 6))
    pred = um.ridge_probe(pts[:40], labels[:40], pts[40:], 3).argmax(1)
    assert (pred == labels[40:]).mean() > 0.9
