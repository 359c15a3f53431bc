"""The model zoo vs Hugging Face transformers, float32, on random-initialised models of two or more
shapes per family (GQA / MHA / MQA, tied / untied, sequences longer than the sliding window, rope
scaling that changes the result): logits, every hidden state, every attention pattern and the
block's sub-module outputs; the export back to a directory transformers opens with equal logits;
a left-padded batch with HF's position ids; and a bfloat16 load."""

import numpy as np
import pytest

from tests.hf_utils import hf_forward, max_err, save_random_hf, transformers
from tests.models.zoo_utils import assert_bf16_runs, assert_matches_hf, assert_padded_matches_hf

import jaxinterp as ji

SEQ = 13  # longer than every sliding window below


def _gemma_hooks(hf, sandwich: bool):
    outputs, inputs = {}, {}
    for i, layer in enumerate(hf.model.layers):
        b = f"blocks.{i}"
        outputs.update({f"{b}.ln1": layer.input_layernorm, f"{b}.mlp.pre": layer.mlp.gate_proj,
                        f"{b}.mlp.up": layer.mlp.up_proj})
        inputs[f"{b}.mlp.post"] = layer.mlp.down_proj
        if sandwich:  # raw projections, then the post-norms whose outputs join the residual
            outputs.update({f"{b}.attn.out": layer.self_attn, f"{b}.attn_out": layer.post_attention_layernorm,
                            f"{b}.ln2": layer.pre_feedforward_layernorm, f"{b}.mlp.out": layer.mlp,
                            f"{b}.mlp_out": layer.post_feedforward_layernorm})
            inputs[f"{b}.resid_mid"] = layer.pre_feedforward_layernorm
        else:
            outputs.update({f"{b}.attn_out": layer.self_attn, f"{b}.ln2": layer.post_attention_layernorm,
                            f"{b}.mlp_out": layer.mlp})
            inputs[f"{b}.resid_mid"] = layer.post_attention_layernorm
    return outputs, inputs


def _llama_like_hooks(hf, post_norm=False, mlp="mlp", router=None, fused=False):
    """Module hooks of llama-like layers (``self_attn``, ``input_layernorm``, ``post_attention_layernorm``)."""
    outputs, inputs = {}, {}
    for i, layer in enumerate(hf.model.layers):
        b, block = f"blocks.{i}", getattr(layer, mlp)
        if post_norm:  # OLMo-2: raw sub-layer outputs, then the norms whose outputs join the residual
            outputs.update({f"{b}.attn.out": layer.self_attn, f"{b}.attn_out": layer.post_attention_layernorm,
                            f"{b}.mlp.out": block, f"{b}.mlp_out": layer.post_feedforward_layernorm})
            inputs[f"{b}.resid_mid"] = block
        else:
            outputs.update({f"{b}.ln1": layer.input_layernorm, f"{b}.ln2": layer.post_attention_layernorm,
                            f"{b}.attn_out": layer.self_attn, f"{b}.mlp_out": block})
            inputs[f"{b}.resid_mid"] = layer.post_attention_layernorm
        if router is not None:
            outputs[f"{b}.moe.router_logits"] = getattr(block, router)
        elif fused:
            inputs[f"{b}.mlp.post"] = block.down_proj
        else:
            outputs.update({f"{b}.mlp.pre": block.gate_proj, f"{b}.mlp.up": block.up_proj})
            inputs[f"{b}.mlp.post"] = block.down_proj
    return outputs, inputs


def _gptj_hooks(hf):
    outputs, inputs = {}, {}
    for i, layer in enumerate(hf.transformer.h):
        b = f"blocks.{i}"
        outputs.update({f"{b}.ln1": layer.ln_1, f"{b}.attn_out": layer.attn, f"{b}.mlp_out": layer.mlp,
                        f"{b}.mlp.pre": layer.mlp.fc_in})
        inputs[f"{b}.mlp.post"] = layer.mlp.fc_out
    return outputs, inputs


LONGROPE = {"rope_type": "longrope", "rope_theta": 500.0, "partial_rotary_factor": 0.5,
            "short_factor": [1.0, 1.5], "long_factor": [2.0, 6.0]}
SMALL = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48, vocab_size=61,
             max_position_embeddings=32)
# case -> (family, HF config class, HF model class, config fields, hooks(hf) -> (outputs, inputs))
CASES = {
    "gemma-mha-untied": ("gemma", "GemmaConfig", "GemmaForCausalLM",
                         dict(SMALL, num_key_value_heads=4, head_dim=8, tie_word_embeddings=False, hidden_act="gelu"),
                         lambda hf: _gemma_hooks(hf, False)),
    "gemma-mqa-tied-bias": ("gemma", "GemmaConfig", "GemmaForCausalLM",
                            dict(SMALL, num_key_value_heads=1, head_dim=16, attention_bias=True),
                            lambda hf: _gemma_hooks(hf, False)),
    "gemma2-gqa-window-softcap": ("gemma", "Gemma2Config", "Gemma2ForCausalLM",
                                  dict(SMALL, num_key_value_heads=2, head_dim=16, sliding_window=4,
                                       query_pre_attn_scalar=12, attn_logit_softcapping=0.5,
                                       final_logit_softcapping=0.8),
                                  lambda hf: _gemma_hooks(hf, True)),
    "gemma2-mha-untied-types": ("gemma", "Gemma2Config", "Gemma2ForCausalLM",
                                dict(SMALL, num_key_value_heads=4, head_dim=8, sliding_window=3,
                                     tie_word_embeddings=False, query_pre_attn_scalar=8,
                                     layer_types=["full_attention", "sliding_attention", "sliding_attention"]),
                                lambda hf: _gemma_hooks(hf, True)),
    "gemma3-gqa-linear-rope": ("gemma", "Gemma3TextConfig", "Gemma3ForCausalLM",
                               dict(SMALL, num_key_value_heads=2, head_dim=16, sliding_window=4, sliding_window_pattern=2,
                                    query_pre_attn_scalar=16,
                                    rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0,
                                                                        "rope_theta": 1e4},
                                                     "sliding_attention": {"rope_type": "default",
                                                                           "rope_theta": 50.0}}),
                               lambda hf: _gemma_hooks(hf, True)),
    "gemma3-mha-untied-softcap": ("gemma", "Gemma3TextConfig", "Gemma3ForCausalLM",
                                  dict(SMALL, num_key_value_heads=4, head_dim=8, sliding_window=5,
                                       tie_word_embeddings=False, final_logit_softcapping=1.5, query_pre_attn_scalar=8,
                                       layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
                                  lambda hf: _gemma_hooks(hf, True)),
    "llama3.2-mqa-tied": ("llama", "LlamaConfig", "LlamaForCausalLM",
                          dict(SMALL, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True,
                               rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 32.0,
                                                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                "original_max_position_embeddings": 8}),
                          _llama_like_hooks),
    "qwen3-gqa-tied": ("llama", "Qwen3Config", "Qwen3ForCausalLM",
                       dict(SMALL, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True),
                       _llama_like_hooks),
    "qwen3-mha-window-bias": ("llama", "Qwen3Config", "Qwen3ForCausalLM",
                              dict(SMALL, num_key_value_heads=4, head_dim=8, attention_bias=True,
                                   use_sliding_window=True, sliding_window=4, max_window_layers=1),
                              _llama_like_hooks),
    "olmo2-gqa-untied": ("olmo2", "Olmo2Config", "Olmo2ForCausalLM", dict(SMALL, num_key_value_heads=2),
                         lambda hf: _llama_like_hooks(hf, post_norm=True)),
    "olmo2-mha-tied-bias-dynamic": ("olmo2", "Olmo2Config", "Olmo2ForCausalLM",
                                    dict(SMALL, num_key_value_heads=4, tie_word_embeddings=True,
                                         attention_bias=True, max_position_embeddings=8,
                                         rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e3}),
                                    lambda hf: _llama_like_hooks(hf, post_norm=True)),
    "phi3-gqa-window-longrope-partial": ("phi3", "Phi3Config", "Phi3ForCausalLM",
                                         dict(SMALL, num_key_value_heads=2, sliding_window=5, pad_token_id=0,
                                              original_max_position_embeddings=8, rope_parameters=LONGROPE),
                                         lambda hf: _llama_like_hooks(hf, fused=True)),
    "phi3-mha-tied": ("phi3", "Phi3Config", "Phi3ForCausalLM",
                      dict(SMALL, num_key_value_heads=4, tie_word_embeddings=True, pad_token_id=0),
                      lambda hf: _llama_like_hooks(hf, fused=True)),
    "gptj-untied": ("gptj", "GPTJConfig", "GPTJForCausalLM",
                    dict(n_embd=32, n_layer=3, n_head=4, rotary_dim=4, vocab_size=61, n_positions=32), _gptj_hooks),
    "gptj-tied-full-rotary": ("gptj", "GPTJConfig", "GPTJForCausalLM",
                              dict(n_embd=32, n_layer=2, n_head=2, rotary_dim=16, vocab_size=61, n_positions=32,
                                   n_inner=40, tie_word_embeddings=True, activation_function="gelu"), _gptj_hooks),
    "mixtral-gqa-window-top2": ("mixtral", "MixtralConfig", "MixtralForCausalLM",
                                dict(SMALL, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                     sliding_window=5),
                                lambda hf: _llama_like_hooks(hf, router="gate")),
    "mixtral-mha-tied-top1": ("mixtral", "MixtralConfig", "MixtralForCausalLM",
                              dict(SMALL, num_key_value_heads=4, num_local_experts=3, num_experts_per_tok=1,
                                   tie_word_embeddings=True),
                              lambda hf: _llama_like_hooks(hf, router="gate")),
    "olmoe-top2-unnormalised-clip": ("mixtral", "OlmoeConfig", "OlmoeForCausalLM",
                                     dict(SMALL, num_key_value_heads=4, num_experts=4, num_experts_per_tok=2,
                                          clip_qkv=0.05),
                                     lambda hf: _llama_like_hooks(hf, router="gate")),
}
FAMILY_CASE = {}  # family -> its first case (padding / bf16 checks)
for _name, (_fam, *_rest) in CASES.items():
    FAMILY_CASE.setdefault(_fam, _name)


def _hf_model(path, case):
    _, cfg_cls, model_cls, fields, _ = CASES[case]
    config = getattr(transformers, cfg_cls)(**fields, attn_implementation="eager")
    return save_random_hf(getattr(transformers, model_cls), config, path)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_hf_and_exports(tmp_path, case):
    family, _, model_cls, fields, hooks = CASES[case]
    hf = _hf_model(tmp_path / "hf", case)
    model = ji.load(tmp_path / "hf")
    assert model.family == family
    tokens = np.random.default_rng(0).integers(0, fields["vocab_size"], size=(2, SEQ))
    cache = assert_matches_hf(model, hf, tokens, *hooks(hf))
    windows = model.config.arch.windows or ()
    assert all(w is None or w < SEQ for w in windows)
    # export: a directory transformers opens (as the same class) with equal logits, and we read back
    ji.save_pretrained(model, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert type(back).__name__ == model_cls
    logits = hf_forward(back, tokens).logits
    assert max_err(logits, hf_forward(hf, tokens).logits) < 1e-5
    assert ji.load(tmp_path / "out").config == model.config
    assert np.isfinite(np.asarray(cache["final_norm"])).all()


@pytest.mark.parametrize("family", list(FAMILY_CASE))
def test_left_padded_batch_and_bf16(tmp_path, family):
    case = FAMILY_CASE[family]
    hf = _hf_model(tmp_path, case)
    model = ji.load(tmp_path)
    assert_padded_matches_hf(model, hf, CASES[case][3]["vocab_size"])
    assert_bf16_runs(tmp_path, CASES[case][3]["vocab_size"])
