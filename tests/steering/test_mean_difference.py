"""ji.steering.mean_difference against a direct computation (one unpadded run per example), and
its bad input."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import jaxinterp as ji
from jaxinterp.models.gpt2 import GPT2Config
from jaxinterp.models.mamba import MambaConfig

VOCAB = 61


@pytest.fixture(scope="module", params=["gpt2", "mamba"])
def model(request):
    if request.param == "gpt2":
        return ji.init(GPT2Config(vocab_size=VOCAB, max_seq_len=64, d_model=32, n_layers=2, n_heads=4, d_mlp=64),
                       key=1)
    return ji.init(MambaConfig(vocab_size=VOCAB, d_model=32, n_layers=2, d_state=4, d_conv=4), key=2)


def _examples(seed, lengths):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, n).tolist() for n in lengths]


def _direct(model, examples, site):
    """(mean over examples of the site at the last token, of its mean over the tokens): one unpadded
    run per example."""
    last, mean = [], []
    capture = jax.jit(lambda m, tokens: ji.run(m, tokens, capture=site).cache[site][0])  # [T, ...]
    for ex in examples:
        acts = np.asarray(capture(model, jnp.asarray([ex])), np.float64)
        last.append(acts[-1])
        mean.append(acts.mean(0))
    return np.mean(last, 0), np.mean(mean, 0)


def _check(model, site, positive, negative, batch_size, width):
    (pl, pm), (nl, nm) = _direct(model, positive, site), _direct(model, negative, site)
    for position, want in (("last", pl - nl), ("mean", pm - nm)):
        got = ji.steering.mean_difference(model, positive, negative, site, position=position, batch_size=batch_size)
        assert got.shape == width and got.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
        assert float(jnp.abs(got).max()) > 1e-3  # a real difference, not zeros


def test_mean_difference_equals_a_direct_computation(model):
    # ragged and unpaired; batch_size 2 splits the positives into two batches (padding inside each)
    positive, negative = _examples(0, (3, 9, 3)), _examples(1, (9, 3))
    _check(model, "blocks.0.resid_post", positive, negative, 2, (32,))  # stop_at=1: the run stops early


def test_bad_input(model):
    ex = _examples(7, (3, 4))
    cases = [
        (dict(positive=ex, negative=ex, site="blocks.*.resid_post"), "one site name"),
        (dict(positive=[], negative=ex, site="blocks.0.resid_post"), "positive must be a non-empty list"),
        (dict(positive=ex, negative="text", site="blocks.0.resid_post"), "negative must be a non-empty list"),
        (dict(positive=ex, negative=ex, site="blocks.0.resid_post", position="first"), "position must be one of"),
    ]
    if model.family != "mamba":
        cases.append((dict(positive=ex, negative=ex, site="blocks.0.attn.pattern"), "per-position sites"))
    for kwargs, words in cases:
        with pytest.raises(ValueError, match=words):
            ji.steering.mean_difference(model, **kwargs)
    with pytest.raises(ValueError, match="unknown site 'blocks.0.no_such'"):
        ji.steering.mean_difference(model, ex, ex, "blocks.0.no_such")
