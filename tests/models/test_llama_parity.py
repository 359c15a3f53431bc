"""Llama-family port (Llama, Mistral, Qwen2) vs Hugging Face transformers, site by site, float32."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.hf_utils import hf_forward, hooked_forward, max_err, save_random_hf, torch, transformers, visited_sites

import jaxinterp as ji
from jaxinterp.hf import ConversionError, read_hf_dir, write_hf_dir
from jaxinterp.models.llama import FAMILY, LlamaConfig

TOL = 1e-4
HF_CLASSES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
}
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, vocab_size=40,
             max_position_embeddings=32)
CASES = {
    "llama-mha": ("llama", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                intermediate_size=96, vocab_size=101, max_position_embeddings=64)),
    "llama-gqa4/2-headdim": ("llama", dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
                                           num_key_value_heads=2, head_dim=16, intermediate_size=80, vocab_size=77,
                                           max_position_embeddings=32, rope_theta=500000.0, rms_norm_eps=1e-5)),
    "llama-mqa-tied-bias": ("llama", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=1, intermediate_size=64, vocab_size=50,
                                          max_position_embeddings=16, tie_word_embeddings=True, attention_bias=True,
                                          mlp_bias=True)),
    "qwen2-bias-window": ("qwen2", dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64, vocab_size=60,
                                        max_position_embeddings=32, use_sliding_window=True, sliding_window=4,
                                        max_window_layers=1, rope_theta=1e6)),
    "mistral-window": ("mistral", dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, intermediate_size=64, vocab_size=60,
                                       max_position_embeddings=32, sliding_window=5)),
}


def _hf_model(path, variant, **fields):
    cfg_cls, model_cls = HF_CLASSES[variant]
    return save_random_hf(model_cls, cfg_cls(**fields, attn_implementation="eager"), path)


def _layer_hooks(hf):
    outputs, inputs = {}, {}
    for i, layer in enumerate(hf.model.layers):
        outputs.update({f"{i}.attn_out": layer.self_attn, f"{i}.mlp_out": layer.mlp, f"{i}.mlp.pre": layer.mlp.gate_proj,
                        f"{i}.mlp.up": layer.mlp.up_proj,
                        f"{i}.ln1": layer.input_layernorm, f"{i}.ln2": layer.post_attention_layernorm})
        inputs.update({f"{i}.mlp.post": layer.mlp.down_proj, f"{i}.resid_mid": layer.post_attention_layernorm})
    return outputs, inputs


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("batch,seq", [(1, 7), (3, 13)])
def test_llama_family_matches_hf(tmp_path, case, batch, seq):
    variant, shape = CASES[case]
    hf = _hf_model(tmp_path, variant, **shape)
    model = ji.load(tmp_path)
    assert model.config.variant == variant
    n = shape["num_hidden_layers"]
    tokens = np.random.default_rng(seq).integers(0, shape["vocab_size"], size=(batch, seq))
    ref, rec = hooked_forward(hf, tokens, *_layer_hooks(hf))
    out = model.run(tokens, capture="all")
    c = out.cache

    assert max_err(out.logits, ref.logits) < TOL
    assert max_err(c["embed"], ref.hidden_states[0]) < TOL
    for i in range(n - 1):
        assert max_err(c[f"blocks.{i}.resid_post"], ref.hidden_states[i + 1]) < TOL, i
    assert max_err(c["final_norm"], ref.hidden_states[n]) < TOL
    for i in range(n):
        b = f"blocks.{i}"
        assert max_err(c[f"{b}.attn.pattern"], ref.attentions[i]) < TOL, i
        for site in ("attn_out", "mlp_out", "mlp.pre", "mlp.up", "mlp.post", "ln1", "ln2", "resid_mid"):
            assert max_err(c[f"{b}.{site}"], rec[f"{i}.{site}"]) < TOL, (i, site)
        n_kv = shape.get("num_key_value_heads", shape["num_attention_heads"])
        assert c[f"{b}.attn.k"].shape[2] == c[f"{b}.attn.v"].shape[2] == n_kv
    with torch.no_grad():
        normed = hf.model.norm(torch.as_tensor(np.array(c[f"blocks.{n - 1}.resid_post"])))
    assert max_err(normed, ref.hidden_states[n]) < TOL


def test_sliding_window_is_active(tmp_path):
    """The windowed configs really mask keys further back than the window (so parity above means something)."""
    _, shape = CASES["mistral-window"]
    _hf_model(tmp_path, "mistral", **shape)
    model = ji.load(tmp_path)
    pattern = np.asarray(model.run(np.arange(13)[None] % 60, capture="blocks.0.attn.pattern").cache["blocks.0.attn.pattern"])
    q, k = np.meshgrid(np.arange(13), np.arange(13), indexing="ij")
    assert np.all(pattern[..., (k <= q - 5) | (k > q)] == 0)
    assert np.all(pattern[..., (k > q - 5) & (k <= q)] > 0)
    qwen = LlamaConfig.from_hf(HF_CLASSES["qwen2"][0](**CASES["qwen2-bias-window"][1]).to_dict())
    assert [qwen.window_for(i) for i in range(3)] == [None, 4, 4]


def _abstract_params(cfg):
    return ji.model.abstract_params(cfg)


@pytest.mark.parametrize("preset", ["llama_tiny", "mistral_tiny", "qwen2_tiny"])
def test_sites_visited_equal_model_sites(preset):
    cfg = getattr(LlamaConfig, preset)(n_layers=2, vocab_size=40)
    model = ji.Model(_abstract_params(cfg), cfg, FAMILY.name)
    assert visited_sites(model, capture="all") == list(model.sites)
    # Unobserved, attention runs fused: its scores and pattern are never formed.
    assert visited_sites(model) == [s for s in model.sites if not s.endswith((".scores", ".pattern"))]
    design = ["resid_pre", "ln1", "attn.q", "attn.k", "attn.v", "attn.scores", "attn.pattern", "attn.z", "attn_out",
              "resid_mid", "ln2", "mlp.pre", "mlp.up", "mlp.post", "mlp_out", "resid_post"]  # DESIGN.md, forward order
    assert list(model.sites) == ["embed", *[f"blocks.{i}.{s}" for i in range(2) for s in design], "final_norm"]


@pytest.mark.parametrize("preset", ["llama_tiny", "mistral_tiny", "qwen2_tiny"])
def test_preset_exports_load_in_transformers(tmp_path, preset):
    """to_hf of every variant gives a config that transformers loads back to the same model."""
    cfg = getattr(LlamaConfig, preset)(max_seq_len=32, sliding_window=4 if preset != "llama_tiny" else None)
    model = ji.init(cfg, 2)
    ji.save_pretrained(model, tmp_path)
    assert LlamaConfig.from_hf(json.loads((tmp_path / "config.json").read_text())) == cfg
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(hf) is HF_CLASSES[cfg.variant][1]
    tokens = np.random.default_rng(0).integers(0, 512, size=(2, 9))
    assert max_err(model.run(tokens).logits, hf_forward(hf, tokens).logits) < TOL


@pytest.mark.parametrize("case", ["llama-gqa4/2-headdim", "llama-mqa-tied-bias", "qwen2-bias-window"])
def test_roundtrip_export(tmp_path, case):
    variant, shape = CASES[case]
    _hf_model(tmp_path / "a", variant, **shape)
    model = ji.load(tmp_path / "a")
    ji.save_pretrained(model, tmp_path / "b")
    hf_b = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "b", attn_implementation="eager").eval()
    tokens = np.arange(11)[None] % shape["vocab_size"]
    assert max_err(model.run(tokens).logits, hf_forward(hf_b, tokens).logits) < TOL
    assert ji.load(tmp_path / "b").config == model.config


def test_legacy_rope_fields_and_refusals():
    base = {"model_type": "llama", **SMALL}
    assert LlamaConfig.from_hf({**base, "rope_theta": 5e5, "rope_scaling": None}).rope_theta == 5e5
    # scaled types are read (numbers checked in test_rope_scaling.py); an unknown one is refused
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8}
    assert LlamaConfig.from_hf({**base, "rope_scaling": llama3}).rope_scaling.rope_type == "llama3"
    assert LlamaConfig.from_hf({**base, "rope_scaling": {"type": "dynamic", "factor": 2.0}}).max_seq_len == 64
    with pytest.raises(ConversionError, match=r"unsupported rope type 'ntk'.*supported rope types: \['default', "):
        LlamaConfig.from_hf({**base, "rope_scaling": {"type": "ntk", "factor": 2.0}})
    with pytest.raises(ConversionError, match=r"partial_rotary_factor=0.5"):
        LlamaConfig.from_hf({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                         "partial_rotary_factor": 0.5}})
    with pytest.raises(ConversionError, match=r"does not handle: \['sliding_window'\]"):
        LlamaConfig.from_hf({**base, "sliding_window": 8})  # llama has no window: not silently dropped


def test_config_validation_messages():
    with pytest.raises(ValueError, match=r"n_heads \(4\) must be a multiple of n_kv_heads \(3\)"):
        LlamaConfig.llama_tiny(n_kv_heads=3)
    with pytest.raises(ValueError, match=r"variant must be one of \('llama', 'mistral', 'qwen2', 'qwen3'\)"):
        LlamaConfig.llama_tiny(variant="gemma")
    with pytest.raises(ValueError, match=r"qwen2 has q/k/v biases only"):
        LlamaConfig.qwen2_tiny(qkv_bias=False)


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama_small")
    _hf_model(path, "llama", num_key_value_heads=2, **SMALL)
    return path


def _corrupt(src, dst, config_edit=None, tensor_edit=None):
    config, tensors = read_hf_dir(src)
    tensors = {k: np.array(v) for k, v in tensors.items()}
    if config_edit:
        config_edit(config)
    if tensor_edit:
        tensor_edit(tensors)
    write_hf_dir(dst, config, tensors)
    return dst


K_PROJ = "model.layers.1.self_attn.k_proj.weight"


@pytest.mark.parametrize("case,edit,message", [
    ("unknown-field", dict(config_edit=lambda c: c.update(qk_norm=True)), r"does not handle: \['qk_norm'\]"),
    ("missing", dict(tensor_edit=lambda t: t.pop(K_PROJ)), r"missing tensors \['model.layers.1.self_attn.k_proj.weight'\]"),
    ("extra", dict(tensor_edit=lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": np.zeros(32, np.float32)})),
     r"unexpected tensors \['model.layers.0.self_attn.q_proj.bias'\]"),
    ("mis-shaped", dict(tensor_edit=lambda t: t.update({K_PROJ: np.zeros((32, 32), np.float32)})),
     r"mis-shaped tensors .*k_proj.weight: checkpoint \(32, 32\) vs expected \(16, 32\)"),
    ("untied-copy", dict(config_edit=lambda c: c.update(tie_word_embeddings=True)),
     r"ties the embeddings .* different 'lm_head.weight'"),
])
def test_converter_refuses(small_dir, tmp_path, case, edit, message):
    bad = _corrupt(small_dir, tmp_path / case, **edit)
    with pytest.raises(ConversionError, match=message):
        ji.load(bad)


def test_bfloat16_loading(small_dir):
    f32 = ji.load(small_dir)
    bf16 = ji.load(small_dir, dtype="bfloat16")
    tokens = np.random.default_rng(1).integers(0, 40, size=(2, 9))
    ref = np.asarray(f32.run(tokens).logits)
    out = bf16.run(tokens, capture=["blocks.1.attn.pattern", "blocks.1.mlp.post"])
    assert out.logits.dtype == np.dtype("bfloat16")
    assert all(v.dtype == np.dtype("bfloat16") for v in out.cache.values())
    assert max_err(out.logits, ref) < 0.03 * np.abs(ref).max()


@pytest.mark.parametrize("o_bias", [False, True])
def test_kv_head_ablation_removes_its_query_group(o_bias):
    """Under jit, zeroing kv head 1's values removes exactly the contributions of query heads 2 and 3
    (grouped-query attention shares kv head j with query heads j*rep .. j*rep+rep-1, as HF's repeat_kv)."""
    from jaxinterp.heads import head_contributions, head_output_weights

    cfg = LlamaConfig.llama_tiny(n_layers=1, vocab_size=40, qkv_bias=o_bias, o_bias=o_bias)
    model = ji.init(cfg, 3)
    tokens = np.random.default_rng(0).integers(0, 40, size=(2, 6))
    run = jax.jit(lambda m, t, iv: m.run(t, capture=["blocks.0.attn.z", "blocks.0.attn_out"], interventions=iv).cache)
    clean = run(model, tokens, {})
    per_head = head_contributions(model, clean["blocks.0.attn.z"], 0)  # [B, T, H, D]
    bias = head_output_weights(model, 0)[1]
    assert (bias is not None) == o_bias
    total = per_head.sum(2) + (0 if bias is None else bias)
    np.testing.assert_allclose(total, clean["blocks.0.attn_out"], atol=1e-5)
    ablate = {"blocks.0.attn.v": ji.ZeroAblate(ji.heads_mask(6, cfg.n_kv_heads, 1))}
    ablated = run(model, tokens, ablate)
    np.testing.assert_allclose(ablated["blocks.0.attn_out"], clean["blocks.0.attn_out"] - per_head[:, :, 2:].sum(2),
                               atol=1e-5)


# Abridged config.json files of public checkpoints (written by transformers 4.x: top-level rope_theta,
# rope_scaling null, pretraining_tp), parsed without downloading anything.
_TINYLLAMA = {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 1, "eos_token_id": 2,
              "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 5632,
              "max_position_embeddings": 2048, "model_type": "llama", "num_attention_heads": 32,
              "num_hidden_layers": 22, "num_key_value_heads": 4, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
              "rope_scaling": None, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
              "transformers_version": "4.35.0", "use_cache": True, "vocab_size": 32000}
_MISTRAL = {"architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
            "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
            "max_position_embeddings": 32768, "model_type": "mistral", "num_attention_heads": 32,
            "num_hidden_layers": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
            "sliding_window": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
            "vocab_size": 32000}
_QWEN2 = {"architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
          "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
          "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 24, "model_type": "qwen2",
          "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
          "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
          "use_cache": True, "use_sliding_window": False, "vocab_size": 151936}


@pytest.mark.parametrize("config,preset", [(_TINYLLAMA, "tinyllama_1b"), (_MISTRAL, "mistral_7b"),
                                           (_QWEN2, "qwen2_0_5b")])
def test_public_configs_parse_to_presets(config, preset):
    assert LlamaConfig.from_hf(config) == getattr(LlamaConfig, preset)()
    # ... and transformers reads our export of it back to the same architecture.
    exported = getattr(LlamaConfig, preset)().to_hf()
    hf_cfg = transformers.AutoConfig.for_model(**exported)
    assert LlamaConfig.from_hf({k: v for k, v in hf_cfg.to_dict().items() if k in exported}) == LlamaConfig.from_hf(config)
