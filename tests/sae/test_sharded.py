"""Data-parallel + latent-sharded SAE training on 8 simulated CPU devices equals the unsharded run
(dense families, and TopK on the sparse path: its gathers/scatters index the sharded latent axis)."""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import numpy as np, jax
    from jax.sharding import Mesh
    from jaxinterp.sae import SAETrainConfig, SAETrainer
    assert jax.device_count() == 8, jax.devices()
    D, F = 8, 32
    def batch(t):
        return np.random.default_rng(t).normal(size=(64, D)).astype(np.float32)
    runs = {"relu": (SAETrainConfig(family="relu", d_in=D, d_sae=F, steps=6, sparsity_coeff=0.05, lr=1e-3), [{}, {"seed": 1}]),
            "topk": (SAETrainConfig(family="topk", d_in=D, d_sae=F, steps=6, k=4, dead_tokens=64, aux_k=8), [{}]),
            "sparse": (SAETrainConfig(family="topk", d_in=D, d_sae=F, steps=6, k=4, dead_tokens=64, aux_k=8, sparse=True),
                       [{}, {"k": 2, "seed": 1}])}
    mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "tensor"))
    plain = SAETrainer(runs)
    sharded = SAETrainer(runs, mesh=mesh)
    a, _ = plain.fit(plain.init(batch(99)), batch, progress=False)
    b, _ = sharded.fit(sharded.init(batch(99)), batch, progress=False)
    w = b["relu"].sae.params["W_enc"]
    assert w.sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor"), w.sharding
    assert len(w.addressable_shards) == 8 and w.addressable_shards[0].data.shape == (2, D, F // 2)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    print("OK")
""")


@pytest.mark.slow
def test_sharded_training_matches_unsharded(tmp_path):
    script = tmp_path / "sharded.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
