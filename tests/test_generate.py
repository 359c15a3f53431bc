"""ji.generate: greedy parity with transformers' generate on left-padded batches (per family),
interventions and captures at every step vs a full recompute per token, sampling vs a plain loop
with the same keys, top-k / top-p vs a direct computation, stops, one compiled program, bad input."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import jaxinterp as ji
from jaxinterp.generate import _program, filter_logits, prompt_batch
from jaxinterp.models.gpt2 import GPT2Config
from jaxinterp.models.mamba import MambaConfig
from tests.hf_utils import save_random_hf, torch, transformers

LENGTHS = (3, 7, 12)
N_NEW = 32

# one line per family: (HF config class, HF model class, config fields)
FAMILIES = {
    "gpt2": (transformers.GPT2Config, transformers.GPT2LMHeadModel,
             dict(n_embd=32, n_layer=2, n_head=4, vocab_size=61, n_positions=64)),
    "llama-gqa-rope-scaling": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
                               dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    intermediate_size=48, vocab_size=61, max_position_embeddings=64,
                                    rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                     "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                                                     "rope_theta": 10000.0})),
    "mistral-window": (transformers.MistralConfig, transformers.MistralForCausalLM,
                       dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=48, vocab_size=61, max_position_embeddings=64, sliding_window=6)),
    "gemma2-window-softcap": (transformers.Gemma2Config, transformers.Gemma2ForCausalLM,
                              dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   head_dim=8, intermediate_size=48, vocab_size=61, max_position_embeddings=64,
                                   sliding_window=6, query_pre_attn_scalar=8, attn_logit_softcapping=0.5,
                                   final_logit_softcapping=0.8)),
    "mamba": (transformers.MambaConfig, transformers.MambaForCausalLM,
              dict(hidden_size=32, num_hidden_layers=2, state_size=4, vocab_size=61, conv_kernel=4)),
}


def _left_padded(rng, lengths=LENGTHS, vocab=61):
    width = max(lengths)
    tokens = np.zeros((len(lengths), width), np.int64)
    mask = np.zeros((len(lengths), width), np.int64)
    for i, n in enumerate(lengths):
        tokens[i, width - n:], mask[i, width - n:] = rng.integers(1, vocab, n), 1
    return tokens, mask


def _hf_greedy(hf, tokens, mask, n_new):
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        out = hf.generate(torch.as_tensor(tokens), attention_mask=torch.as_tensor(mask), max_new_tokens=n_new,
                          min_new_tokens=n_new, do_sample=False, pad_token_id=0)
    return out[:, tokens.shape[1]:].numpy()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_greedy_equals_transformers_generate(tmp_path, family):
    cfg_cls, model_cls, fields = FAMILIES[family]
    hf = save_random_hf(model_cls, cfg_cls(**fields), tmp_path)
    model = ji.load(tmp_path)
    tokens, mask = _left_padded(np.random.default_rng(3))
    want = _hf_greedy(hf, tokens, mask, N_NEW)
    got = ji.generate(model, tokens, attention_mask=mask, max_new_tokens=N_NEW)
    assert got.tokens.shape == (len(LENGTHS), N_NEW)
    np.testing.assert_array_equal(got.tokens, want)
    assert (got.lengths == N_NEW).all() and got.steps == N_NEW
    # the same prompts right-padded (or as ragged lists) give the same tokens
    rows = [t[m == 1] for t, m in zip(tokens, mask)]
    np.testing.assert_array_equal(ji.generate(model, [list(r) for r in rows], max_new_tokens=N_NEW).tokens, want)


# ----------------------------------------------------------------------------- a full recompute per token


@pytest.fixture(scope="module")
def tiny():
    cfg = GPT2Config(vocab_size=61, max_seq_len=64, d_model=32, n_layers=2, n_heads=4, d_mlp=64)
    return ji.init(cfg, key=1)


@pytest.fixture(scope="module")
def tiny_mamba():

    return ji.init(MambaConfig(vocab_size=61, d_model=32, n_layers=2, d_state=4, d_conv=4), key=2)


def _recompute(model, tokens, mask, n_new, interventions=None, choose=None):
    """Token by token, a forward over the whole sequence (no cache): the ``[B, P + n_new]`` buffer
    is filled one column per step and the logits read at the column before (later columns hold
    placeholders the causal model cannot see). Returns (new tokens, sequence, mask)."""
    b, p = tokens.shape
    seq = np.concatenate([tokens, np.zeros((b, n_new), tokens.dtype)], 1)
    m = np.concatenate([mask, np.ones((b, n_new), bool)], 1)
    logits_at = jax.jit(lambda seq, col: ji.run(model, seq, interventions=interventions, attention_mask=m,
                                                logits_at=col).logits)
    for j in range(n_new):
        logits = np.asarray(logits_at(seq, jnp.full((b,), p - 1 + j)))
        seq[:, p + j] = logits.argmax(-1) if choose is None else choose(logits, j)
    return seq[:, p:], seq, m


@pytest.mark.parametrize("which", ["gpt2", "mamba"])
def test_interventions_and_captures_at_every_step(which, tiny, tiny_mamba):
    model = tiny if which == "gpt2" else tiny_mamba
    tokens, mask = prompt_batch(model, list(_rows(np.random.default_rng(5))))
    b, p = tokens.shape
    n_new = 10
    total = p + n_new
    d = model.config.d_model
    rng = np.random.default_rng(0)
    vec = jnp.asarray(rng.normal(size=(d,)) * 2.0, jnp.float32)
    patch = jnp.asarray(rng.normal(size=(b, total, d)), jnp.float32)
    cols = np.zeros((b, total), bool)
    cols[:, [p - 2, p + 1, p + 4]] = True  # absolute positions: one in the prompt, two generated
    site = "blocks.0.resid_post"
    ivs = {site: ji.Patch(patch, jnp.asarray(cols)), "blocks.*.resid_pre": ji.Steer(vec, 0.7, where="generated")}
    capture = ["blocks.1.resid_post", "blocks.*.resid_pre"]
    got = ji.generate(model, tokens, attention_mask=mask, max_new_tokens=n_new, interventions=ivs, capture=capture)
    # the same interventions on a full run: Steer(where="generated") = Add at the columns >= P
    generated = jnp.asarray((np.arange(total) >= p)[None])
    full = {site: ji.Patch(patch, jnp.asarray(cols)), "blocks.*.resid_pre": ji.Add(0.7 * vec, generated)}
    want, seq, m = _recompute(model, tokens, mask, n_new, full)
    np.testing.assert_array_equal(got.tokens, want)
    # captures: the run over the whole sequence, at the columns that chose each new token
    ref = ji.run(model, seq, capture=capture, interventions=full, attention_mask=m)
    for name in ("blocks.1.resid_post", "blocks.0.resid_pre", "blocks.1.resid_pre"):
        np.testing.assert_allclose(got.cache[name], np.asarray(ref.cache[name])[:, p - 1:-1], atol=2e-5, rtol=1e-5)
    # the interventions changed the tokens (the test would not notice them otherwise)
    plain = ji.generate(model, tokens, attention_mask=mask, max_new_tokens=n_new)
    assert (plain.tokens != got.tokens).any()


def _rows(rng):
    return [rng.integers(1, 61, n) for n in (4, 9, 2)]


def test_attention_pattern_captures_and_head_ablation_in_decode(tiny):
    tokens, mask = prompt_batch(tiny, list(_rows(np.random.default_rng(8))))
    b, p = tokens.shape
    n_new = 6
    heads = np.zeros((b, p + n_new, 4), bool)
    heads[:, p + 2:, 1] = True  # head 1 of layer 1 ablated from the third new token's position on
    ivs = {"blocks.1.attn.z": ji.ZeroAblate(jnp.asarray(heads))}
    got = ji.generate(tiny, tokens, attention_mask=mask, max_new_tokens=n_new, interventions=ivs,
                      capture="blocks.0.attn.pattern")
    want, seq, m = _recompute(tiny, tokens, mask, n_new, ivs)
    np.testing.assert_array_equal(got.tokens, want)
    pattern = np.asarray(got.cache["blocks.0.attn.pattern"])  # [B, H, N, S]
    assert pattern.shape == (b, 4, n_new, p + n_new)
    ref = np.asarray(ji.run(tiny, seq, capture="blocks.0.attn.pattern", interventions=ivs,
                            attention_mask=m).cache["blocks.0.attn.pattern"])  # [B, H, T, T]
    np.testing.assert_allclose(pattern, ref[:, :, p - 1:-1], atol=1e-6)
    assert not pattern[..., -1].any()  # the last slot is never written before the last token


# ----------------------------------------------------------------------------- sampling


def test_sampling_matches_a_plain_loop_with_the_same_keys_and_is_reproducible(tiny):
    tokens, mask = prompt_batch(tiny, list(_rows(np.random.default_rng(2))))
    kw = dict(attention_mask=mask, max_new_tokens=12, temperature=0.8, top_k=20, top_p=0.9)
    got = ji.generate(tiny, tokens, seed=7, **kw)
    key = jax.random.PRNGKey(7)

    def choose(logits, j):
        x = filter_logits(jnp.asarray(logits) / 0.8, 20, 0.9)
        return np.asarray(jax.random.categorical(jax.random.fold_in(key, j), x))

    want, _, _ = _recompute(tiny, tokens, mask, 12, choose=choose)
    np.testing.assert_array_equal(got.tokens, want)
    np.testing.assert_array_equal(ji.generate(tiny, tokens, seed=7, **kw).tokens, got.tokens)
    assert (ji.generate(tiny, tokens, seed=8, **kw).tokens != got.tokens).any()
    np.testing.assert_array_equal(ji.generate(tiny, tokens, seed=key, **kw).tokens, got.tokens)


def _filtered_reference(logits, top_k, top_p):
    """The distribution HF's TopK then TopP warpers leave, by sorting and walking down the ranks."""
    out = []
    for row in np.asarray(logits, np.float64):
        keep = np.ones(row.shape, bool)
        if top_k is not None:
            keep &= row >= np.sort(row)[::-1][top_k - 1]
        x = np.where(keep, row, -np.inf)
        if top_p is not None:
            probs = np.exp(x - x.max())
            probs /= probs.sum()
            kept, mass = np.zeros(row.shape, bool), 0.0
            for i in np.argsort(-x, kind="stable"):
                if mass >= top_p:
                    break
                kept[i], mass = True, mass + probs[i]
            x = np.where(kept, x, -np.inf)
        probs = np.exp(x - x.max())
        out.append(probs / probs.sum())
    return np.asarray(out)


@pytest.mark.parametrize("top_k,top_p", [(5, None), (None, 0.5), (None, 0.93), (12, 0.7), (None, 1.0), (1, None)])
def test_top_k_top_p_equal_a_direct_computation(top_k, top_p):
    logits = jnp.asarray(np.random.default_rng(4).normal(size=(6, 40)) * 2.0, jnp.float32)
    got = np.asarray(jax.nn.softmax(filter_logits(logits, top_k, top_p), -1))
    np.testing.assert_allclose(got, _filtered_reference(logits, top_k, top_p), atol=1e-6)


def test_sampled_first_tokens_follow_the_filtered_distribution(tiny):
    prompt = np.random.default_rng(1).integers(1, 61, 5)
    n = 1024
    got = ji.generate(tiny, np.tile(prompt, (n, 1)), max_new_tokens=1, temperature=1.3, top_k=10, top_p=0.8)
    logits = np.asarray(ji.run(tiny, prompt[None], logits_at=-1).logits) / 1.3
    want = _filtered_reference(logits, 10, 0.8)[0]
    freq = np.bincount(got.tokens[:, 0], minlength=61) / n
    assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(want))
    assert np.abs(freq - want).max() < 0.065  # 1024 draws: ~4 standard errors at p = 0.5


# ----------------------------------------------------------------------------- stops, compile, text


def test_stop_tokens_end_each_row_on_its_own(tiny):
    tokens, mask = prompt_batch(tiny, list(_rows(np.random.default_rng(5))))
    free = ji.generate(tiny, tokens, attention_mask=mask, max_new_tokens=16)
    stop = int(free.tokens[0, 3])
    got = ji.generate(tiny, tokens, attention_mask=mask, max_new_tokens=16, stop=stop)
    for row, length, ref in zip(got.tokens, got.lengths, free.tokens):
        hits = np.flatnonzero(ref == stop)
        want = hits[0] + 1 if hits.size else 16
        assert length == want
        np.testing.assert_array_equal(row[:length], ref[:length])
        assert (row[length:] == 0).all()
    assert got.attention_mask[:, tokens.shape[1]:].sum(1).tolist() == got.lengths.tolist()


def test_stop_strings_and_text_on_facts_gpt():
    model = ji.load("facts-gpt")
    prompts = ["The favorite color of Al an is", "Al an speaks", "Cor rin dor lives in"]
    free = ji.generate(model, prompts, max_new_tokens=10, stop_at_eos=False)
    assert free.text == [model.to_str(r) for r in free.tokens]
    got = ji.generate(model, prompts, max_new_tokens=10, stop=".")
    for text, row, n in zip(got.text, got.tokens, got.lengths):
        assert text.endswith(".") and text.count(".") == 1
        assert model.to_str(row[:n]) == text
    two = ji.generate(model, prompts, max_new_tokens=10, stop=". the")  # a stop string of two tokens
    assert all(t.endswith(". the") for t in two.text)


def _bpe_model(tmp_path):
    """A random 61-token GPT-2 with a character BPE tokenizer over ``abcde`` and space."""
    from tokenizers import Tokenizer, decoders, models, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.decoder = decoders.Fuse()  # tokens hold their spaces: join them as they are
    trainer = trainers.BpeTrainer(vocab_size=61, special_tokens=["<unk>", "<eos>"], initial_alphabet=list("abcde "))
    rng = np.random.default_rng(0)
    tok.train_from_iterator(["".join(rng.choice(list("abcde "), 40)) for _ in range(300)], trainer)
    cfg = GPT2Config(vocab_size=61, max_seq_len=64, d_model=32, n_layers=2, n_heads=4, d_mlp=64)
    ji.save_pretrained(ji.init(cfg, key=3), tmp_path)
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<eos>", "pad_token": "<unk>"}')
    return ji.load(tmp_path)


def test_stop_strings_spelt_by_other_tokens(tmp_path):
    """A stop string is found in the text wherever its tokens fall (inside or across tokens): each
    row ends at the first new token whose text completes it."""
    model = _bpe_model(tmp_path)
    prompts = ["ab c", "dd e a", "b"]
    kw = dict(max_new_tokens=16, stop_at_eos=False, temperature=2.0, seed=1)  # sampled: varied text
    free = ji.generate(model, prompts, **kw)
    stops = ["ecb", "a b"]  # across tokens in rows 0 and 1, one token in row 2
    got = ji.generate(model, prompts, stop=stops, **kw)
    cut = 0
    for row, text, n in zip(free.tokens, got.text, got.lengths):
        texts = [model.to_str(row[:k]) for k in range(1, 17)]
        k = next((k for k, x in enumerate(texts, 1) if any(s in x for s in stops)), 16)
        assert (n, text) == (k, texts[k - 1])
        cut += k < 16
    assert cut == 3  # every row stops


def test_one_compiled_program_per_shape_bucket(tiny):
    before = _program._cache_size()
    a = ji.generate(tiny, [[5, 6, 7]], max_new_tokens=20)
    b = ji.generate(tiny, [[9, 1, 2, 3, 4, 5]], max_new_tokens=20)  # same bucket (width 8): no new program
    assert _program._cache_size() == before + 1
    assert a.steps == b.steps == 20


def test_unlearning_metrics_generate_uses_the_cached_loop_for_models(tiny):
    """``metrics.generate`` gives a Model to ji.generate: the same tokens as its uncached loop over
    a logits function (same per-step keys)."""
    from jaxinterp.unlearning import metrics as um

    prompts = [[0] + list(r) for r in _rows(np.random.default_rng(9))]
    key = jax.random.PRNGKey(3)
    by_fn = um.generate(jax.jit(lambda t: tiny.run(t).logits), prompts, 7, key, pad_id=1, temperature=0.9)
    by_model = um.generate(tiny, prompts, 7, key, pad_id=1, temperature=0.9)
    assert by_model == by_fn


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("kw,match", [
    (dict(max_new_tokens=125), "past this model's context of 128"),
    (dict(max_new_tokens=4, stop="xyzzy"), "cannot be tokenized"),
    (dict(max_new_tokens=4, top_p=0.0), r"top_p must be None or in \(0, 1\]"),
    (dict(max_new_tokens=4, top_p=1.5), r"top_p must be None or in \(0, 1\]"),
    (dict(max_new_tokens=4, top_k=0), "top_k must be"),
    (dict(max_new_tokens=0), "max_new_tokens must be"),
    (dict(max_new_tokens=4, temperature=-1.0), "temperature must be"),
    (dict(max_new_tokens=4, interventions={"blocks.1.resid_post": ji.Steer(jnp.ones(64), 2.0)}),
     r"Steer at 'blocks\.1\.resid_post': the vector has shape \(64,\) but one position"),
    (dict(max_new_tokens=4, interventions={"blocks.9.resid_post": ji.Steer(jnp.ones(128))}), "unknown site"),
])
def test_bad_input_is_one_line(kw, match):
    model = ji.load("facts-gpt")
    with pytest.raises((ValueError, KeyError)) as err:
        ji.generate(model, ["Al an speaks"], **kw)
    assert err.match(match)
    assert "\n" not in str(err.value)


def test_steer_where_in_a_plain_run(tiny):
    tokens = np.random.default_rng(0).integers(1, 61, (2, 5))
    vec = jnp.ones(32) * 0.3
    base = ji.run(tiny, tokens, capture="blocks.0.resid_post").cache["blocks.0.resid_post"]
    for where, factor in (("all", 1.0), ("prompt", 1.0), ("generated", 0.0)):
        out = ji.run(tiny, tokens, capture="blocks.0.resid_post",
                     interventions={"blocks.0.resid_post": ji.Steer(vec, 2.0, where=where)})
        np.testing.assert_allclose(out.cache["blocks.0.resid_post"], base + factor * 0.6, atol=1e-6)
    with pytest.raises(ValueError, match="where"):
        ji.Steer(vec, 1.0, where="middle")
