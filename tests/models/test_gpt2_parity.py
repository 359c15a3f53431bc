"""GPT-2 port vs Hugging Face transformers, site by site, float32, random-initialised models."""

import numpy as np
import pytest

from tests.hf_utils import hf_forward, max_err, save_random_hf, torch, transformers

import jaxinterp as ji

TOL = 1e-4
SHAPES = [
    dict(n_embd=64, n_layer=2, n_head=4, vocab_size=101, n_positions=64),
    dict(n_embd=48, n_layer=3, n_head=6, vocab_size=77, n_positions=32, n_inner=80, activation_function="gelu"),
    dict(n_embd=32, n_layer=2, n_head=2, vocab_size=50, n_positions=16, scale_attn_by_inverse_layer_idx=True,
         tie_word_embeddings=False),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"d{s['n_embd']}L{s['n_layer']}")
@pytest.mark.parametrize("batch,seq", [(1, 7), (3, 13)])
def test_gpt2_matches_hf(tmp_path, shape, batch, seq):
    cfg = transformers.GPT2Config(**shape, attn_implementation="eager")
    hf = save_random_hf(transformers.GPT2LMHeadModel, cfg, tmp_path)
    model = ji.load(tmp_path)
    tokens = np.random.default_rng(seq).integers(0, shape["vocab_size"], size=(batch, seq))
    ref = hf_forward(hf, tokens)
    out = model.run(tokens, capture=["blocks.*.resid_post", "blocks.*.attn.pattern", "final_norm", "embed"])
    assert max_err(out.logits, ref.logits) < TOL
    assert max_err(out.cache["embed"], ref.hidden_states[0]) < TOL
    n = shape["n_layer"]
    for i in range(n - 1):
        assert max_err(out.cache[f"blocks.{i}.resid_post"], ref.hidden_states[i + 1]) < TOL, i
    assert max_err(out.cache["final_norm"], ref.hidden_states[n]) < TOL
    for i in range(n):
        assert max_err(out.cache[f"blocks.{i}.attn.pattern"], ref.attentions[i]) < TOL, i


def test_gpt2_mlp_output_matches_hf(tmp_path):
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=40, n_positions=16)
    hf = save_random_hf(transformers.GPT2LMHeadModel, cfg, tmp_path)
    model = ji.load(tmp_path)
    tokens = np.arange(9)[None] % 40
    captured = {}
    hook = hf.transformer.h[1].mlp.register_forward_hook(lambda m, i, o: captured.__setitem__("mlp", o))
    hf_forward(hf, tokens)
    hook.remove()
    out = model.run(tokens, capture="blocks.1.mlp_out")
    assert max_err(out.cache["blocks.1.mlp_out"], captured["mlp"]) < TOL


def test_roundtrip_export(tmp_path):
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=40, n_positions=16)
    save_random_hf(transformers.GPT2LMHeadModel, cfg, tmp_path / "a")
    model = ji.load(tmp_path / "a")
    ji.save_pretrained(model, tmp_path / "b")
    hf_b = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "b").eval()
    tokens = np.arange(10)[None] % 40
    assert max_err(model.run(tokens).logits, hf_forward(hf_b, tokens).logits) < TOL


def test_sharded_checkpoint_with_index(tmp_path):
    """Many safetensors shards + model.safetensors.index.json load in ji.load and in transformers alike."""
    cfg = transformers.GPT2Config(n_embd=32, n_layer=3, n_head=4, vocab_size=40, n_positions=16)
    save_random_hf(transformers.GPT2LMHeadModel, cfg, tmp_path / "a")
    model = ji.load(tmp_path / "a")
    ji.save_pretrained(model, tmp_path / "b", max_shard_bytes=20_000)
    shards = sorted(p.name for p in (tmp_path / "b").glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "b" / "model.safetensors.index.json").exists()
    tokens = np.arange(11)[None] % 40
    reloaded = ji.load(tmp_path / "b")
    np.testing.assert_array_equal(reloaded.run(tokens).logits, model.run(tokens).logits)
    hf_b = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "b").eval()
    assert max_err(model.run(tokens).logits, hf_forward(hf_b, tokens).logits) < TOL


def test_refuses_pickles_and_unknown_sources(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="pickled weights are not loaded"):
        ji.load(tmp_path)
    with pytest.raises(ValueError, match="dtype must be one of"):
        ji.load(tmp_path, dtype="int8")
    with pytest.raises(FileNotFoundError, match="neither an embedded model"):
        ji.load(str(tmp_path / "missing" / "dir"))
