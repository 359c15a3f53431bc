"""GPT-NeoX/Pythia port vs Hugging Face transformers, site by site, float32, random-initialised models."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.hf_utils import hf_forward, hooked_forward, max_err, save_random_hf, torch, transformers, visited_sites

import jaxinterp as ji
from jaxinterp.hf import ConversionError, read_hf_dir, write_hf_dir
from jaxinterp.models.gpt_neox import FAMILY, GPTNeoXConfig

TOL = 1e-4
BASE = dict(attn_implementation="eager")
SHAPES = {
    "parallel-rot0.25": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                             vocab_size=101, max_position_embeddings=64, use_parallel_residual=True, rotary_pct=0.25),
    "sequential-rot0.5-nobias": dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=4, intermediate_size=80,
                                     vocab_size=77, max_position_embeddings=32, use_parallel_residual=False,
                                     rotary_pct=0.5, rotary_emb_base=500.0, attention_bias=False),
    "sequential-rot0.25-tied": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    vocab_size=50, max_position_embeddings=16, use_parallel_residual=False,
                                    rotary_pct=0.25, tie_word_embeddings=True),
    "parallel-rot1.0-gelu_new": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                                     vocab_size=60, max_position_embeddings=16, rotary_pct=1.0, hidden_act="gelu_new"),
}


def _hf_model(tmp_path, **fields):
    cfg = transformers.GPTNeoXConfig(**fields, **BASE)
    return save_random_hf(transformers.GPTNeoXForCausalLM, cfg, tmp_path)


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("batch,seq", [(1, 7), (3, 13)])
def test_gpt_neox_matches_hf(tmp_path, name, batch, seq):
    shape = SHAPES[name]
    hf = _hf_model(tmp_path, **shape)
    model = ji.load(tmp_path)
    n = shape["num_hidden_layers"]
    assert model.config.parallel_residual == shape.get("use_parallel_residual", True)
    tokens = np.random.default_rng(seq).integers(0, shape["vocab_size"], size=(batch, seq))
    layers = hf.gpt_neox.layers
    hooks_out = {}
    hooks_in = {}
    for i, layer in enumerate(layers):
        hooks_out.update({f"{i}.attn_out": layer.attention, f"{i}.mlp_out": layer.mlp,
                          f"{i}.mlp.pre": layer.mlp.dense_h_to_4h, f"{i}.mlp.post": layer.mlp.act,
                          f"{i}.ln1": layer.input_layernorm, f"{i}.ln2": layer.post_attention_layernorm})
        hooks_in[f"{i}.ln2_in"] = layer.post_attention_layernorm
    ref, rec = hooked_forward(hf, tokens, hooks_out, hooks_in)
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
        for site in ("attn_out", "mlp_out", "mlp.pre", "mlp.post", "ln1", "ln2"):
            assert max_err(c[f"{b}.{site}"], rec[f"{i}.{site}"]) < TOL, (i, site)
        # The MLP reads resid_mid (sequential) or resid_pre (parallel residual).
        mlp_in = c[f"{b}.resid_pre"] if model.config.parallel_residual else c[f"{b}.resid_mid"]
        assert max_err(mlp_in, rec[f"{i}.ln2_in"]) < TOL, i
    # The last layer's resid_post has no direct HF counterpart; check it through the final norm.
    hf_norm = hf.gpt_neox.final_layer_norm
    with torch.no_grad():
        normed = hf_norm(torch.as_tensor(np.array(c[f"blocks.{n - 1}.resid_post"])))
    assert max_err(normed, ref.hidden_states[n]) < TOL


def _abstract_params(cfg):
    return ji.model.abstract_params(cfg)


@pytest.mark.parametrize("parallel", [True, False])
def test_sites_visited_equal_model_sites(parallel):
    cfg = GPTNeoXConfig.tiny(n_layers=2, parallel_residual=parallel, vocab_size=40)
    model = ji.Model(_abstract_params(cfg), cfg, FAMILY.name)
    assert visited_sites(model, capture="all") == list(model.sites)
    # Unobserved, attention runs fused: its scores and pattern are never formed.
    assert visited_sites(model) == [s for s in model.sites if not s.endswith((".scores", ".pattern"))]
    design = ["resid_pre", "ln1", "attn.q", "attn.k", "attn.v", "attn.scores", "attn.pattern", "attn.z", "attn_out",
              "resid_mid", "ln2", "mlp.pre", "mlp.post", "mlp_out", "resid_post"]  # DESIGN.md, forward order
    if parallel:
        design.remove("resid_mid")
    assert list(model.sites) == ["embed", *[f"blocks.{i}.{s}" for i in range(2) for s in design], "final_norm"]


def test_qkv_heads_are_interleaved_like_hf(tmp_path):
    """q/k/v sites split the fused projection per head as HF does ([H, 3, Dh] output rows)."""
    fields = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=32, vocab_size=30,
                  max_position_embeddings=16, rotary_pct=0.5)
    hf = _hf_model(tmp_path, **fields)
    model = ji.load(tmp_path)
    tokens = np.arange(6)[None]
    _, rec = hooked_forward(hf, tokens, {"qkv": hf.gpt_neox.layers[0].attention.query_key_value})
    v_hf = rec["qkv"].reshape(1, 6, 4, 3, 8)[..., 2, :]  # v is not rotated: compare it directly
    out = model.run(tokens, capture="blocks.0.attn.v")
    assert max_err(out.cache["blocks.0.attn.v"], v_hf) < TOL


@pytest.mark.parametrize("parallel,tied", [(True, False), (False, True)])
def test_roundtrip_export(tmp_path, parallel, tied):
    fields = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=40,
                  max_position_embeddings=16, use_parallel_residual=parallel, rotary_pct=0.5,
                  tie_word_embeddings=tied)
    _hf_model(tmp_path / "a", **fields)
    model = ji.load(tmp_path / "a")
    ji.save_pretrained(model, tmp_path / "b")
    assert GPTNeoXConfig.from_hf(json.loads((tmp_path / "b" / "config.json").read_text())) == model.config
    hf_b = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "b").eval()
    assert isinstance(hf_b, transformers.GPTNeoXForCausalLM)
    tokens = np.arange(11)[None] % 40
    assert max_err(model.run(tokens).logits, hf_forward(hf_b, tokens).logits) < TOL


def test_preset_exports_load_in_transformers(tmp_path):
    model = ji.init(GPTNeoXConfig.tiny(parallel_residual=False, rotary_pct=0.5), 1)
    ji.save_pretrained(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    tokens = np.random.default_rng(0).integers(0, 512, size=(2, 9))
    assert max_err(model.run(tokens).logits, hf_forward(hf, tokens).logits) < TOL


def test_legacy_pythia_config_fields():
    """Pre-transformers-5 Pythia configs keep rotary_pct / rotary_emb_base at top level."""
    legacy = {"architectures": ["GPTNeoXForCausalLM"], "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "gelu",
              "hidden_size": 512, "initializer_range": 0.02, "intermediate_size": 2048, "layer_norm_eps": 1e-05,
              "max_position_embeddings": 2048, "model_type": "gpt_neox", "num_attention_heads": 8,
              "num_hidden_layers": 6, "rotary_emb_base": 10000, "rotary_pct": 0.25, "tie_word_embeddings": False,
              "torch_dtype": "float16", "transformers_version": "4.24.0", "use_cache": True,
              "use_parallel_residual": True, "vocab_size": 50304}
    assert GPTNeoXConfig.from_hf(legacy) == GPTNeoXConfig.pythia_70m()
    assert GPTNeoXConfig.from_hf({**legacy, "rotary_pct": 0.5, "rotary_emb_base": 500}).rotary_dim == 32


def _corrupt(src, dst, config_edit=None, tensor_edit=None):
    config, tensors = read_hf_dir(src)
    tensors = {k: np.array(v) for k, v in tensors.items()}
    if config_edit:
        config_edit(config)
    if tensor_edit:
        tensor_edit(tensors)
    write_hf_dir(dst, config, tensors)
    return dst


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("neox_small")
    _hf_model(path, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=40,
              max_position_embeddings=16)
    return path


QKV = "gpt_neox.layers.1.attention.query_key_value.weight"


@pytest.mark.parametrize("case,edit,message", [
    ("unknown-field", dict(config_edit=lambda c: c.update(fancy_new_norm=True)), r"fancy_new_norm"),
    ("rope-type", dict(config_edit=lambda c: c.update(rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                       "rope_theta": 1e4})),
     r"rope type 'dynamic'.*supported rope types: \['default'\]"),
    ("odd-rotary", dict(config_edit=lambda c: c["rope_parameters"].update(partial_rotary_factor=0.375)),
     r"rotary_pct=0.375 of head_dim=8 gives rotary_dim=3; it must be a positive even number"),
    ("missing", dict(tensor_edit=lambda t: t.pop(QKV)), r"missing tensors \[.*query_key_value\.weight"),
    ("extra", dict(tensor_edit=lambda t: t.update({"gpt_neox.layers.0.attention.lora.weight": np.zeros(3, np.float32)})),
     r"unexpected tensors \['gpt_neox.layers.0.attention.lora.weight'\]"),
    ("mis-shaped", dict(tensor_edit=lambda t: t.update({QKV: np.zeros((96, 30), np.float32)})),
     r"mis-shaped tensors .*query_key_value.weight: checkpoint \(96, 30\) vs expected \(96, 32\)"),
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
    out = bf16.run(tokens, capture="blocks.1.attn.pattern")
    assert out.logits.dtype == np.dtype("bfloat16")
    assert out.cache["blocks.1.attn.pattern"].dtype == np.dtype("bfloat16")
    assert max_err(out.logits, ref) < 0.03 * np.abs(ref).max()


@pytest.mark.parametrize("bias", [True, False])
def test_head_contributions_sum_to_attn_out(bias):
    from jaxinterp.heads import head_contributions, head_output_weights

    cfg = GPTNeoXConfig.tiny(n_layers=2, vocab_size=40, attention_bias=bias)
    model = ji.init(cfg, 4)
    tokens = np.random.default_rng(0).integers(0, 40, size=(2, 6))
    run = jax.jit(lambda m, t, iv: m.run(t, capture=["blocks.1.attn.z", "blocks.1.attn_out"], interventions=iv).cache)
    clean = run(model, tokens, {})
    per_head = head_contributions(model, clean["blocks.1.attn.z"], 1)  # [B, T, H, D]
    w_bias = head_output_weights(model, 1)[1]
    assert (w_bias is not None) == bias
    np.testing.assert_allclose(per_head.sum(2) + (0 if w_bias is None else w_bias), clean["blocks.1.attn_out"],
                               atol=1e-5)
    ablated = run(model, tokens, {"blocks.1.attn.z": ji.ZeroAblate(ji.heads_mask(6, cfg.n_heads, 3))})
    np.testing.assert_allclose(ablated["blocks.1.attn_out"], clean["blocks.1.attn_out"] - per_head[:, :, 3], atol=1e-5)
