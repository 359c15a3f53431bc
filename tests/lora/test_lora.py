"""LoRA as a parameter-tree transform: identity at init, merged == adapter, gradients only
into adapters, direct reference computation, PEFT export round trip."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinterp as ji
from jaxinterp import lora
from jaxinterp.models.gpt2 import GPT2Config

CFG = GPT2Config.tiny(vocab_size=97, max_seq_len=32, n_layers=3)


@pytest.fixture(scope="module")
def model():
    return ji.init(CFG, 0)


def _randomise_b(lm, seed=1, scale=0.05):
    """Non-zero B so that the adapters change the output."""
    key = jax.random.PRNGKey(seed)
    weights = {}
    for i, (name, w) in enumerate(sorted(lm.lora.weights.items())):
        weights[name] = {"A": w["A"], "B": scale * jax.random.normal(jax.random.fold_in(key, i), w["B"].shape)}
    return lora.combine(lm.lora.replace(weights), lm.base)


def _tokens(b=2, t=11, seed=0):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, (b, t))


@pytest.mark.parametrize("mode", ["merged", "unmerged"])
def test_identity_at_init(model, mode):
    lm = lora.init(model, lora.LoraConfig(rank=4), key=3)
    tokens = _tokens()
    np.testing.assert_array_equal(np.asarray(lm.run(tokens, mode=mode).logits), np.asarray(model.run(tokens).logits))


def test_merged_equals_unmerged_and_direct_reference(model):
    lm = _randomise_b(lora.init(model, lora.LoraConfig(rank=4, alpha=8.0, targets=("blocks.*.attn.o", "blocks.*.mlp.*"),
                                                    layers=(1, 2))))
    tokens = _tokens()
    unmerged = np.asarray(lm.run(tokens, mode="unmerged").logits)
    merged_run = np.asarray(lm.run(tokens, mode="merged").logits)
    merged_model = lora.merge(lm)
    np.testing.assert_allclose(np.asarray(merged_model.run(tokens).logits), unmerged, atol=2e-5)
    np.testing.assert_allclose(merged_run, unmerged, atol=2e-5)
    # direct: W + (alpha/r) A B written out by hand for one kernel
    w = lm.lora.weights["blocks.1.mlp.up"]
    up = lambda m: np.asarray(m.params["layers"]["mlp"]["up"]["kernel"])  # noqa: E731  [L, D, F]
    ref = up(model)[1] + 2.0 * np.asarray(w["A"]) @ np.asarray(w["B"])
    np.testing.assert_allclose(up(merged_model)[1], ref, atol=1e-6)
    # untouched projections keep their base weights
    np.testing.assert_array_equal(up(merged_model)[0], up(model)[0])
    for n in ("q", "k", "v"):
        np.testing.assert_array_equal(merged_model.params["layers"]["attn"][n]["kernel"],
                                      model.params["layers"]["attn"][n]["kernel"])
    assert not np.allclose(unmerged, np.asarray(model.run(tokens).logits), atol=1e-3)


def test_selection_by_globs_and_layers(model):
    lm = lora.init(model, lora.LoraConfig(targets=("blocks.*.attn.qkv", "blocks.2.mlp.down"), layers=(0, 2)))
    assert sorted(lm.lora.weights) == ["blocks.0.attn.qkv", "blocks.2.attn.qkv", "blocks.2.mlp.down"]
    assert lm.lora.weights["blocks.0.attn.qkv"]["A"].shape == (64, 8)
    assert lm.lora.weights["blocks.0.attn.qkv"]["B"].shape == (8, 192)
    with pytest.raises(KeyError, match="attn.qkv"):
        lora.init(model, lora.LoraConfig(targets=("blocks.*.attn.q",)))
    with pytest.raises(ValueError, match="out of range"):
        lora.init(model, lora.LoraConfig(layers=(5,)))
    with pytest.raises(ValueError, match="rank"):
        lora.LoraConfig(rank=0)
    with pytest.raises(ValueError, match="mode"):
        lm.run(_tokens(), mode="fused")


@pytest.mark.parametrize("mode", ["merged", "unmerged"])
def test_gradients_only_reach_adapters(model, mode):
    lm = _randomise_b(lora.init(model, lora.LoraConfig(rank=4)))
    tokens = jnp.asarray(_tokens())

    def loss(full):
        return jnp.mean(jax.nn.log_softmax(full.run(tokens, mode=mode).logits)[..., 0])

    grads = jax.grad(loss)(lm)
    for leaf in jax.tree_util.tree_leaves(grads.base):
        assert not np.any(np.asarray(leaf))
    norms = [float(jnp.abs(g).sum()) for g in jax.tree_util.tree_leaves(grads.lora)]
    assert all(n > 0 for n in norms)
    # both forwards give the same adapter gradients
    other = "unmerged" if mode == "merged" else "merged"
    g2 = jax.grad(lambda full: jnp.mean(jax.nn.log_softmax(full.run(tokens, mode=other).logits)[..., 0]))(lm)
    for a, b in zip(jax.tree_util.tree_leaves(grads.lora), jax.tree_util.tree_leaves(g2.lora)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


def test_dropout_is_stochastic_and_scaled(model):
    lm = _randomise_b(lora.init(model, lora.LoraConfig(rank=4, dropout=0.5)), scale=0.5)
    tokens = _tokens()
    a = lm.run(tokens, dropout_key=jax.random.PRNGKey(0)).logits
    b = lm.run(tokens, dropout_key=jax.random.PRNGKey(1)).logits
    assert not np.allclose(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="unmerged"):
        lm.run(tokens, mode="merged", dropout_key=jax.random.PRNGKey(0))
    # without a key dropout is off: equal to the merged forward
    np.testing.assert_allclose(np.asarray(lm.run(tokens).logits), np.asarray(lm.run(tokens, mode="merged").logits), atol=2e-5)


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "mamba"])
def test_other_families(family):
    from jaxinterp.models.gpt_neox import GPTNeoXConfig
    from jaxinterp.models.llama import LlamaConfig
    from jaxinterp.models.mamba import MambaConfig

    cfg = {"llama": LlamaConfig.llama_tiny, "gpt_neox": GPTNeoXConfig.tiny, "mamba": MambaConfig.tiny}[family]()
    base = ji.init(cfg, 0)
    tokens = np.arange(7)[None] % cfg.vocab_size
    lm = lora.init(base, lora.LoraConfig(rank=2, layers=(0,)))
    kinds = {"llama": 7, "gpt_neox": 4, "mamba": 2}[family]
    assert len(lm.lora.projections) == kinds
    # B = 0: the side path adds exact zeros (XLA may fuse the base matmuls differently: float32 rounding only)
    np.testing.assert_allclose(np.asarray(lm.run(tokens).logits), np.asarray(base.run(tokens).logits), atol=1e-6, rtol=0)
    lm = _randomise_b(lm, scale=0.1)
    unmerged = np.asarray(lm.run(tokens, mode="unmerged").logits)
    np.testing.assert_allclose(np.asarray(lora.merge(lm).run(tokens).logits), unmerged, atol=2e-5)
    assert not np.allclose(unmerged, np.asarray(base.run(tokens).logits), atol=1e-3)


def test_jit_and_split_combine(model):
    lm = _randomise_b(lora.init(model, lora.LoraConfig(rank=2)))
    trainable, frozen = lora.split(lm)
    tokens = jnp.asarray(_tokens())
    f = jax.jit(lambda tr, fr: lora.combine(tr, fr).run(tokens).logits)
    np.testing.assert_allclose(np.asarray(f(trainable, frozen)), np.asarray(lm.run(tokens).logits), atol=1e-5)


@pytest.mark.hf
def test_peft_export_roundtrip(tmp_path, model):
    peft = pytest.importorskip("peft")
    from tests.hf_utils import hf_forward, max_err, save_random_hf, transformers

    cfg = transformers.GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=61, n_positions=32)
    save_random_hf(transformers.GPT2LMHeadModel, cfg, tmp_path / "base")
    base = ji.load(tmp_path / "base")
    lm = _randomise_b(lora.init(base, lora.LoraConfig(rank=4, alpha=8.0, targets=("blocks.*.attn.*", "blocks.*.mlp.down"),
                                                   layers=(1, 2))), scale=0.2)
    lora.save_peft(lm, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    conf = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert conf["r"] == 4 and conf["lora_alpha"] == 8.0 and conf["fan_in_fan_out"] is True

    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "base").eval()
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    n_lora = sum(1 for n, _ in peft_model.named_parameters() if "lora_A" in n)
    assert n_lora == len(lm.lora.projections) == 6
    tokens = np.arange(12)[None] % 61
    ours = np.asarray(lm.run(tokens).logits)
    theirs = hf_forward(peft_model, tokens).logits
    assert max_err(ours, theirs) < 1e-4
    assert max_err(ours, np.asarray(base.run(tokens).logits)) > 1e-3  # the adapters matter

    back = lora.load_peft(base, tmp_path / "adapter")
    assert sorted(back.lora.weights) == sorted(lm.lora.weights)
    np.testing.assert_allclose(np.asarray(back.run(tokens).logits), ours, atol=1e-6)
