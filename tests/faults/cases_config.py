"""config.json type faults for every family's ``from_hf``: strings, floats and bools where ints are required."""

from __future__ import annotations

import json

from jaxinterp.hf import ConversionError
from jaxinterp.models.gemma import GemmaConfig
from jaxinterp.models.gpt2 import GPT2Config
from jaxinterp.models.gpt_neox import GPTNeoXConfig
from jaxinterp.models.gptj import GPTJConfig
from jaxinterp.models.llama import LlamaConfig
from jaxinterp.models.mamba import MambaConfig
from jaxinterp.models.mamba2 import Mamba2Config
from jaxinterp.models.mixtral import MixtralConfig
from jaxinterp.models.olmo2 import Olmo2Config
from jaxinterp.models.phi3 import Phi3Config
from tests.faults.harness import Case, Raises, Returns, expect

BASE = {
    "gpt2": (GPT2Config, GPT2Config.tiny()),
    "gpt_neox": (GPTNeoXConfig, GPTNeoXConfig.tiny()),
    "llama": (LlamaConfig, LlamaConfig.llama_tiny()),
    "mistral": (LlamaConfig, LlamaConfig.mistral_tiny()),
    "mamba": (MambaConfig, MambaConfig.tiny()),
    "falcon_mamba": (MambaConfig, MambaConfig.falcon_tiny()),
    "mamba2": (Mamba2Config, Mamba2Config.tiny()),
    "gemma2": (GemmaConfig, GemmaConfig.gemma2_tiny()),
    "gemma3_text": (GemmaConfig, GemmaConfig.gemma3_tiny()),
    "gptj": (GPTJConfig, GPTJConfig.tiny()),
    "mixtral": (MixtralConfig, MixtralConfig.mixtral_tiny()),
    "olmoe": (MixtralConfig, MixtralConfig.olmoe_tiny()),
    "olmo2": (Olmo2Config, Olmo2Config.tiny()),
    "phi3": (Phi3Config, Phi3Config.tiny()),
}


def _from_hf(family: str, **changes):
    cls, config = BASE[family]
    d = json.loads(json.dumps(config.to_hf()))  # what config.json holds
    d.update(changes)
    return lambda tmp: cls.from_hf(d)


def bad(family: str, field: str, value, expected: str) -> Case:
    shown = json.dumps(value)
    return Case(f"cfg-{family}-{field}-{shown}", _from_hf(family, **{field: value}),
                Raises(ConversionError, rf"{family}.*'{field}'.*{expected}.*got"))


def good(family: str, field: str, value, attr: str, want, **also) -> Case:
    def check(result, tmp):
        got = getattr(result, attr)  # an int where a float is expected is accepted (JSON writes 1.0 as 1)
        same_kind = type(got) is type(want) or (type(want) is float and type(got) is int)
        expect(got == want and same_kind, (attr, got, want))
    return Case(f"cfg-ok-{family}-{field}-{json.dumps(value)}", _from_hf(family, **{field: value}, **also),
                Returns(check))


CASES = [
    bad("gpt2", "n_layer", "2", "int"),
    bad("gpt2", "n_layer", 2.0, "int"),
    bad("gpt2", "n_layer", True, "int"),
    bad("gpt2", "n_embd", 64.5, "int"),
    bad("gpt2", "vocab_size", "512", "int"),
    bad("gpt2", "n_head", None, "int"),
    bad("gpt2", "n_inner", "256", "int"),
    bad("gpt2", "layer_norm_epsilon", "1e-5", "float"),
    bad("gpt2", "layer_norm_epsilon", True, "float"),
    bad("gpt2", "activation_function", 3, "str"),
    bad("gpt2", "tie_word_embeddings", "false", "bool"),
    bad("gpt2", "scale_attn_by_inverse_layer_idx", 1, "bool"),
    bad("gpt_neox", "num_hidden_layers", "2", "int"),
    bad("gpt_neox", "hidden_size", 64.0, "int"),
    bad("gpt_neox", "use_parallel_residual", "false", "bool"),
    bad("gpt_neox", "layer_norm_eps", "1e-5", "float"),
    bad("gpt_neox", "rotary_pct", "0.25", "float"),
    bad("gpt_neox", "attention_bias", 0, "bool"),
    bad("llama", "num_key_value_heads", "2", "int"),
    bad("llama", "head_dim", 16.0, "int"),
    bad("llama", "rms_norm_eps", "1e-6", "float"),
    bad("llama", "tie_word_embeddings", "false", "bool"),
    bad("llama", "attention_bias", 1, "bool"),
    bad("llama", "max_position_embeddings", 128.0, "int"),
    bad("llama", "hidden_act", ["silu"], "str"),
    bad("mistral", "sliding_window", "16", "int"),
    bad("mamba", "state_size", "8", "int"),
    bad("mamba", "conv_kernel", 4.0, "int"),
    bad("mamba", "use_bias", "false", "bool"),
    bad("mamba", "residual_in_fp32", "true", "bool"),
    bad("mamba", "time_step_rank", 8.0, "int"),
    bad("mamba", "time_step_rank", "x", "int"),
    bad("mamba", "layer_norm_epsilon", "1e-5", "float"),
    bad("falcon_mamba", "mixer_rms_eps", "1e-6", "float"),
    bad("mamba2", "n_groups", 2.0, "int"),
    bad("mamba2", "chunk_size", "8", "int"),
    bad("mamba2", "num_heads", True, "int"),
    bad("gemma2", "query_pre_attn_scalar", "32", "float"),
    bad("gemma2", "final_logit_softcapping", "30", "float"),
    bad("gemma3_text", "layer_types", "sliding_attention", "list"),
    bad("gemma3_text", "hidden_activation", 1, "str"),
    bad("gptj", "rotary_dim", 8.0, "int"),
    bad("gptj", "n_layer", "2", "int"),
    bad("mixtral", "num_local_experts", 4.0, "int"),
    bad("mixtral", "num_experts_per_tok", "2", "int"),
    bad("olmoe", "norm_topk_prob", "false", "bool"),
    bad("olmoe", "clip_qkv", "8", "float"),
    bad("olmo2", "rms_norm_eps", "1e-6", "float"),
    bad("olmo2", "rope_parameters", "default", "object"),
    bad("phi3", "sliding_window", 8.5, "int"),
    bad("phi3", "num_key_value_heads", True, "int"),
    good("gpt2", "layer_norm_epsilon", 1, "ln_eps", 1.0),  # an int is a valid float
    good("gpt2", "n_inner", None, "d_mlp", 4 * 64),  # null means the default
    good("gpt_neox", "rotary_pct", 1, "rotary_pct", 1.0, rope_parameters=None),  # legacy fields, ints
    good("llama", "num_key_value_heads", None, "n_kv_heads", 4),
    good("mistral", "sliding_window", None, "sliding_window", None),
    good("mamba", "time_step_rank", "auto", "dt_rank", 4),
    good("mamba", "time_step_rank", 8, "dt_rank", 8),
]
