"""Sharded loading: each device reads only its slices; a model over the per-device budget runs."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import jaxinterp as ji
from jaxinterp import sharding as jsh
from jaxinterp.models.gpt2 import GPT2Config
from jaxinterp.sharding import place


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # ~1.6 MB of float32 parameters, dominated by the embeddings and MLPs
    cfg = GPT2Config.tiny(vocab_size=2048, d_model=64, n_layers=2, n_heads=4, d_mlp=256, tie_embeddings=False)
    path = tmp_path_factory.mktemp("gpt2_big")
    ji.save_pretrained(ji.init(cfg, 3), path, max_shard_bytes=400_000)  # several safetensors shards
    return path


def _nbytes(tree):
    return sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(tree))


def test_model_over_the_device_budget_loads_and_runs_sharded(checkpoint, monkeypatch):
    reference = ji.load(checkpoint)
    total = _nbytes(reference.params)
    budget = total // 4  # a "device" too small for the model
    reads = []
    real_read = place._read_slice
    monkeypatch.setattr(place, "_read_slice", lambda a, idx, dt: reads.append((a.shape, idx)) or real_read(a, idx, dt))

    mesh = jsh.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    model = ji.load(checkpoint, mesh=mesh, rules="fsdp_tp")
    per_device = jsh.per_device_bytes(model.params)
    assert len(per_device) == 8
    assert max(per_device.values()) <= budget, (max(per_device.values()), budget, total)
    # the arithmetic dry-run estimate is exact for the largest device
    shapes = jax.eval_shape(lambda: reference.params)
    est = jsh.estimate_per_device_bytes("gpt2", shapes, "fsdp_tp", dict(mesh.shape))
    assert est["total_bytes"] == total and est["per_device_bytes"] == max(per_device.values())

    # no host read of a sharded tensor covers the whole tensor: devices got slices only
    big = {shape for shape, _ in reads if int(np.prod(shape)) >= 64 * 256}
    assert big
    for shape, idx in reads:
        if shape in big:
            sliced = [s.stop - s.start if s.stop is not None else n for s, n in zip(idx, shape)]
            assert int(np.prod(sliced)) < int(np.prod(shape)), (shape, idx)

    tokens = np.random.default_rng(1).integers(0, 2048, (8, 10))
    out = jsh.sharded_run(model, tokens, mesh, "fsdp_tp", capture="blocks.1.mlp.post")
    ref = reference.run(tokens, capture="blocks.1.mlp.post")
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(ref.logits), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(out.cache["blocks.1.mlp.post"]), np.asarray(ref.cache["blocks.1.mlp.post"]),
                               atol=1e-5, rtol=0)
    # replicated (dp) placement would not fit
    dp = jsh.estimate_per_device_bytes("gpt2", shapes, "dp", dict(mesh.shape))
    assert dp["per_device_bytes"] == total > budget


def test_sharded_load_in_bfloat16_matches_plain_load(checkpoint):
    mesh = jsh.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = ji.load(checkpoint, "bfloat16", mesh=mesh, rules="fsdp_tp")
    plain = ji.load(checkpoint, dtype="bfloat16")
    for a, b in zip(jax.tree_util.tree_leaves(model.params), jax.tree_util.tree_leaves(plain.params)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    with pytest.raises(ValueError, match="dtype must be one of"):
        ji.load(checkpoint, "int8", mesh=mesh, rules="fsdp_tp")


def test_ji_load_with_a_mesh_places_sharded(checkpoint):
    mesh = jsh.make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
    model = ji.load(checkpoint, mesh=mesh, rules="tp")
    kernel = model.params["layers"]["mlp"]["up"]["kernel"]  # [layers, embed, mlp]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor")
    assert len(jsh.per_device_bytes(model.params)) == 8
    with pytest.raises(ValueError, match="rules given without a mesh"):
        ji.load(checkpoint, rules="tp")
