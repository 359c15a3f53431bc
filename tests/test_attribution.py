"""Direct logit attribution: the credits sum to the model's own logit minus the bias no component writes."""

import numpy as np
import pytest

import jaxinterp as ji
from jaxinterp.models.gpt2.config import GPT2Config
from jaxinterp.models.gpt_neox.config import GPTNeoXConfig
from jaxinterp.models.llama.config import LlamaConfig

CONFIGS = {
    "gpt2": GPT2Config.tiny(n_layers=3, vocab_size=60),
    "neox-parallel": GPTNeoXConfig.tiny(vocab_size=60),
    "neox-sequential": GPTNeoXConfig.tiny(vocab_size=60, parallel_residual=False, n_layers=3),
    "llama-gqa": LlamaConfig.llama_tiny(vocab_size=60),
    "qwen2-tied": LlamaConfig.qwen2_tiny(vocab_size=60),
}


def _randomise(model, seed, scale=0.3):
    """Every parameter perturbed (norm gains and biases too), so no term hides behind a constant."""
    import jax

    leaves, tree = jax.tree_util.tree_flatten(model.params)
    rng = np.random.default_rng(seed)
    leaves = [np.asarray(p) + scale * rng.standard_normal(p.shape).astype(np.float32) for p in leaves]
    return model.replace(params=jax.tree_util.tree_unflatten(tree, leaves))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_dla_sums_to_logit_minus_bias(name):
    cfg = CONFIGS[name]
    model = _randomise(ji.init(cfg, key=1), 2)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 60, size=(3, 7))
    target = rng.integers(0, 60, size=3)
    dla = ji.attribution.direct_logit_attribution(model, tokens, target)
    logits = np.asarray(model.run(tokens).logits[:, -1])  # the model's own logits
    np.testing.assert_allclose(dla.logit, logits[np.arange(3), target], rtol=1e-5, atol=1e-5)
    # the bias, from the parameters: final-norm bias and head bias through the unembedding
    arch, p = cfg.arch, model.params
    w_u = np.asarray(p["embed"]).T if arch.tie_embeddings else np.asarray(p["lm_head"]["kernel"])
    bias = np.zeros(3)
    if arch.norm == "layernorm":
        bias += np.asarray(p["final_norm"]["bias"]) @ w_u[:, target]
    assert not arch.lm_head_bias
    np.testing.assert_allclose(dla.bias, bias, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dla.total(), logits[np.arange(3), target] - bias, rtol=1e-4, atol=1e-4)
    # heads add up to their layer (plus the output bias, which is zero where there is none)
    np.testing.assert_allclose(np.asarray(dla.heads).sum(-1) + dla.attn_bias, dla.attn, atol=1e-5)
    if not arch.o_bias:
        np.testing.assert_allclose(dla.attn_bias, 0.0, atol=1e-5)
    comps = dla.components()
    assert len(comps) == 1 + cfg.n_layers * (cfg.n_heads + 2)
    np.testing.assert_allclose(sum(np.asarray(v) for v in comps.values()), dla.total(), atol=1e-4)


def test_dla_one_head_by_hand():
    """One head's credit computed directly from its z, W_O and the frozen LayerNorm scale."""
    model = _randomise(ji.init(CONFIGS["gpt2"], key=4), 5)
    tokens = np.random.default_rng(1).integers(0, 60, size=(2, 6))
    out = model.run(tokens, capture=["blocks.1.attn.z", "blocks.2.resid_post"])
    z = np.asarray(out.cache["blocks.1.attn.z"])[:, -1]  # [B, H, Dh]
    x = np.asarray(out.cache["blocks.2.resid_post"])[:, -1]  # [B, D]
    w_o = np.asarray(model.params["layers"]["attn"]["o"]["kernel"][1]).reshape(4, 16, 64)
    head2 = z[:, 2] @ w_o[2]  # [B, D]
    sigma = np.sqrt(x.var(-1) + 1e-5)
    g = np.asarray(model.params["final_norm"]["scale"])
    e = np.asarray(model.params["embed"])
    target = np.array([5, 9])
    expect = np.einsum("bd,bd->b", (head2 - head2.mean(-1, keepdims=True)) / sigma[:, None] * g, e[target])
    dla = ji.attribution.direct_logit_attribution(model, tokens, target)
    np.testing.assert_allclose(np.asarray(dla.heads)[:, 1, 2], expect, rtol=1e-4, atol=1e-5)


def test_dla_logit_difference_and_positions():
    model = _randomise(ji.init(CONFIGS["llama-gqa"], key=6), 7)
    tokens = np.random.default_rng(2).integers(0, 60, size=(2, 8))
    a = ji.attribution.direct_logit_attribution(model, tokens, 3, minus=np.array([4, 5]), position=np.array([2, 6]))
    t3 = ji.attribution.direct_logit_attribution(model, tokens, 3, position=np.array([2, 6]))
    m = ji.attribution.direct_logit_attribution(model, tokens, np.array([4, 5]), position=np.array([2, 6]))
    np.testing.assert_allclose(a.mlp, np.asarray(t3.mlp) - np.asarray(m.mlp), atol=1e-5)
    logits = np.asarray(model.run(tokens).logits)
    np.testing.assert_allclose(a.logit, logits[[0, 1], [2, 6], 3] - logits[[0, 1], [2, 6], [4, 5]], atol=1e-5)


def test_dla_refuses_non_transformers_and_bad_targets():
    from jaxinterp.models.mamba.config import MambaConfig

    mamba = ji.init(MambaConfig.tiny(vocab_size=40, d_model=16), key=0)
    with pytest.raises(ValueError, match="needs a transformer"):
        ji.attribution.direct_logit_attribution(mamba, np.zeros((1, 3), np.int32), 1)
    model = ji.init(CONFIGS["gpt2"], key=0)
    with pytest.raises(ValueError, match=r"target token ids must lie in \[0, 60\)"):
        ji.attribution.direct_logit_attribution(model, np.zeros((1, 3), np.int32), 60)
