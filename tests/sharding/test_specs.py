"""Golden PartitionSpecs: every family's (layer-stacked) parameters under every rule set."""

from __future__ import annotations

import jax
import pytest
from jax.sharding import PartitionSpec as P

import jaxinterp as ji
from jaxinterp import sharding as jsh

RULES = ["dp", "fsdp", "tp", "fsdp_tp"]

_EMB = {"dp": P(), "fsdp": P(None, "fsdp"), "tp": P("tensor"), "fsdp_tp": P("tensor", "fsdp")}  # [vocab, embed]
_IN = {"dp": P(), "fsdp": P("fsdp"), "tp": P(None, "tensor"), "fsdp_tp": P("fsdp", "tensor")}  # [embed, heads|mlp]
_OUT = {"dp": P(), "fsdp": P(None, "fsdp"), "tp": P("tensor"), "fsdp_tp": P("tensor", "fsdp")}  # [heads|mlp, embed]
_NORM = {"dp": P(), "fsdp": P("fsdp"), "tp": P(), "fsdp_tp": P("fsdp")}
_BIAS = {"dp": P(), "fsdp": P(), "tp": P("tensor"), "fsdp_tp": P("tensor")}  # [heads|mlp]


def _stacked(golden):
    """The spec of a layer-stacked parameter: the ``layers`` axis in front is never sharded by these rules."""
    return {rule: P(None, *spec) if len(spec) else P() for rule, spec in golden.items()}


# Every transformer family shares the block's parameter layout (stacked on ``layers``).
TRANSFORMER_GOLDEN = {
    "embed": _EMB,
    "pos_embed": {"dp": P(), "fsdp": P(None, "fsdp"), "tp": P(), "fsdp_tp": P(None, "fsdp")},
    "layers/ln1/scale": _stacked(_NORM),
    "layers/attn/q/kernel": _stacked(_IN),
    "layers/attn/q/bias": _stacked(_BIAS),
    "layers/attn/k/kernel": _stacked(_IN),
    "layers/attn/o/kernel": _stacked(_OUT),
    "layers/attn/o/bias": _stacked(_NORM),
    "layers/mlp/up/kernel": _stacked(_IN),
    "layers/mlp/up/bias": _stacked(_BIAS),
    "layers/mlp/down/kernel": _stacked(_OUT),
    "final_norm/bias": _NORM,
    "lm_head/kernel": _IN,
}

OTHER_GOLDEN = {
    ("llama", "llama_tiny"): {
        "embed": _EMB, "layers/attn/q/kernel": _stacked(_IN), "layers/attn/k/kernel": _stacked(_IN),
        "layers/attn/o/kernel": _stacked(_OUT), "layers/mlp/gate/kernel": _stacked(_IN),
        "layers/mlp/down/kernel": _stacked(_OUT), "final_norm/scale": _NORM,
    },
    ("gpt_neox", "tiny"): {
        "embed": _EMB, "layers/attn/v/kernel": _stacked(_IN), "layers/attn/o/kernel": _stacked(_OUT),
        "layers/mlp/up/kernel": _stacked(_IN), "layers/mlp/down/kernel": _stacked(_OUT),
        "lm_head/kernel": _IN, "final_norm/bias": _NORM,
    },
    ("mamba", "tiny"): {
        "embed": _EMB,
        "layers/mixer/in_proj/kernel": _stacked(_IN),  # [embed, d_inner]
        "layers/mixer/out_proj/kernel": _stacked({"dp": P(), "fsdp": P("fsdp"), "tp": P("tensor"),
                                                   "fsdp_tp": P("tensor", "fsdp")}),
        "layers/mixer/A_log": _stacked({"dp": P(), "fsdp": P("fsdp"), "tp": P("tensor"), "fsdp_tp": P("tensor")}),
        "layers/mixer/conv1d/kernel": _stacked({"dp": P(), "fsdp": P(None, "fsdp"), "tp": P(None, "tensor"),
                                                 "fsdp_tp": P(None, "tensor")}),
        "layers/mixer/x_proj/kernel": _stacked({"dp": P(), "fsdp": P("fsdp"), "tp": P("tensor"),
                                                 "fsdp_tp": P("tensor")}),
        "final_norm/scale": _NORM,
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
    return ji.model.abstract_params(config)


@pytest.mark.parametrize("rules", RULES)
def test_gpt2_golden_specs(rules):
    from jaxinterp.models.gpt2 import GPT2Config

    specs = _flat_specs("gpt2", _shapes(GPT2Config.tiny(tie_embeddings=False)), rules)
    for path, golden in TRANSFORMER_GOLDEN.items():
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
    with pytest.raises(KeyError, match="no row for parameter 'layers/attn/mystery'"):
        jsh.param_axes("gpt2", {"layers": {"attn": {"mystery": jax.ShapeDtypeStruct((2, 4, 4), "float32")}}})
    with pytest.raises(ValueError, match="has 3 axes"):
        jsh.param_axes("gpt2", {"embed": jax.ShapeDtypeStruct((4, 4, 4), "float32")})


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
