"""``run``'s inputs: text through the tokenizer, masks, positions, ``logits_at`` forms, checks that
hold under jit/vmap, and fused vs observed attention."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinterp as ji
from jaxinterp.models.gpt2 import GPT2Config
from jaxinterp.models.llama import LlamaConfig

WORDS = ["<|endoftext|>", "<pad>", "<unk>", "The", "capital", "of", "A", "much", "longer", "prompt", "about",
         "France", "is", "Paris", "."]


@pytest.fixture(scope="module")
def model():
    return ji.init(GPT2Config.tiny(vocab_size=len(WORDS), max_seq_len=16), 0)


def _word_tokenizer(path, add_bos=True):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<pad>", "add_bos_token": add_bos}))


@pytest.fixture(scope="module")
def with_tokenizer(tmp_path_factory, model):
    """A checkpoint saved with ``save_pretrained`` from a random model, with a tokenizer beside it."""
    src = tmp_path_factory.mktemp("tok")
    _word_tokenizer(src)
    out = tmp_path_factory.mktemp("ckpt")
    ji.save_pretrained(model, out, tokenizer_dir=src)
    return ji.load(out)


def test_text_in_and_out(with_tokenizer):
    m = with_tokenizer
    assert m.tokenizer is not None
    texts = ["The capital of", "A much longer prompt about"]
    tokens, mask = m.to_tokens(texts)
    assert tokens.dtype == np.int32 and tokens.shape == mask.shape == (2, 6)
    assert mask[0].tolist() == [False, False, True, True, True, True]  # left padding, BOS added
    assert tokens[0, 2] == 0 and tokens[0, 0] == 1  # BOS id, then the pad id in front
    out = m.run(texts)
    for i, text in enumerate(texts):
        alone = m.run(text).logits[0]
        np.testing.assert_allclose(np.asarray(out.logits[i])[mask[i]], np.asarray(alone), atol=1e-5)
    assert m.to_str(tokens[1]) == "<|endoftext|> A much longer prompt about"
    assert m.to_str_tokens(tokens[0, 2:]) == ["<|endoftext|>", "The", "capital", "of"]
    right, rmask = m.to_tokens(texts, padding_side="right", add_bos=False)
    assert rmask[0].tolist() == [True] * 3 + [False] * 2 and right[0, 0] == WORDS.index("The")


def test_save_pretrained_writes_the_tokenizer_back(with_tokenizer, tmp_path):
    ji.save_pretrained(with_tokenizer, tmp_path)
    again = ji.load(tmp_path)
    assert again.to_tokens("A much")[0].tolist() == with_tokenizer.to_tokens("A much")[0].tolist()


def test_tokenizer_errors(model, tmp_path):
    with pytest.raises(ValueError, match="has no tokenizer"):
        model.run("The capital of")
    ji.save_pretrained(model, tmp_path / "plain")
    assert ji.load(tmp_path / "plain").tokenizer is None
    # A tokenizer with more tokens than the embedding is refused at load.
    big = ji.init(GPT2Config.tiny(vocab_size=8, max_seq_len=16), 0)
    src = tmp_path / "src"
    src.mkdir()
    _word_tokenizer(src)
    ji.save_pretrained(big, tmp_path / "mismatch", tokenizer_dir=src)
    with pytest.raises(ValueError, match="tokenizer has 15 tokens but the model's embedding only 8"):
        ji.load(tmp_path / "mismatch")


def test_embedded_models_have_text(tmp_path):
    m = ji.load("facts-gpt")
    tokens, mask = m.to_tokens("Paris")
    assert tokens[0, 0] == m.tokenizer.bos_id  # facts-world prompts start with <|endoftext|>
    othello = ji.load("othello-gpt")
    ids, _ = othello.to_tokens("a1 b2")  # the 6x6 board's move names
    assert ids[0].tolist() == [1, 8] and othello.to_str_tokens(ids[0]) == ["a1", "b2"]


def test_logits_at_forms(model):
    tokens = np.random.default_rng(0).integers(0, len(WORDS), (3, 7))
    full = np.asarray(model.run(tokens).logits)
    np.testing.assert_allclose(model.run(tokens, logits_at=-1).logits, full[:, -1], atol=1e-6)  # int: [B, V]
    per_row = np.array([2, 6, 4])
    np.testing.assert_allclose(model.run(tokens, logits_at=per_row).logits, full[np.arange(3), per_row], atol=1e-6)
    pairs = np.array([[0, 6], [1, 2], [5, 5]])
    np.testing.assert_allclose(model.run(tokens, logits_at=pairs).logits,
                               full[np.arange(3)[:, None], pairs], atol=1e-6)
    jitted = jax.jit(lambda m, t, at: m.run(t, logits_at=at).logits)(model, tokens, per_row)
    np.testing.assert_allclose(jitted, full[np.arange(3), per_row], atol=1e-6)


def test_bad_inputs_are_one_line_errors(model):
    tokens = np.zeros((2, 4), np.int32)
    cases = [
        (dict(attention_mask=np.ones((2, 5))), "attention_mask has shape"),
        (dict(attention_mask=np.array([[1, 1, 1, 1], [0, 0, 0, 0]])), "rows \\[1\\] have no real token"),
        (dict(attention_mask=np.array([[1, 1, 1, 1], [0, 0, 2, 1]])), "only 0/1"),
        (dict(logits_at=np.array([1, 2, 3])), "logits_at must be an int"),
        (dict(logits_at=9), "logits_at positions must lie in"),
        (dict(logits_at=0, attention_mask=np.array([[0, 1, 1, 1], [1, 1, 1, 1]])), "selects padding positions"),
        (dict(capture=3), "capture must be"),
        (dict(interventions=[ji.ZeroAblate()]), "interventions must be a mapping"),
        (dict(token_check="ignore"), "token_check must be one of"),
    ]
    for kw, message in cases:
        with pytest.raises((ValueError, TypeError), match=message) as err:
            model.run(tokens, **kw)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="token ids must lie in \\[0, 15\\)"):
        model.run(np.array([[1, -1]]))
    with pytest.raises(ValueError, match="outside int32"):
        model.run(np.array([[1, 2**32 + 1]], np.int64))
    with pytest.raises(TypeError, match="must be integers"):
        model.run(np.array([[1.0, 2.0]]))


def test_out_of_range_tokens_raise_under_jit_and_vmap(model):
    f = jax.jit(lambda m, t: m.run(t).logits)
    with pytest.raises(Exception, match="token ids must lie in"):
        jax.block_until_ready(f(model, jnp.array([[1, 99]])))
    with pytest.raises(Exception, match="token ids must lie in"):
        jax.block_until_ready(jax.vmap(lambda t: model.run(t[None]).logits)(jnp.array([[1, -1], [2, 3]])))
    clipped = jax.jit(lambda m, t: m.run(t, token_check="clip").logits)(model, jnp.array([[1, 99]]))
    np.testing.assert_allclose(clipped, model.run(np.array([[1, len(WORDS) - 1]])).logits, atol=1e-6)
    ok = f(model, jnp.array([[1, 2]]))  # in range: no error
    assert np.isfinite(np.asarray(ok)).all()


@pytest.mark.parametrize("config", [GPT2Config.tiny(vocab_size=50), LlamaConfig.llama_tiny(vocab_size=50),
                                    LlamaConfig.mistral_tiny(vocab_size=50, sliding_window=3)],
                         ids=["gpt2", "llama-gqa", "mistral-window"])
def test_fused_attention_equals_observed(config):
    """Unobserved attention runs jax.nn.dot_product_attention; observed, the explicit path: same numbers."""
    m = ji.init(config, 1)
    tokens = np.random.default_rng(2).integers(0, 50, (2, 9))
    mask = np.ones((2, 9), int)
    mask[0, :3] = 0
    fused = m.run(tokens, attention_mask=mask, capture="blocks.*.attn.z")
    observed = m.run(tokens, attention_mask=mask, capture=["blocks.*.attn.z", "blocks.0.attn.pattern"])
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(fused.logits)[real], np.asarray(observed.logits)[real], atol=1e-5)
    for i in range(config.n_layers):
        z = f"blocks.{i}.attn.z"
        np.testing.assert_allclose(np.asarray(fused.cache[z])[real], np.asarray(observed.cache[z])[real], atol=1e-5)


def test_interventions_that_differ_by_layer_under_scan(model):
    """Per-layer interventions, globs and ByLayer stacks all act on the layers they name (scan adapter)."""
    tokens = np.random.default_rng(4).integers(0, len(WORDS), (1, 6))
    base = model.run(tokens, capture="blocks.*.resid_post").cache
    d = model.config.d_model
    v0, v1 = jnp.full((d,), 0.5), jnp.full((d,), -0.25)
    out = model.run(tokens, capture="blocks.*.resid_post", interventions={
        "blocks.0.resid_post": ji.Add(v0), "blocks.1.resid_post": ji.Add(v1)}).cache
    stacked = model.run(tokens, capture="blocks.*.resid_post", interventions={
        "blocks.*.resid_post": ji.ByLayer(ji.Add(jnp.stack([v0, v1])))}).cache
    # layer 0: its own Add only (layer 1 then sees the changed input, so compare layer 0 directly)
    np.testing.assert_allclose(out["blocks.0.resid_post"], base["blocks.0.resid_post"] + 0.5, atol=1e-5)
    for k in out:
        np.testing.assert_allclose(stacked[k], out[k], atol=1e-6)
    # Direct computation of layer 1 from the patched layer-0 output.
    l1 = model.run(tokens, capture="blocks.1.resid_post",
                   interventions={"blocks.0.resid_post": ji.Add(v0)}).cache["blocks.1.resid_post"]
    np.testing.assert_allclose(out["blocks.1.resid_post"], l1 - 0.25, atol=1e-5)
