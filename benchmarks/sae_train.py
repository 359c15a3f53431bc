"""SAE training throughput: jaxinterp (jit) vs a plain PyTorch step, and a vmapped grid vs sequential runs.

    python benchmarks/sae_train.py                       # d_in 768, 8x dictionary, batch 4096, float32
    python benchmarks/sae_train.py --d-in 256 --batch 1024 --reps 3   # quick

Both sides run the same step per family: encode, decode, MSE (+ L1 for ``relu``), Adam,
decoder-gradient projection and decoder renormalisation; ``topk`` keeps each row's ``k``
largest ReLU latents and (unless ``--no-auxk``) adds the AuxK term over dead latents on
both sides (none are dead in a short benchmark, so AuxK is 0 on both; the JAX step then
skips it, PyTorch computes the masked top-k like the plain reference it is).

``topk`` is timed twice on the JAX side: ``topk/jax_single`` on the dense path (the same
five GEMMs as PyTorch) and ``topk/jax_sparse`` on the sparse path (``sparse=True``: decode
from the ``k`` kept latents only, sparse backward; only the encoder's forward GEMM stays
dense, as in Gao et al. 2024). The PyTorch step stays the plain dense one, so
``topk/sparse_speedup_vs_torch`` is the algorithmic gain plus the framework's, and
``topk/speedup_vs_torch`` the framework's alone.

Every variant is compiled / warmed up first (compile time reported separately), then
``--reps`` rounds run the variants interleaved (one step each per round, the grid and its
8 sequential single-SAE steps included) so that load changes on a shared machine hit all
of them alike; medians are reported. FLOPs come from XLA's cost analysis of the compiled
JAX step, and a plain-matmul calibration (the step's five GEMMs alone, JAX and PyTorch)
gives the ceiling each side can reach on this machine. Prints one JSON object.

``--harvest``: the grid trained while harvesting (``jaxinterp.sae.harvest_grid``'s fused step) on
facts-gpt: one forward per token batch (up to ``--site``) feeding a widths x sparsities grid of SAEs
(``--widths`` x ``--sparsities``, ReLU + L1, vmapped per width) vs one run per grid member that each
harvests its own activations (one forward + one single-SAE step each), steps interleaved per round,
compile time apart, FLOPs of each compiled step from XLA's cost analysis; the speedup can approach the
FLOP ratio (G x forward + grid SAE steps) / (forward + grid SAE steps) at most.

    python benchmarks/sae_train.py --harvest                # facts-gpt blocks.2.resid_post, 4x/8x x 4 L1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- JAX side


def jax_variants(family: str, d_in: int, d_sae: int, batch: int, grid: int, k: int, auxk: bool,
                 with_grid: bool = True, sparse: bool | None = False) -> dict:
    """``{"single": fn, "sequential": fn, "grid": fn}`` plus compile times and FLOPs."""
    import jax

    from jaxinterp.sae import SAETrainConfig, SAETrainer

    x = jax.random.normal(jax.random.PRNGKey(0), (batch, d_in))
    extra = {"k": k, "aux_coeff": (1 / 32 if auxk else 0.0)} if family == "topk" else {"sparsity_coeff": 1e-3}
    cfg = SAETrainConfig(family=family, d_in=d_in, d_sae=d_sae, steps=10_000, batch_size=batch,
                         init_b_dec_mean=False, sparse=sparse, **extra)
    sample = np.asarray(x[:1024])
    members = [{"seed": i, **({"sparsity_coeff": 1e-3 * (i + 1)} if family == "relu" else {})} for i in range(grid)]

    def make(trainer, states):
        holder = {"s": states}

        def one():
            holder["s"], m = trainer.step(holder["s"], x)
            jax.block_until_ready((holder["s"], m))

        return one

    single_tr = SAETrainer({"r": (cfg, [members[0]])})
    single = make(single_tr, single_tr.init(sample))

    def flops(trainer):
        st = trainer.init(sample)
        ca = trainer._step.lower(st, x).cost_analysis()  # of the lowered program (no second compile)
        ca = ca[0] if isinstance(ca, list) else ca
        return float(ca.get("flops", float("nan")))

    out = {"fns": {"jax_single": single}, "compile_s": {"single": _timed(single)},
           "flops": {"single": flops(single_tr)}}
    if with_grid:
        grid_tr = SAETrainer({"r": (cfg, members)})
        seq_fns = [make(single_tr, single_tr.init(sample) if i == 0 else SAETrainer({"r": (cfg, [m])}).init(sample))
                   for i, m in enumerate(members)]
        grid_fn = make(grid_tr, grid_tr.init(sample))
        out["fns"].update(jax_sequential=lambda: [f() for f in seq_fns], jax_grid=grid_fn)
        out["compile_s"]["grid"] = _timed(grid_fn)
        out["flops"]["grid"] = flops(grid_tr)
        for f in seq_fns:  # warm (compiled already: same trainer as `single`)
            f()
    return out


def jax_matmul_fn(d_in: int, d_sae: int, batch: int):
    """The five GEMMs of an SAE step (encode, decode, d/df, both weight grads) and nothing else."""
    import jax

    ks = jax.random.split(jax.random.PRNGKey(1), 4)
    x, g = jax.random.normal(ks[0], (batch, d_in)), jax.random.normal(ks[1], (batch, d_sae))
    we, wd = jax.random.normal(ks[2], (d_in, d_sae)), jax.random.normal(ks[3], (d_sae, d_in))

    @jax.jit
    def five(x, g, we, wd):
        pre = x @ we
        xh = pre @ wd
        return xh @ wd.T, x.T @ g, pre.T @ xh

    fn = lambda: jax.block_until_ready(five(x, g, we, wd))
    fn()
    return fn


# ----------------------------------------------------------------------------- PyTorch side


def torch_step_fn(family: str, d_in: int, d_sae: int, batch: int, k: int, auxk: bool):
    """A plain PyTorch SAE step doing the same work as the JAX step of ``family``."""
    import torch

    torch.manual_seed(0)
    x = torch.randn(batch, d_in)
    w_dec = torch.randn(d_sae, d_in)
    w_dec /= w_dec.norm(dim=-1, keepdim=True)
    params = {"W_enc": w_dec.T.clone().requires_grad_(), "b_enc": torch.zeros(d_sae, requires_grad=True),
              "W_dec": w_dec.clone().requires_grad_(), "b_dec": torch.zeros(d_in, requires_grad=True)}
    opt = torch.optim.Adam(params.values(), lr=3e-4)
    scale = float(np.sqrt(d_in / (x * x).sum(-1).mean().item()))
    fired_ago = torch.zeros(d_sae, dtype=torch.int64)
    dead_tokens, aux_k = 1_000_000, 256

    def one():
        nonlocal fired_ago
        p = params
        xn = x * scale
        # == (xn - b_dec) @ W_enc + b_enc; written so that autograd's b_dec gradient through the
        # encoder is a matrix-vector product, as in the JAX step (5 GEMMs per step on both sides).
        pre = xn @ p["W_enc"] - p["b_dec"] @ p["W_enc"] + p["b_enc"]
        if family == "topk":
            r = torch.relu(pre)
            vals, idx = r.topk(k, dim=-1)
            f = torch.zeros_like(r).scatter(-1, idx, vals)
        else:
            f = torch.relu(pre)
        x_hat = f @ p["W_dec"] + p["b_dec"]
        err = xn - x_hat
        loss = err.pow(2).sum(-1).mean()
        if family == "relu":
            loss = loss + 1e-3 * f.sum(-1).mean()
        elif auxk:
            dead = fired_ago >= dead_tokens
            if bool(dead.any()):  # the JAX step skips AuxK the same way when nothing is dead
                acts = torch.where(dead, torch.relu(pre), 0.0)
                v, i = acts.topk(min(aux_k, d_sae), dim=-1)
                z = torch.zeros_like(acts).scatter(-1, i, v)
                e = err.detach()
                loss = loss + (1 / 32) * (e - z @ p["W_dec"]).pow(2).sum(-1).mean() / e.pow(2).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            w, g = p["W_dec"], p["W_dec"].grad
            g -= (g * w).sum(-1, keepdim=True) * w
        opt.step()
        with torch.no_grad():
            p["W_dec"] /= p["W_dec"].norm(dim=-1, keepdim=True)
            fired_ago = torch.where((f != 0).any(0), 0, fired_ago + batch)
            _ = ((f != 0).sum(-1).float().mean().item(), loss.item())  # the metrics the JAX step returns

    one()
    return one


def torch_matmul_fn(d_in: int, d_sae: int, batch: int):
    import torch

    torch.manual_seed(1)
    x, g = torch.randn(batch, d_in), torch.randn(batch, d_sae)
    we, wd = torch.randn(d_in, d_sae), torch.randn(d_sae, d_in)

    def fn():
        pre = x @ we
        xh = pre @ wd
        return xh @ wd.T, x.T @ g, pre.T @ xh

    fn()
    return fn


# ----------------------------------------------------------------------------- driver


# ----------------------------------------------------------------------------- grid while harvesting


def harvest_variants(site: str, widths, sparsities, batch: int, seq: int, buffer_factor: int) -> dict:
    """Grid-while-harvesting vs one harvesting run per member: step fns, compile times, XLA FLOPs."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    import jaxinterp as ji
    from jaxinterp.sae import OnlineStore, SAETrainer, fused_step, grid_runs

    model = ji.load("facts-gpt")
    vocab = model.config.vocab_size
    toks = lambda t: jax.random.randint(jax.random.PRNGKey(1000 + t), (batch, seq), 0, vocab)
    d_in = int(model.run(toks(0)[:1, :2], capture=site).cache[site].shape[-1])
    runs = grid_runs("relu", d_in, widths, sparsities, steps=10_000, lr=1e-4, init_b_dec_mean=False)
    members = [(name, {name: (dataclasses.replace(cfg, **m), [{}])}) for name, (cfg, ms) in runs.items() for m in ms]
    store = OnlineStore([site], buffer_factor=buffer_factor)

    def make(trainer_runs):
        trainers = {site: SAETrainer(trainer_runs)}
        buffer = store.fill(model, [toks(-i - 1) for i in range(buffer_factor)])
        holder = {"states": {site: trainers[site].init(np.asarray(buffer[site]))}, "buffer": buffer, "t": 0}
        step = fused_step(trainers, store)

        def one():
            t = holder["t"]
            holder["states"], holder["buffer"], m = step(holder["states"], holder["buffer"], model, toks(t),
                                                         jax.random.PRNGKey(t))
            holder["t"] = t + 1
            jax.block_until_ready((holder["states"], m))

        ca = step.lower(holder["states"], holder["buffer"], model, toks(0), jax.random.PRNGKey(0)).cost_analysis()
        ca = ca[0] if isinstance(ca, list) else ca
        return one, float(ca.get("flops", float("nan")))

    grid_fn, grid_flops = make(runs)
    runs_seq = [make(r) for _, r in members]
    fwd = jax.jit(lambda m, t: store.acts(m, t)[0])
    fwd_ca = fwd.lower(model, toks(0)).cost_analysis()
    fwd_ca = fwd_ca[0] if isinstance(fwd_ca, list) else fwd_ca
    compile_s = {"grid": _timed(grid_fn), "sequential": sum(_timed(f) for f, _ in runs_seq)}
    return {"fns": {"harvest/grid": grid_fn, "harvest/sequential": lambda: [f() for f, _ in runs_seq]},
            "compile_s": compile_s, "d_in": d_in, "members": [n for n, _ in members],
            "flops": {"grid_step": grid_flops, "sequential_steps": sum(f for _, f in runs_seq),
                      "forward_to_site": float(fwd_ca.get("flops", float("nan")))}}


def harvest_main(args) -> dict:
    import jax

    widths = [int(w) for w in args.widths.split(",")]
    sparsities = [float(s) for s in args.sparsities.split(",")]
    v = harvest_variants(args.site, widths, sparsities, args.harvest_batch, args.seq, args.buffer_factor)
    times = {name: [] for name in v["fns"]}
    for _ in range(args.reps):
        for name, fn in v["fns"].items():
            times[name].append(_timed(fn))
    med = {name: float(np.median(ts)) for name, ts in times.items()}
    fl = v["flops"]
    sae_flops = fl["grid_step"] - fl["forward_to_site"]
    g = len(v["members"])
    out = {
        "config": {"model": "facts-gpt", "site": args.site, "d_in": v["d_in"], "widths": widths,
                   "sparsities (L1 coeff)": sparsities, "grid": g, "tokens_per_step": args.harvest_batch * args.seq,
                   "batch": args.harvest_batch, "seq": args.seq, "buffer_factor": args.buffer_factor,
                   "reps": args.reps, "dtype": "float32"},
        "device": str(jax.devices()[0]), "cpu_count": os.cpu_count(), "load_avg": os.getloadavg(),
        "median_s": med, "all_s": times, "compile_s": v["compile_s"], "xla_flops": fl,
        "ratios": {"grid_speedup_vs_sequential": med["harvest/sequential"] / med["harvest/grid"],
                   # the most a shared forward can save: sequential FLOPs over grid FLOPs
                   "flop_ratio_bound": (g * fl["forward_to_site"] + sae_flops) / fl["grid_step"],
                   "forward_share_of_grid_step_flops": fl["forward_to_site"] / fl["grid_step"]},
        "targets": {"grid_speedup_vs_sequential": 3.0},
    }
    print(json.dumps(out, indent=1))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d-in", type=int, default=768)
    ap.add_argument("--expansion", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=5, help="interleaved rounds (median over them)")
    ap.add_argument("--grid", type=int, default=8)
    ap.add_argument("--k", type=int, default=32, help="TopK's active latents")
    ap.add_argument("--families", default="relu,topk")
    ap.add_argument("--no-auxk", action="store_true", help="TopK without the AuxK term on both sides")
    ap.add_argument("--no-grid", action="store_true", help="skip the grid / sequential variants")
    ap.add_argument("--no-sparse", action="store_true", help="skip the sparse TopK JAX step")
    ap.add_argument("--harvest", action="store_true", help="grid while harvesting vs harvesting runs (facts-gpt)")
    ap.add_argument("--site", default="blocks.2.resid_post", help="--harvest: the site the SAEs read")
    ap.add_argument("--widths", default="512,1024", help="--harvest: SAE widths (4x, 8x facts-gpt's d_model)")
    ap.add_argument("--sparsities", default="1e-4,3e-4,1e-3,3e-3", help="--harvest: L1 coefficients")
    ap.add_argument("--harvest-batch", type=int, default=32, help="--harvest: sequences per forward")
    ap.add_argument("--seq", type=int, default=64, help="--harvest: tokens per sequence")
    ap.add_argument("--buffer-factor", type=int, default=2, help="--harvest: forwards held in the shuffle buffer")
    args = ap.parse_args(argv)
    if args.harvest:
        return harvest_main(args)
    d_sae = args.d_in * args.expansion
    import jax
    import torch

    fams = [f for f in args.families.split(",") if f]
    fns, compile_s, flops = {}, {}, {}
    for fam in fams:
        v = jax_variants(fam, args.d_in, d_sae, args.batch, args.grid, args.k, not args.no_auxk,
                         with_grid=fam == fams[0] and not args.no_grid)
        fns[f"{fam}/jax_single"] = v["fns"]["jax_single"]
        if fam == fams[0] and not args.no_grid:
            fns[f"{fam}/jax_grid"] = v["fns"]["jax_grid"]
            fns[f"{fam}/jax_sequential"] = v["fns"]["jax_sequential"]
        fns[f"{fam}/torch"] = torch_step_fn(fam, args.d_in, d_sae, args.batch, args.k, not args.no_auxk)
        compile_s[fam], flops[fam] = v["compile_s"], v["flops"]
        if fam == "topk" and not args.no_sparse:
            sv = jax_variants(fam, args.d_in, d_sae, args.batch, args.grid, args.k, not args.no_auxk,
                              with_grid=False, sparse=True)
            fns["topk/jax_sparse"] = sv["fns"]["jax_single"]
            compile_s[fam]["sparse"] = sv["compile_s"]["single"]  # (XLA's cost analysis counts a loop body once)
    fns["matmul5/jax"] = jax_matmul_fn(args.d_in, d_sae, args.batch)
    fns["matmul5/torch"] = torch_matmul_fn(args.d_in, d_sae, args.batch)

    times = {name: [] for name in fns}
    for _ in range(args.reps):
        for name, fn in fns.items():
            times[name].append(_timed(fn))
    med = {name: float(np.median(ts)) for name, ts in times.items()}

    gemm_flops = 5 * 2 * args.batch * args.d_in * d_sae
    out = {
        "config": {"d_in": args.d_in, "d_sae": d_sae, "batch": args.batch, "dtype": "float32", "reps": args.reps,
                   "grid": args.grid, "k": args.k, "auxk": not args.no_auxk},
        "device": str(jax.devices()[0]), "machine": platform.machine(), "cpu_count": os.cpu_count(),
        "load_avg": os.getloadavg(), "torch": {"version": torch.__version__, "threads": torch.get_num_threads()},
        "median_s": med, "all_s": times, "compile_s": compile_s,
        "xla_flops_per_step": flops, "gemm_flops_per_sae_step": gemm_flops,
        # sparse TopK: the encoder GEMM plus 4 sparse products of B k D multiply-adds each
        "sparse_topk_flops_per_step": 2 * args.batch * args.d_in * (d_sae + 4 * args.k),
        "achieved_gflops": {name: gemm_flops * (args.grid if name.endswith(("grid", "sequential")) else 1) / t / 1e9
                            for name, t in med.items() if "sparse" not in name},  # dense-GEMM steps only
    }
    ratios = {}
    for fam in fams:
        ratios[f"{fam}/speedup_vs_torch"] = med[f"{fam}/torch"] / med[f"{fam}/jax_single"]
        ratios[f"{fam}/jax_tokens_per_s"] = args.batch / med[f"{fam}/jax_single"]
        ratios[f"{fam}/torch_tokens_per_s"] = args.batch / med[f"{fam}/torch"]
    if "topk/jax_sparse" in med:
        ratios["topk/sparse_speedup_vs_torch"] = med["topk/torch"] / med["topk/jax_sparse"]
        ratios["topk/sparse_speedup_vs_dense_jax"] = med["topk/jax_single"] / med["topk/jax_sparse"]
        ratios["topk/jax_sparse_tokens_per_s"] = args.batch / med["topk/jax_sparse"]
    if not args.no_grid:
        g = fams[0]
        ratios["grid_speedup_vs_sequential"] = med[f"{g}/jax_sequential"] / med[f"{g}/jax_grid"]
        ratios["grid_speedup_vs_8x_single"] = args.grid * med[f"{g}/jax_single"] / med[f"{g}/jax_grid"]
        # Upper bound on any grid speedup: the grid does grid x the GEMM FLOPs, so it cannot beat
        # grid x single-step time scaled by (single-step GFLOP/s / plain-matmul GFLOP/s).
        ratios["grid_speedup_bound_from_matmul_peak"] = med[f"{g}/jax_single"] / med["matmul5/jax"]
    ratios["matmul5_jax_over_torch"] = med["matmul5/torch"] / med["matmul5/jax"]
    out["ratios"] = ratios
    out["targets"] = {"relu/speedup_vs_torch": 1.5, "topk/sparse_speedup_vs_torch": 1.5, "grid_speedup_vs_sequential": 3.0}
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
