"""Forward + captures + interventions on 8 simulated devices equal the single-device run."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import jaxinterp as ji
from jaxinterp import sharding as jsh
from jaxinterp.models.gpt2 import GPT2Config

B, T = 8, 12
# (first, tensor) meshes; "first" is fsdp under fsdp_tp and data under tp.
MESHES = [(8, 1), (1, 8)]  # pure fsdp, pure tensor; mixed meshes: the "tp" case and every port at 2x4 below
CAPTURE = ["embed", "blocks.*.resid_post", "blocks.0.attn.pattern", "blocks.1.attn.z", "blocks.1.mlp.post",
           "final_norm"]


@pytest.fixture(scope="module")
def model():
    return ji.init(GPT2Config.tiny(n_layers=2, d_model=64, n_heads=4, d_mlp=128, vocab_size=256), 1)


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, 256, (B, T)).astype(np.int32)


def _interventions(model, tokens):
    other = model.run(tokens[::-1], capture="blocks.0.resid_mid").cache["blocks.0.resid_mid"]
    return {
        "blocks.0.resid_mid": ji.Patch(values=other, mask=ji.positions_mask(T, [3, 7], batch=B)),
        "blocks.1.attn.z": ji.ZeroAblate(ji.heads_mask(T, 4, [1, 2])),
        "blocks.1.resid_post": ji.Add(np.linspace(-1, 1, 64, dtype=np.float32)),
    }


def _mesh(rules, first, tensor):
    return jsh.make_mesh({"data": 1, "fsdp": first, "tensor": tensor} if rules != "tp"
                         else {"data": first, "fsdp": 1, "tensor": tensor})


CASES = [("fsdp_tp", s) for s in MESHES] + [("tp", (4, 2))]


@pytest.mark.parametrize("rules,shape", CASES, ids=[f"{r}-{a}x{b}" for r, (a, b) in CASES])
def test_forward_capture_interventions_match_single_device(model, tokens, rules, shape):
    ivs = _interventions(model, tokens)
    ref = model.run(tokens, capture=CAPTURE, interventions=ivs)
    mesh = _mesh(rules, *shape)
    sharded = jsh.shard_model(model, mesh, rules)
    out = jsh.sharded_run(sharded, tokens, mesh, rules, capture=CAPTURE, interventions=ivs)
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(ref.logits), atol=1e-5, rtol=0)
    assert set(out.cache) == set(ref.cache)
    rule = jsh.load_rules(rules)
    for site, value in out.cache.items():
        np.testing.assert_allclose(np.asarray(value), np.asarray(ref.cache[site]), atol=1e-5, rtol=0, err_msg=site)
        # captures come back laid out by the site's logical axes
        expected = jsh.activation_spec(jsh.site_axes(site), value.shape, mesh, rule)
        assert value.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, expected), value.ndim), site


def test_parameters_are_actually_split(model):
    mesh = _mesh("fsdp_tp", 4, 2)
    sharded = jsh.shard_model(model, mesh, "fsdp_tp")
    kernel = sharded.params["layers"]["mlp"]["up"]["kernel"]  # [layers 2, embed 64, mlp 128]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    assert {s.data.shape for s in kernel.addressable_shards} == {(2, 16, 64)}
    per_device = jsh.per_device_bytes(sharded.params)
    total = sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(model.params))
    assert len(per_device) == 8 and max(per_device.values()) < total / 4


def test_intervention_arrays_follow_the_site_layout(model, tokens):
    mesh = _mesh("fsdp_tp", 4, 2)
    ivs = jsh.place_interventions(_interventions(model, tokens), model.sites, mesh, "fsdp_tp")
    patch = ivs["blocks.0.resid_mid"]
    assert patch.values.sharding.spec == jax.sharding.PartitionSpec("fsdp")       # [B, T, D]: batch split
    assert patch.mask.sharding.spec == jax.sharding.PartitionSpec("fsdp")         # [B, T] mask prefix
    assert ivs["blocks.1.attn.z"].mask.sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor")  # [1,T,H]
    assert ivs["blocks.1.resid_post"].vector.sharding.spec == jax.sharding.PartitionSpec()  # [D] suffix, embed


def test_data_parallel_patching_needs_no_gather(model, tokens):
    """With replicated weights and the batch split, a patched forward is communication-free:
    the patch values arrive split like the activation and nothing is all-gathered."""
    mesh = jsh.make_mesh({"data": 8})
    ivs = jsh.place_interventions(_interventions(model, tokens), model.sites, mesh, "dp")
    forward = jsh.make_forward(mesh, "dp", capture="blocks.1.resid_post")
    sharded = jsh.shard_model(model, mesh, "dp")
    hlo = forward.lower(sharded, jsh.place_tokens(tokens, mesh, "dp"), ivs).compile().as_text()
    assert "all-gather" not in hlo and "all-reduce" not in hlo and "all-to-all" not in hlo
    assert "collective-permute" not in hlo


def _port_configs():
    """One tiny preset per family (the last declared: the variant with the most flags, e.g. Gemma-3, Llama 3)."""
    out = []
    for name, fam in sorted(ji.families().items()):
        presets = [n for n in vars(fam.config_cls) if n == "tiny" or n.endswith("_tiny")]
        out.append((name, presets[-1]))
    return out


@pytest.mark.parametrize("shape", [(2, 4)], ids=["2x4"])
@pytest.mark.parametrize("port", _port_configs(), ids=[f"{f}-{p}" for f, p in _port_configs()])
def test_every_port_forward_and_captures_match_single_device(port, shape):
    family, preset = port
    config = getattr(ji.get_family(family).config_cls, preset)()
    model = ji.init(config, 5)
    tokens = np.random.default_rng(6).integers(0, config.vocab_size, (8, 8)).astype(np.int32)
    capture = ["embed", "blocks.*.resid_post", "final_norm"] + [s for s in model.sites if s.startswith("blocks.0.")
                                                               and not s.endswith("ssm_state")]
    ref = model.run(tokens, capture=capture)
    mesh = _mesh("fsdp_tp", *shape)
    out = jsh.sharded_run(jsh.shard_model(model, mesh, "fsdp_tp"), tokens, mesh, "fsdp_tp", capture=capture)
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(ref.logits), atol=1e-5, rtol=0)
    for site in ref.cache:
        np.testing.assert_allclose(np.asarray(out.cache[site]), np.asarray(ref.cache[site]), atol=1e-5, rtol=0,
                                   err_msg=site)


def test_layer_axis_can_be_sharded(model, tokens):
    """Stacked parameters shard along the ``layers`` axis (each device holds some layers); the scanned
    forward then gathers one layer per step and still equals the single-device run."""
    rules = jsh.Rules.from_dict({"params": {"layers": "fsdp", "heads": "tensor", "mlp": "tensor"},
                                 "activations": {"batch": "fsdp"}}, name="layers_fsdp")
    mesh = jsh.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    sharded = jsh.shard_model(model, mesh, rules)
    kernel = sharded.params["layers"]["mlp"]["up"]["kernel"]  # [layers 2, embed, mlp]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", None, "tensor")
    assert {s.data.shape[0] for s in kernel.addressable_shards} == {1}  # one layer per fsdp shard
    out = jsh.sharded_run(sharded, tokens, mesh, rules, capture="blocks.*.resid_post")
    ref = model.run(tokens, capture="blocks.*.resid_post")
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(ref.logits), atol=1e-5, rtol=0)
