"""Golden PartitionSpecs: every port's parameters under every rule set."""

from __future__ import annotations

import jax
import pytest
from jax.sharding import PartitionSpec as P

import jaxinterp as ji
from jaxinterp import sharding as jsh
from jaxinterp.models.common import param_shapes
from jaxinterp.sites import SiteContext

RULES = ["dp", "fsdp", "tp", "fsdp_tp"]

# parameter path -> spec per rule set (pure rules, before fitting to a mesh)
GPT2_GOLDEN = {
    "wte": {"dp": P(), "fsdp": P(None, "fsdp"), "tp": P("tensor"), "fsdp_tp": P("tensor", "fsdp")},
    "wpe": {"dp": P(), "fsdp": P(None, "fsdp"), "tp": P(), "fsdp_tp": P(None, "fsdp")},
    "h_0/ln_1/scale": {"dp": P(), "fsdp": P("fsdp"), "tp": P(), "fsdp_tp": P("fsdp")},
    "h_0/attn/c_attn/kernel": {"dp": P(), "fsdp": P("fsdp"), "tp": P(None, "tensor"), "fsdp_tp": P("fsdp", "tensor")},
    "h_0/attn/c_attn/bias": {"dp": P(), "fsdp": P(), "tp": P("tensor"), "fsdp_tp": P("tensor")},
    "h_0/attn/c_proj/kernel": {"dp": P(), "fsdp": P(None, "fsdp"), "tp": P("tensor"), "fsdp_tp": P("tensor", "fsdp")},
    "h_0/mlp/c_fc/kernel": {"dp": P(), "fsdp": P("fsdp"), "tp": P(None, "tensor"), "fsdp_tp": P("fsdp", "tensor")},
    "h_0/mlp/c_fc/bias": {"dp": P(), "fsdp": P(), "tp": P("tensor"), "fsdp_tp": P("tensor")},
    "h_0/mlp/c_proj/kernel": {"dp": P(), "fsdp": P(None, "fsdp"), "tp": P("tensor"), "fsdp_tp": P("tensor", "fsdp")},
    "h_0/mlp/c_proj/bias": {"dp": P(), "fsdp": P("fsdp"), "tp": P(), "fsdp_tp": P("fsdp")},
    "ln_f/bias": {"dp": P(), "fsdp": P("fsdp"), "tp": P(), "fsdp_tp": P("fsdp")},
    "lm_head/kernel": {"dp": P(), "fsdp": P("fsdp"), "tp": P(None, "tensor"), "fsdp_tp": P("fsdp", "tensor")},
}


_EMB = {"dp": P(), "fsdp": P(None, "fsdp"), "tp": P("tensor"), "fsdp_tp": P("tensor", "fsdp")}  # [vocab, embed]
_IN = {"dp": P(), "fsdp": P("fsdp"), "tp": P(None, "tensor"), "fsdp_tp": P("fsdp", "tensor")}  # [embed, heads|mlp]
_OUT = {"dp": P(), "fsdp": P(None, "fsdp"), "tp": P("tensor"), "fsdp_tp": P("tensor", "fsdp")}  # [heads|mlp, embed]
_NORM = {"dp": P(), "fsdp": P("fsdp"), "tp": P(), "fsdp_tp": P("fsdp")}

OTHER_GOLDEN = {
    ("llama", "llama_tiny"): {
        "embed_tokens": _EMB, "layers_0/self_attn/q_proj/kernel": _IN, "layers_0/self_attn/k_proj/kernel": _IN,
        "layers_0/self_attn/o_proj/kernel": _OUT, "layers_0/mlp/gate_proj/kernel": _IN,
        "layers_0/mlp/down_proj/kernel": _OUT, "norm/scale": _NORM,
    },
    ("gpt_neox", "tiny"): {
        "embed_in": _EMB, "layers_1/attention/query_key_value/kernel": _IN, "layers_1/attention/dense/kernel": _OUT,
        "layers_1/mlp/dense_h_to_4h/kernel": _IN, "layers_1/mlp/dense_4h_to_h/kernel": _OUT,
        "embed_out/kernel": _IN, "final_layer_norm/bias": _NORM,
    },
    ("mamba", "tiny"): {
        "embeddings": _EMB,
        "layers_0/mixer/in_proj/kernel": _IN,  # [embed, d_inner]
        "layers_0/mixer/out_proj/kernel": {"dp": P(), "fsdp": P("fsdp"), "tp": P("tensor"), "fsdp_tp": P("tensor", "fsdp")},
        "layers_0/mixer/A_log": {"dp": P(), "fsdp": P("fsdp"), "tp": P("tensor"), "fsdp_tp": P("tensor")},
        "layers_0/mixer/conv1d/kernel": {"dp": P(), "fsdp": P(None, "fsdp"), "tp": P(None, "tensor"),
                                         "fsdp_tp": P(None, "tensor")},
        "layers_0/mixer/x_proj/kernel": {"dp": P(), "fsdp": P("fsdp"), "tp": P("tensor"), "fsdp_tp": P("tensor")},
        "norm_f/scale": _NORM,
    },
}


def _flat_specs(family, params, rules):
    specs = jsh.param_specs(family, params, rules)
    leaves = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]
    return {jsh.axes.path_str(path): spec for path, spec in leaves}


def _small_configs(cls):
    """Every ``*tiny`` preset of a config class (all attention variants), or the default."""
    presets = [getattr(cls, n) for n in dir(cls) if n == "tiny" or n.endswith("_tiny")]
    return [p() for p in presets] or [cls()]


def _shapes(config):
    fam = ji.model.family_for_config(config)
    return param_shapes(fam.module(config), lambda: SiteContext(fam.site_names(config)))


@pytest.mark.parametrize("rules", RULES)
def test_gpt2_golden_specs(rules):
    from jaxinterp.models.gpt2 import GPT2Config

    specs = _flat_specs("gpt2", _shapes(GPT2Config.tiny(tie_embeddings=False)), rules)
    for path, golden in GPT2_GOLDEN.items():
        assert specs[path] == golden[rules], (path, specs[path], golden[rules])


@pytest.mark.parametrize("rules", RULES)
@pytest.mark.parametrize("port", list(OTHER_GOLDEN), ids=[f for f, _ in OTHER_GOLDEN])
def test_other_ports_golden_specs(port, rules):
    family, preset = port
    fam = ji.get_family(family)
    specs = _flat_specs(family, _shapes(getattr(fam.config_cls, preset)()), rules)
    for path, golden in OTHER_GOLDEN[port].items():
        assert path in specs, (path, sorted(specs)[:10])
        assert specs[path] == golden[rules], (path, specs[path], golden[rules])


def test_every_parameter_of_every_port_has_axes():
    """Each registered family's full parameter tree is covered by its table with matching ranks."""
    checked = []
    for name, fam in ji.families().items():
        for config in _small_configs(fam.config_cls):
            axes = jsh.param_axes(name, _shapes(config))
            assert jax.tree_util.tree_leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
        checked.append(name)
    assert "gpt2" in checked


def test_every_site_of_every_port_has_a_layout():
    for name, fam in ji.families().items():
        for config in _small_configs(fam.config_cls):
            for site in fam.site_names(config):
                axes = jsh.site_axes(site)
                assert axes[0] == "batch", (name, site, axes)


def test_unknown_parameter_is_refused():
    with pytest.raises(KeyError, match="no row for parameter 'h_0/attn/mystery'"):
        jsh.param_axes("gpt2", {"h_0": {"attn": {"mystery": jax.ShapeDtypeStruct((4, 4), "float32")}}})
    with pytest.raises(ValueError, match="has 3 axes"):
        jsh.param_axes("gpt2", {"wte": jax.ShapeDtypeStruct((4, 4, 4), "float32")})


def test_fitting_to_a_mesh_drops_axes_that_do_not_divide():
    mapping = jsh.load_rules("fsdp_tp").activations
    mesh = {"data": 1, "fsdp": 2, "tensor": 8}
    # 4 heads cannot be split 8 ways: replicated; batch 8 over fsdp 2 (data is size 1)
    assert jsh.resolve_spec(("batch", "seq", "heads", "head_dim"), mapping, (8, 5, 4, 16), mesh) == P("fsdp")
    assert jsh.resolve_spec(("batch", "seq", "mlp"), mapping, (8, 5, 64), mesh) == P("fsdp", None, "tensor")
    # one mesh axis is never used twice in a spec
    assert jsh.resolve_spec(("batch", "batch"), {"batch": ("fsdp",)}) == P("fsdp")


def test_rules_refuse_unknown_axes():
    with pytest.raises(ValueError, match="unknown logical axis 'hidden'"):
        jsh.Rules.from_dict({"params": {"hidden": "tensor"}})
    with pytest.raises(ValueError, match="unknown mesh axes \\['model'\\]"):
        jsh.Rules.from_dict({"params": {"embed": "model"}})
    with pytest.raises(FileNotFoundError, match="available"):
        jsh.load_rules("nope")
