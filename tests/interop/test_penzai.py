"""penzai interop: penzai's own (independent) llama-like and GPT-NeoX implementations give the
same logits as this library's families, both ways, and layouts jaxinterp does not map are refused."""

import dataclasses

import jax
import numpy as np
import pytest

pytest.importorskip("penzai")
from penzai import pz  # noqa: E402
from penzai.models.transformer.variants import gpt_neox as pz_neox  # noqa: E402
from penzai.models.transformer.variants import llamalike_common as pz_ll  # noqa: E402

import jaxinterp as ji  # noqa: E402
from jaxinterp.families import family_for_config  # noqa: E402
from jaxinterp.model import Model, abstract_params  # noqa: E402
from jaxinterp.models.gpt_neox.config import GPTNeoXConfig  # noqa: E402
from jaxinterp.models.llama.config import LlamaConfig  # noqa: E402

TOL = 1e-5
TOKENS = np.random.default_rng(0).integers(0, 61, size=(2, 9))


@pytest.fixture(scope="module")
def penzai_models():
    """Random models built by penzai's own builders (GQA llama-like; GPT-NeoX as a layer stack)."""
    llama = pz_ll.LlamalikeTransformerConfig(
        num_kv_heads=2, query_head_multiplier=2, embedding_dim=32, projection_dim=8, mlp_hidden_dim=48,
        num_decoder_blocks=2, vocab_size=61, mlp_variant="swiglu", tie_embedder_and_logits=False,
        rope_wavelength=500.0, rms_norm_eps=1e-5, parameter_dtype=np.float32, activation_dtype=np.float32)
    neox = pz_neox.GPTNeoXTransformerConfig(  # epsilon 1e-6: penzai's builder gives the final norm 1e-6 always
        num_attention_heads=4, embedding_dim=32, projection_dim=8, mlp_hidden_dim=48, num_decoder_blocks=2,
        vocab_size=61, activation_fn="gelu_exact", rope_subset_size=4, rope_wavelength=10000.0,
        layernorm_epsilon=1e-6, parameter_dtype=np.float32, activation_dtype=np.float32, use_layer_stack=True)
    return {"llama": (pz_ll.build_llamalike_transformer(llama, init_base_rng=jax.random.key(1)), False),
            "neox": (pz_neox.build_gpt_neox_transformer(neox, init_base_rng=jax.random.key(2)), True)}


def _err(a, b):
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


@pytest.mark.parametrize("family", ["llama", "neox"])
def test_penzai_models_round_trip_with_equal_logits(penzai_models, family):
    pz_model, stacked = penzai_models[family]
    ref = ji.interop.penzai_logits(pz_model, TOKENS)
    model = ji.interop.from_penzai(pz_model, max_seq_len=32)
    assert model.family == ("llama" if family == "llama" else "gpt_neox")
    assert _err(model.run(TOKENS).logits, ref) <= TOL
    back = ji.interop.to_penzai(model, layer_stack=stacked)
    assert _err(ji.interop.penzai_logits(back, TOKENS), ref) <= TOL
    assert ji.interop.from_penzai(back, max_seq_len=32).config == model.config


def test_to_penzai_of_variants(penzai_models):
    """A Mistral window shorter than the sequence, and NeoX with ln_eps 1e-5 on every norm (the final one too)."""
    llama = ji.interop.from_penzai(penzai_models["llama"][0], max_seq_len=32)
    neox = ji.interop.from_penzai(penzai_models["neox"][0], max_seq_len=32)
    mistral = Model(llama.params, dataclasses.replace(llama.config, variant="mistral", sliding_window=4), "llama")
    neox = Model(neox.params, dataclasses.replace(neox.config, ln_eps=1e-5), "gpt_neox")
    for model in (mistral, neox):
        pz_model = ji.interop.to_penzai(model)
        assert _err(ji.interop.penzai_logits(pz_model, TOKENS), model.run(TOKENS).logits) <= TOL
        assert ji.interop.from_penzai(pz_model, max_seq_len=32).config == model.config


def test_refusals(penzai_models):
    def abstract(cfg):
        return Model(abstract_params(cfg), cfg, family_for_config(cfg).name)

    with pytest.raises(ValueError, match="no q/k/v, output or MLP biases"):
        ji.interop.to_penzai(abstract(LlamaConfig(variant="qwen2", qkv_bias=True, vocab_size=61, d_model=32,
                                                  n_layers=1, n_heads=4, d_mlp=48)))
    with pytest.raises(ValueError, match="parallel only"):
        ji.interop.to_penzai(abstract(GPTNeoXConfig(vocab_size=61, d_model=32, n_layers=1, n_heads=4, d_mlp=48,
                                                    parallel_residual=False)))
    with pytest.raises(ValueError, match="penzai has no counterpart of model family 'gpt2'"):
        ji.interop.to_penzai(abstract(ji.get_family("gpt2").config_cls.tiny(n_layers=1)))
    # blocks at 1e-5 and the final norm at 1e-6 (penzai's builder for layernorm_epsilon=1e-5): not one ln_eps
    pz_model = penzai_models["neox"][0]
    blocks = pz.select(pz_model).at_instances_of(pz.nn.LayerStack).at_instances_of(pz.nn.Standardize)
    with pytest.raises(ValueError, match="different norm epsilons"):
        ji.interop.from_penzai(blocks.apply(lambda s: dataclasses.replace(s, epsilon=1e-5)))
    # a llama-like model with an extra scaling layer jaxinterp does not map is refused, not dropped
    llama = penzai_models["llama"][0]
    scaled = pz.select(llama).at_instances_of(pz.nn.ApplyRoPE).apply(
        lambda r: pz.nn.Sequential([r, pz.nn.ConstantRescale(by=2.0)]))
    with pytest.raises(ValueError, match="differs from the layout jaxinterp maps"):
        ji.interop.from_penzai(scaled)
