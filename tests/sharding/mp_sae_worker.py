"""One process of the multi-process SAE test (``test_distributed.py`` starts two).

Trains a ReLU SAE for ``--steps`` steps on a deterministic activation stream, the batch
split over processes (data axis) and latents over each process's two devices (tensor axis);
checkpoints with orbax at ``--save-at``, restores from the checkpoint as a restarted job
would, finishes, then runs a small patching experiment with its prompts split over both
processes; process 0 writes the final parameters and the gathered tables to ``--out``.
"""

from __future__ import annotations

import argparse
import sys

import functools

import jax

import numpy as np
from jax.sharding import PartitionSpec as P

from jaxinterp.sharding import distributed
from jaxinterp import sharding as jsh
from jaxinterp.checkpoint import Checkpointer
from jaxinterp.train import make_train_step

D, F, B = 32, 128, 64


def data(steps: int) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(steps, B, D)).astype(np.float32)


def sae_setup(steps: int):
    from jaxinterp import sae

    cfg = sae.SAETrainConfig(family="relu", d_in=D, d_sae=F, steps=steps, batch_size=B, lr=1e-3, lr_warmup_steps=0,
                             sparsity_coeff=1e-2)
    state = sae.unstack(sae.init_state(cfg, [{}], data(steps).reshape(-1, D)), 0)
    return cfg, state, functools.partial(sae.sae_step, cfg=cfg)


def patching_run(mesh) -> dict:
    """Activation patching of 6 prompt pairs on a tiny GPT-2, prompts split over ``data``."""
    import jaxinterp as ji
    from jaxinterp.models.gpt2 import GPT2Config

    model = ji.init(GPT2Config.tiny(n_layers=2, d_model=32, n_heads=4, d_mlp=64, vocab_size=64), 9)
    rng = np.random.default_rng(10)
    clean = rng.integers(0, 64, (6, 5)).astype(np.int32)
    corrupt = clean.copy()
    corrupt[:, 1] = rng.integers(0, 64, 6)
    answer, foil = rng.integers(0, 64, (2, 6))
    return jsh.runner.patching_tables(jsh.shard_model(model, mesh, "dp"), clean, corrupt, answer, foil, mesh, "dp",
                                      axes=("data",), progress=False)


def main(argv=None):
    parser = distributed.add_flags(argparse.ArgumentParser())
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--save-at", type=int, default=2)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", 2)  # before any JAX operation starts the backend
    jax.config.update("jax_default_matmul_precision", "highest")
    assert distributed.initialize(distributed.config_from(args))
    assert jax.process_count() == 2 and jax.device_count() == 4, (jax.process_count(), jax.device_count())

    mesh = jsh.make_mesh({"data": 2, "fsdp": 1, "tensor": 2})
    cfg, state0, step = sae_setup(args.steps)
    shardings = jsh.param_shardings("sae", state0, mesh, "tp", strict=False)
    train = make_train_step(step, shardings, jax.sharding.NamedSharding(mesh, P("data")))
    xs = data(args.steps)

    def run(state, start, stop):
        for t in range(start, stop):
            batch = distributed.global_batch(distributed.process_rows(xs[t]), mesh, P("data"))
            state, _ = train(state, batch)
        return state

    state = run(distributed.place_global(state0, shardings), 0, args.save_at)
    with Checkpointer(args.ckpt, keep=2) as ckpt:
        ckpt.save(args.save_at, {"state": state}, force=True)
        ckpt.wait()
    del state
    # a restarted job: restore onto the mesh from the checkpoint and finish
    template = {"state": distributed.place_global(state0, shardings)}
    with Checkpointer(args.ckpt, keep=2) as ckpt:
        assert ckpt.latest_step() == args.save_at
        state = ckpt.restore(template=template)["state"]
    assert state.sae.params["W_enc"].sharding.spec == P(None, "tensor")
    state = run(state, args.save_at, args.steps)
    params = distributed.gather(state.sae.params)
    # a sharded experiment across both processes: prompts split over data, tables gathered
    tables = patching_run(jsh.make_mesh({"data": 4, "fsdp": 1, "tensor": 1}))
    if jax.process_index() == 0:
        np.savez(args.out, **{k: np.asarray(v) for k, v in params.items()},
                 **{f"patch_{k}": v for k, v in tables.items()})
    print(f"process {jax.process_index()} done", flush=True)


if __name__ == "__main__":
    sys.exit(main())
