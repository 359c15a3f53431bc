"""SAE training throughput: jaxinterp (jit) vs a plain PyTorch step, and a vmapped grid vs sequential runs.

    python benchmarks/sae_train.py                       # d_in 768, 8x dictionary, batch 4096, float32
    python benchmarks/sae_train.py --d-in 256 --batch 1024 --steps 5   # quick

Both sides run the same ReLU-L1 step: encode, decode, MSE + L1, Adam, decoder-gradient
projection and decoder renormalisation. Timings are medians over ``--steps`` steps after
a warm-up step (compile time reported separately). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np


def _median_time(fn, steps: int) -> float:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench_jax(d_in: int, d_sae: int, batch: int, steps: int, grid: int) -> dict:
    import jax

    from jaxinterp.sae import SAETrainConfig, SAETrainer

    x = jax.random.normal(jax.random.PRNGKey(0), (batch, d_in))
    cfg = SAETrainConfig(family="relu", d_in=d_in, d_sae=d_sae, steps=10_000, batch_size=batch,
                         sparsity_coeff=1e-3, init_b_dec_mean=False)
    sample = np.asarray(x[:1024])

    def timed(trainer):
        holder = {"s": trainer.init(sample)}

        def one():
            holder["s"], m = trainer.step(holder["s"], x)
            jax.block_until_ready(m)

        t0 = time.perf_counter()
        one()
        compile_s = time.perf_counter() - t0
        return _median_time(one, steps), compile_s

    single, single_compile = timed(SAETrainer({"r": (cfg, [{}])}))
    grid_t, grid_compile = timed(SAETrainer({"r": (cfg, [{"sparsity_coeff": 1e-3 * (i + 1), "seed": i}
                                                         for i in range(grid)])}))
    return {"single_step_s": single, "single_compile_s": single_compile, "grid_step_s": grid_t,
            "grid_compile_s": grid_compile}


def bench_torch(d_in: int, d_sae: int, batch: int, steps: int) -> dict:
    import torch

    torch.manual_seed(0)
    x = torch.randn(batch, d_in)
    w_dec = torch.randn(d_sae, d_in)
    w_dec /= w_dec.norm(dim=-1, keepdim=True)
    params = {"W_enc": w_dec.T.clone().requires_grad_(), "b_enc": torch.zeros(d_sae, requires_grad=True),
              "W_dec": w_dec.clone().requires_grad_(), "b_dec": torch.zeros(d_in, requires_grad=True)}
    opt = torch.optim.Adam(params.values(), lr=3e-4)

    def one():
        p = params
        f = torch.relu((x - p["b_dec"]) @ p["W_enc"] + p["b_enc"])
        x_hat = f @ p["W_dec"] + p["b_dec"]
        loss = (x - x_hat).pow(2).sum(-1).mean() + 1e-3 * f.sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            w, g = p["W_dec"], p["W_dec"].grad
            g -= (g * w).sum(-1, keepdim=True) * w
        opt.step()
        with torch.no_grad():
            p["W_dec"] /= p["W_dec"].norm(dim=-1, keepdim=True)

    one()
    return {"step_s": _median_time(one, steps), "threads": torch.get_num_threads(), "version": torch.__version__}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d-in", type=int, default=768)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--grid", type=int, default=8)
    args = ap.parse_args(argv)
    d_sae = args.d_in * args.expansion
    import jax

    j = bench_jax(args.d_in, d_sae, args.batch, args.steps, args.grid)
    t = bench_torch(args.d_in, d_sae, args.batch, args.steps)
    out = {
        "config": {"d_in": args.d_in, "d_sae": d_sae, "batch": args.batch, "dtype": "float32", "steps": args.steps,
                   "grid": args.grid},
        "device": str(jax.devices()[0]), "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "jax": j, "torch": t,
        "jax_tokens_per_s": args.batch / j["single_step_s"],
        "torch_tokens_per_s": args.batch / t["step_s"],
        "speedup_vs_torch": t["step_s"] / j["single_step_s"],
        "grid_speedup_vs_sequential": args.grid * j["single_step_s"] / j["grid_step_s"],
        "targets": {"speedup_vs_torch": 1.5, "grid_speedup_vs_sequential": 3.0},
    }
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
