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
