"""The logit lens against Hugging Face: each hidden state through HF's own final norm and unembedding."""

import numpy as np
import pytest

from tests.hf_utils import hf_forward, max_err, save_random_hf, torch, transformers

import jaxinterp as ji

TOL = 1e-4


def _hf_lens(hf, hidden, norm, head):
    with torch.no_grad():
        return head(norm(hidden)).numpy()


@pytest.mark.parametrize("kind", ["gpt2", "llama", "mamba"])
def test_logit_lens_matches_hf_hidden_states(tmp_path, kind):
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=61, n_positions=32)
        hf = save_random_hf(transformers.GPT2LMHeadModel, cfg, tmp_path)
        norm, head, n = hf.transformer.ln_f, hf.lm_head, 3
    elif kind == "llama":
        cfg = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                       intermediate_size=48, vocab_size=61, max_position_embeddings=32)
        hf = save_random_hf(transformers.LlamaForCausalLM, cfg, tmp_path)
        norm, head, n = hf.model.norm, hf.lm_head, 3
    else:
        cfg = transformers.MambaConfig(hidden_size=32, num_hidden_layers=3, vocab_size=61, state_size=4, expand=2,
                                       conv_kernel=3)
        hf = save_random_hf(transformers.MambaForCausalLM, cfg, tmp_path)
        norm, head, n = hf.backbone.norm_f, hf.lm_head, 3
    model = ji.load(tmp_path)
    tokens = np.random.default_rng(1).integers(0, 61, size=(2, 9))
    ref = hf_forward(hf, tokens)
    lens = np.asarray(ji.lens.logit_lens(model, tokens))  # [L, B, T, V]
    assert lens.shape == (n, 2, 9, 61)
    # HF: hidden_states[i + 1] is block i's output for i < L - 1 (transformers), hidden_states[i] for Mamba
    offset = 0 if kind == "mamba" else 1
    for i in range(n - 1):
        assert max_err(lens[i], _hf_lens(hf, ref.hidden_states[i + offset], norm, head)) < TOL, i
    assert max_err(lens[-1], ref.logits) < TOL  # the last layer's lens is the model's output


def test_logit_lens_positions_embed_and_kl():
    model = ji.init(ji.get_family("gpt2").config_cls.tiny(n_layers=3, vocab_size=50), key=3)
    tokens = np.random.default_rng(0).integers(0, 50, size=(3, 8))
    full = np.asarray(ji.lens.logit_lens(model, tokens, embed=True))  # [1 + L, B, T, V]
    some = np.asarray(ji.lens.logit_lens(model, tokens, layers=[1, -1], logits_at=np.array([7, 3, 5])))
    assert full.shape == (4, 3, 8, 50) and some.shape == (2, 3, 50)
    rows = np.arange(3)
    np.testing.assert_allclose(some[0], full[2][rows, [7, 3, 5]], atol=1e-5)
    np.testing.assert_allclose(some[1], full[3][rows, [7, 3, 5]], atol=1e-5)
    # the embed row: the head applied to the embeddings, computed directly
    emb = model.run(tokens, capture="embed").cache["embed"]
    np.testing.assert_allclose(full[0], np.asarray(ji.lens.apply_head(model, emb)), atol=1e-5)
    # KL(final || lens) from its definition
    final = np.asarray(model.run(tokens).logits, np.float64)
    kl = np.asarray(ji.lens.kl_to_final(full, final))
    p = np.exp(final - final.max(-1, keepdims=True)); p /= p.sum(-1, keepdims=True)
    q = np.exp(full - full.max(-1, keepdims=True)); q /= q.sum(-1, keepdims=True)
    np.testing.assert_allclose(kl, np.sum(p * (np.log(p) - np.log(q)), -1), atol=1e-4)
    assert np.abs(kl[-1]).max() < 1e-5


def test_logit_lens_bad_layer():
    model = ji.init(ji.get_family("gpt2").config_cls.tiny(), key=0)
    with pytest.raises(ValueError, match=r"layers must be ints in \[-2, 2\)"):
        ji.lens.logit_lens(model, np.zeros((1, 3), np.int32), layers=[2])
