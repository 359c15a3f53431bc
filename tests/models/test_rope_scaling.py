"""Scaled rotary embeddings (linear, dynamic NTK, YaRN, llama3, LongRoPE) vs transformers'
``modeling_rope_utils``: the inverse frequencies and cos/sin scale, then whole Llama / Qwen3 models
on sequences long enough for the scaling to change the result."""

import json

import numpy as np
import pytest

from tests.hf_utils import hf_forward, max_err, save_random_hf, torch, transformers
from tests.models.zoo_utils import assert_matches_hf

import jaxinterp as ji
from jaxinterp.hf import ConversionError
from jaxinterp.models.common import rotary_tables
from jaxinterp.models.llama import LlamaConfig
from jaxinterp.models.rope import make_rope, read_rope_dict

HEAD_DIM = 16
CTX = 16  # max_position_embeddings of the test models (original context of the scaled types: 8)
RD = HEAD_DIM // 2
SCALINGS = {
    "linear": {"rope_type": "linear", "factor": 3.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "beta_fast": 8.0,
             "beta_slow": 1.0},
    "yarn-mscale": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8, "mscale": 0.8,
                    "mscale_all_dim": 0.5, "truncate": False},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8},
    "longrope": {"rope_type": "longrope", "original_max_position_embeddings": 8,
                 "short_factor": [1.0 + 0.1 * i for i in range(RD)],
                 "long_factor": [1.0 + 0.9 * i for i in range(RD)]},
}
SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=HEAD_DIM,
             intermediate_size=48, vocab_size=53, max_position_embeddings=CTX)


def _hf_config(scaling, theta=1000.0, **kw):
    return transformers.LlamaConfig(**{**SHAPE, **kw}, rope_parameters={**scaling, "rope_theta": theta},
                                    attn_implementation="eager")


def _hf_inv_freq(config, scaling, seq_len=None):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kw = {} if seq_len is None else {"seq_len": torch.tensor(seq_len) if scaling == "dynamic" else seq_len}
    inv, factor = ROPE_INIT_FUNCTIONS[config.rope_parameters["rope_type"]](config, None, **kw)
    return inv.numpy(), factor


@pytest.mark.parametrize("name", list(SCALINGS))
def test_inverse_frequencies_match_transformers(name):
    config = _hf_config(SCALINGS[name])
    theta, partial, scaling = read_rope_dict("llama", config.to_dict(), max_position_embeddings=CTX)
    rope = make_rope(HEAD_DIM, theta, scaling, max_position_embeddings=CTX)
    lengths = {"dynamic": (CTX, 3 * CTX), "longrope": (8, 9)}.get(name, (None,))
    for length in lengths:
        inv, factor = _hf_inv_freq(config, scaling.rope_type, length)
        ours = np.asarray(rope.inv_freq_at(length if length is not None else 1))
        np.testing.assert_allclose(ours, inv, rtol=2e-6, err_msg=f"{name} at {length}")
        assert rope.attention_factor == pytest.approx(factor, rel=1e-6)
    assert not np.allclose(make_rope(HEAD_DIM, theta).inv_freq, rope.inv_freq_at(3 * CTX)), "scaling is a no-op"


def test_length_dependent_tables_follow_the_call():
    """Dynamic NTK and LongRoPE pick their frequencies from the call's length (max position + 1),
    or from an explicit length (the incremental engine's whole run)."""
    theta, _, scaling = read_rope_dict("llama", {"rope_parameters": SCALINGS["longrope"]}, max_position_embeddings=CTX)
    rope = make_rope(HEAD_DIM, theta, scaling, max_position_embeddings=CTX)
    short = np.arange(8)[None]
    cos_short, _ = rotary_tables(short, rope)
    cos_long, _ = rotary_tables(short, rope, length=12)
    cos_long_call, _ = rotary_tables(np.arange(12)[None], rope)
    assert not np.allclose(cos_short, cos_long)
    np.testing.assert_allclose(cos_long, cos_long_call[:, :8], atol=1e-6)


def _model_pair(tmp_path, scaling, variant="llama", **kw):
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}[variant]
    config = cls[0](**{**SHAPE, **kw}, rope_parameters={**scaling, "rope_theta": 1000.0}, attn_implementation="eager")
    hf = save_random_hf(cls[1], config, tmp_path)
    return hf, ji.load(tmp_path)


@pytest.mark.parametrize("name", list(SCALINGS))
def test_scaled_llama_matches_hf_past_the_original_context(tmp_path, name):
    hf, model = _model_pair(tmp_path, SCALINGS[name])
    seq = 2 * CTX if name == "dynamic" else CTX  # dynamic rescales only past max_position_embeddings
    assert model.config.max_seq_len == (2 * CTX if name == "dynamic" else CTX)
    tokens = np.random.default_rng(0).integers(0, SHAPE["vocab_size"], size=(2, seq))
    assert_matches_hf(model, hf, tokens)
    # the scaling matters: the same weights with plain rotary give other logits
    plain = model.replace(config=LlamaConfig(**{**model.config.__dict__, "rope_scaling": None, "max_seq_len": seq}))
    assert max_err(plain.run(tokens).logits, model.run(tokens).logits) > 1e-3
    # and a fresh HF model agrees on a short prompt too (length-dependent types switch back)
    hf_fresh = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    short = tokens[:, :6]
    assert max_err(model.run(short).logits, hf_forward(hf_fresh, short).logits) < 1e-4


def test_qwen3_with_yarn_and_sliding_layers(tmp_path):
    hf, model = _model_pair(tmp_path, SCALINGS["yarn"], variant="qwen3", use_sliding_window=True, sliding_window=5,
                            max_window_layers=1, attention_bias=True)
    assert model.config.variant == "qwen3" and model.config.qk_norm
    assert [model.config.window_for(i) for i in range(2)] == [None, 5]
    tokens = np.random.default_rng(3).integers(0, SHAPE["vocab_size"], size=(2, 13))
    outputs = {f"blocks.{i}.attn_out": layer.self_attn for i, layer in enumerate(hf.model.layers)}
    assert_matches_hf(model, hf, tokens, outputs=outputs)


@pytest.mark.parametrize("name", ["dynamic", "longrope", "llama3"])
def test_scaled_configs_export_and_reload(tmp_path, name):
    _, model = _model_pair(tmp_path / "a", SCALINGS[name])
    ji.save_pretrained(model, tmp_path / "b")
    written = json.loads((tmp_path / "b" / "config.json").read_text())
    assert written["max_position_embeddings"] == CTX and written["rope_parameters"]["rope_type"] == name
    assert ji.load(tmp_path / "b").config == model.config
    hf_b = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "b", attn_implementation="eager").eval()
    tokens = np.arange(CTX + 3)[None] % SHAPE["vocab_size"] if name == "dynamic" else np.arange(CTX)[None] % 53
    assert max_err(model.run(tokens).logits, hf_forward(hf_b, tokens).logits) < 1e-4


@pytest.mark.parametrize("rope,message", [
    ({"rope_type": "su", "factor": 2.0}, r"unsupported rope type 'su'.*supported rope types: \['default', 'dynamic'"),
    ({"rope_type": "linear"}, r"rope type 'linear' has missing keys \['factor'\]"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
      "original_max_position_embeddings": 8, "beta_fast": 3}, r"unknown keys \['beta_fast'\].*takes \["),
    ({"type": "linear", "factor": 0.5}, r"factor must be >= 1, got 0.5"),
])
def test_bad_rope_configs_are_refused(rope, message):
    with pytest.raises(ConversionError, match=message):
        LlamaConfig.from_hf({"model_type": "llama", **SHAPE, "rope_scaling": rope})
