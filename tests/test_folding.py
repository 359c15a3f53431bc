"""Layer-norm folding: equal logits, sites on the folded basis, refusals where folding is not valid."""

import numpy as np
import pytest

import jaxinterp as ji
from jaxinterp.models.gpt2.config import GPT2Config
from jaxinterp.models.gpt_neox.config import GPTNeoXConfig
from jaxinterp.models.llama.config import LlamaConfig
from tests.test_attribution import _randomise

CONFIGS = {
    "gpt2-tied": GPT2Config.tiny(n_layers=3, vocab_size=60),
    "neox-parallel": GPTNeoXConfig.tiny(vocab_size=60),
    "neox-sequential": GPTNeoXConfig.tiny(vocab_size=60, parallel_residual=False),
    "llama-gqa": LlamaConfig.llama_tiny(vocab_size=60),
    "qwen2-tied": LlamaConfig.qwen2_tiny(vocab_size=60),
}
TOL = 1e-5  # float32 logits of magnitude ~3-15 (facts-gpt's own f32 rounding vs float64 is 4e-6)


def _pair(name, seed=0):
    model = _randomise(ji.init(CONFIGS[name], key=seed), seed + 1, scale=0.15)
    return model, ji.fold_layer_norm(model)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_folded_model_has_equal_logits(name):
    model, folded = _pair(name)
    tokens = np.random.default_rng(0).integers(0, 60, size=(3, 11))
    mask = np.ones((3, 11), bool)
    mask[1, :4] = False  # a left-padded row too
    a = np.asarray(model.run(tokens, attention_mask=mask).logits)
    b = np.asarray(folded.run(tokens, attention_mask=mask).logits)
    assert np.max(np.abs(a - b)) <= TOL and np.abs(a).max() > 2  # logits far from zero: a real comparison
    assert folded.config.arch.tie_embeddings is False
    if model.config.arch.tie_embeddings:
        assert model.config.tie_embeddings and not folded.config.tie_embeddings


@pytest.mark.parametrize("name", ["gpt2-tied", "llama-gqa"])
def test_folded_sites_are_on_the_folded_basis(name):
    model, folded = _pair(name, seed=3)
    tokens = np.random.default_rng(1).integers(0, 60, size=(2, 7))
    cache = folded.run(tokens, capture="all").cache
    layernorm = model.config.arch.norm == "layernorm"
    for i in range(model.config.n_layers):
        x = np.asarray(cache[f"blocks.{i}.resid_pre"], np.float64)
        if layernorm:  # writes are centred, so the stream is mean-free, and ln1 is (x - mean) / std
            assert np.abs(x.mean(-1)).max() < 1e-5
            pure = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + model.config.arch.norm_eps)
        else:
            pure = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + model.config.arch.norm_eps)
        np.testing.assert_allclose(cache[f"blocks.{i}.ln1"], pure, atol=1e-4)
        if layernorm:
            assert np.abs(np.asarray(cache[f"blocks.{i}.attn_out"]).mean(-1)).max() < 1e-5
            assert np.abs(np.asarray(cache[f"blocks.{i}.mlp_out"]).mean(-1)).max() < 1e-5
    # the unfolded model's resid_post minus its mean is the folded one (centring changes nothing else)
    if layernorm:
        orig = np.asarray(model.run(tokens, capture="blocks.1.resid_post").cache["blocks.1.resid_post"])
        np.testing.assert_allclose(cache["blocks.1.resid_post"], orig - orig.mean(-1, keepdims=True), atol=1e-4)


@pytest.mark.parametrize("name", ["gpt2-tied", "neox-parallel", "qwen2-tied"])
def test_direct_logit_attribution_is_the_same_after_folding(name):
    model, folded = _pair(name, seed=5)
    tokens = np.random.default_rng(2).integers(0, 60, size=(2, 6))
    a = ji.attribution.direct_logit_attribution(model, tokens, np.array([3, 4]))
    b = ji.attribution.direct_logit_attribution(folded, tokens, np.array([3, 4]))
    for field in ("embed", "attn", "mlp", "heads", "bias", "logit"):
        np.testing.assert_allclose(getattr(a, field), getattr(b, field), atol=1e-4, err_msg=field)


def test_facts_gpt_folds_with_equal_logits():
    model = ji.load("facts-gpt")
    folded = ji.fold_layer_norm(model)
    tokens, mask = model.to_tokens(["Bren qua wyn prefers the color", "Lur el"])
    diff = np.abs(np.asarray(model.run(tokens, attention_mask=mask).logits)
                  - np.asarray(folded.run(tokens, attention_mask=mask).logits))
    assert diff.max() <= TOL


def test_fold_refusals():
    neox = _randomise(ji.init(GPTNeoXConfig.tiny(vocab_size=60, attention_bias=False), key=0), 1)
    with pytest.raises(ValueError, match="ln1 has a bias but attn.q has none"):
        ji.fold_layer_norm(neox)
    with pytest.raises(ValueError, match="centre=True needs LayerNorm readers; rmsnorm"):
        ji.fold_layer_norm(ji.init(CONFIGS["llama-gqa"], key=0), centre=True)
    from jaxinterp.models.mamba.config import MambaConfig

    with pytest.raises(ValueError, match="fold_layer_norm needs a transformer"):
        ji.fold_layer_norm(ji.init(MambaConfig.tiny(vocab_size=40, d_model=16), key=0))
