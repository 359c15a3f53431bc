"""Patching sweeps and sharded experiments equal plain loops of single-device forwards."""

from __future__ import annotations

import numpy as np
import pytest

import jaxinterp as ji
from jaxinterp import sharding as jsh
from jaxinterp.models.gpt2 import GPT2Config

T = 6
MESHES = [(8, 1), (2, 4)]  # (fsdp, tensor); the sweep axis runs over fsdp (pure fsdp, and mixed with tensor)


@pytest.fixture(scope="module")
def model():
    return ji.init(GPT2Config.tiny(n_layers=2, d_model=32, n_heads=4, d_mlp=64, vocab_size=128), 2)


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(3)
    clean = rng.integers(0, 128, (2, T)).astype(np.int32)
    corrupt = clean.copy()
    corrupt[:, 1] = (corrupt[:, 1] + 7) % 128
    return clean, corrupt


def _loop_reference(model, clean, corrupt, answer, foil):
    """Plain loop: one single-device forward per (layer, position)."""
    cache = model.run(clean, capture="blocks.*.resid_pre").cache
    table = np.zeros((model.config.n_layers, T, clean.shape[0]))
    for layer in range(model.config.n_layers):
        site = f"blocks.{layer}.resid_pre"
        for t in range(T):
            ivs = {site: ji.Patch(values=cache[site], mask=ji.positions_mask(T, t))}
            logits = np.asarray(model.run(corrupt, interventions=ivs).logits)[:, -1]
            table[layer, t] = logits[:, answer] - logits[:, foil]
    return table


@pytest.fixture(scope="module")
def loop_table(model, pair):
    return _loop_reference(model, *pair, 5, 9)


@pytest.mark.parametrize("shape", MESHES, ids=[f"{a}x{b}" for a, b in MESHES])
def test_patching_sweep_over_devices_matches_loop(model, pair, loop_table, shape):
    clean, corrupt = pair
    ref = loop_table
    mesh = jsh.make_mesh({"data": 1, "fsdp": shape[0], "tensor": shape[1]})
    sharded = jsh.shard_model(model, mesh, "fsdp_tp")
    cache = model.run(clean, capture="blocks.*.resid_pre").cache
    masks, (n_l, n_t) = jsh.layer_position_masks(model, T)
    metric = lambda logits: logits[:, 5] - logits[:, 9]  # logits at the last position: [B, V]
    out = jsh.patching_sweep(sharded, corrupt, cache, masks, metric, mesh, "fsdp_tp", logits_at=T - 1,
                             chunk_size=1 if shape[0] <= 2 else None)
    assert out.shape == (n_l * n_t, 2)
    np.testing.assert_allclose(out.reshape(n_l, n_t, 2), ref, atol=1e-5, rtol=0)


def test_sharded_map_pads_and_chunks():
    mesh = jsh.make_mesh({"data": 2, "fsdp": 4})
    items = {"x": np.arange(21, dtype=np.float32)}  # 21 items over 8 devices: padded to 24
    out = jsh.sharded_map(lambda s, it: {"y": it["x"] * s}, np.float32(3.0), items, mesh, chunk_size=1)
    np.testing.assert_array_equal(out["y"], np.arange(21) * 3.0)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(2, 4)], ids=["2x4"])
def test_patching_tables_over_many_prompts_match_loop(model, shape):
    rng = np.random.default_rng(4)
    n = 11  # not a multiple of the device count
    clean = rng.integers(0, 128, (n, T)).astype(np.int32)
    corrupt = clean.copy()
    corrupt[:, 2] = rng.integers(0, 128, n)
    answer, foil = rng.integers(0, 128, n), rng.integers(0, 128, n)
    mesh = jsh.make_mesh({"data": shape[0], "fsdp": 1, "tensor": shape[1]})
    out = jsh.runner.patching_tables(jsh.shard_model(model, mesh, "tp"), clean, corrupt, answer, foil, mesh, "tp",
                                     batch_size=8, progress=False)
    assert out["table"].shape == (n, 2, T)
    for i in (0, 5, 10):
        ref = _loop_reference(model, clean[i:i + 1], corrupt[i:i + 1], answer[i], foil[i])[..., 0]
        np.testing.assert_allclose(out["table"][i], ref, atol=1e-5, rtol=0)
        clean_logits = np.asarray(model.run(clean[i:i + 1]).logits)[0, -1]
        np.testing.assert_allclose(out["clean"][i], clean_logits[answer[i]] - clean_logits[foil[i]], atol=1e-5)


@pytest.mark.slow
def test_causal_trace_tables_match_trace_batch(model):
    from jaxinterp.patching import causal_trace as ct

    rng = np.random.default_rng(5)
    tokens = rng.integers(0, 128, (5, T)).astype(np.int32)
    subjects = [(1, 3)] * 5
    config = ct.TraceConfig.quick()
    ref = ct.trace_batch(model, tokens, subjects, sigma=0.1, config=config)
    mesh = jsh.make_mesh({"data": 4, "fsdp": 1, "tensor": 2})
    out = jsh.runner.causal_trace_tables(jsh.shard_model(model, mesh, "tp"), tokens, subjects, mesh, sigma=0.1,
                                         config=config, axes=("data",), progress=False)
    for i, r in enumerate(ref):
        np.testing.assert_allclose(out["probs"][i], r.probs, atol=1e-5, rtol=0)
        np.testing.assert_allclose(out["p_corrupt"][i], r.p_corrupt, atol=1e-5)
