"""Causal-tracing sweep vs a loop of one forward per cell (the reference implementation's way).

Full sweep (hidden / MLP / attention kinds; every token x every layer) on a random
GPT-2-small-shaped model. The loop runs, per cell, one jitted forward of the prompt batched as
1 clean + N corrupted rows with all-position logits and the clean row patched into the
corrupted rows at the cell (as kmeng01/rome's ``trace_with_patch``). Both produce the same
tables; the JSON reports the max difference, run times after compilation (median of
``--repeats``), compile times separately, and the speedup, plus XLA's FLOP count of the whole
sweep and of the whole loop (``flop_ratio``: the speedup the arithmetic alone allows; on a CPU,
where one cell's forward already runs near the matmul peak, the measured speedup tracks it).

    /work/venv/bin/python benchmarks/causal_trace.py            # GPT-2 small shape, T = 12
    /work/venv/bin/python benchmarks/causal_trace.py --loop-sample 24   # loop timed on 24 cells per kind
    /work/venv/bin/python benchmarks/causal_trace.py --layers 4 --d-model 256 --heads 4 --vocab 4096 --seq 8
    /work/venv/bin/python benchmarks/causal_trace.py --torch-loop --loop-sample 24   # also kmeng01/rome's own way

``--torch-loop`` (needs the ``hf`` extra) also times the loop as the reference implementation
runs it: the same weights in Hugging Face ``GPT2LMHeadModel`` (torch, eager, no grad), one forward
per cell with forward hooks that add the noise to the embedding output and copy the clean row's
block / MLP / attention output into the corrupted rows at the cell's token and window.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxinterp as ji  # noqa: E402
from jaxinterp.models.gpt2 import GPT2Config  # noqa: E402
from jaxinterp.patching import TraceConfig, gaussian_corruption, trace  # noqa: E402
from jaxinterp.patching import causal_trace as ct  # noqa: E402
from jaxinterp.patching.causal_trace import layer_window  # noqa: E402

KINDS = ("resid_post", "mlp_out", "attn_out")


@functools.partial(jax.jit, static_argnames=("kind", "window"))
def loop_cell(model, tokens, delta, answer, t, l, *, kind, window):
    """Score of one cell from one full forward of [clean; corrupted] rows (reference way)."""
    n_layers, seq = model.config.n_layers, tokens.shape[1]
    on_t = jnp.arange(seq) == t  # [T]
    corrupted_row = jnp.arange(tokens.shape[0])[:, None] > 0  # [B, 1]
    ivs = {"embed": ji.Add(delta)}
    for j in range(n_layers):
        in_window = (j >= l - window // 2) & (j < l - (-window // 2))
        sel = (corrupted_row & on_t[None] & in_window)[:, :, None]  # [B, T, 1]
        ivs[f"blocks.{j}.{kind}"] = lambda x, sel=sel: jnp.where(sel, x[:1], x)
    logits = ji.run(model, tokens, interventions=ivs).logits  # [B, T, V], every position
    return jax.nn.softmax(logits[1:, -1], axis=-1)[:, answer].mean()


def loop_table(model, tokens, delta, answer, kind, window, cells):
    """The loop over ``cells`` ((t, l) pairs); other entries are NaN."""
    seq, n_layers = tokens.shape[1], model.config.n_layers
    table = np.full((seq, n_layers), np.nan, np.float32)
    for t, l in cells:
        table[t, l] = loop_cell(model, tokens, delta, answer, t, l, kind=kind, window=window)
    return table


def torch_loop_table(model, tokens, delta, answer, kind, window, cells):
    """ROME's ``trace_with_patch`` loop in PyTorch on the same weights: ``(table [T, L], seconds)``."""
    import tempfile

    import torch
    from transformers import GPT2LMHeadModel

    with tempfile.TemporaryDirectory() as d:
        ji.save_pretrained(model, d)
        hf = GPT2LMHeadModel.from_pretrained(d).eval()
    n_layers, seq = model.config.n_layers, tokens.shape[1]
    toks = torch.as_tensor(np.array(tokens))
    noise = torch.as_tensor(np.array(delta))
    module = {"resid_post": lambda j: hf.transformer.h[j], "mlp_out": lambda j: hf.transformer.h[j].mlp,
              "attn_out": lambda j: hf.transformer.h[j].attn}[kind]

    def restore(t):
        def hook(_mod, _inp, out):
            h = out[0] if isinstance(out, tuple) else out
            h[1:, t] = h[0, t]
            return out
        return hook

    table = np.full((seq, n_layers), np.nan, np.float32)
    with torch.no_grad():
        embed = hf.transformer.drop.register_forward_hook(lambda _m, _i, out: out + noise)
        hf(toks)  # warm-up (allocator, thread pool); not timed
        t0 = time.perf_counter()
        for t, l in cells:
            hooks = [module(j).register_forward_hook(restore(t)) for j in layer_window(l, window, n_layers)]
            logits = hf(toks).logits  # [B, T, V], every position, as the reference
            table[t, l] = torch.softmax(logits[1:, -1], -1)[:, int(answer)].mean().item()
            for h in hooks:
                h.remove()
        seconds = time.perf_counter() - t0
        embed.remove()
    return table, seconds


def compiled_flops(jitted, *args, **kw) -> float:
    """XLA's FLOP count of one call of ``jitted`` (cost analysis of the compiled program)."""
    cost = jitted.lower(*args, **kw).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        jax.block_until_ready(out)
        times.append(time.perf_counter() - t0)
    return out, float(np.median(times))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--d-model", type=int, default=768)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=50257)
    ap.add_argument("--seq", type=int, default=12)
    ap.add_argument("--subject", type=int, nargs=2, default=(1, 4))
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--buckets", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--loop-repeats", type=int, default=1)
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--loop-sample", type=int, default=0,
                    help="time the loop on this many random cells per kind and extrapolate to all T x L "
                         "(0 = every cell); the table check covers the timed cells")
    ap.add_argument("--torch-loop", action="store_true",
                    help="also time the reference implementation's loop in PyTorch (HF GPT2LMHeadModel + hooks)")
    args = ap.parse_args()

    cfg = GPT2Config.small(n_layers=args.layers, d_model=args.d_model, n_heads=args.heads,
                           d_mlp=4 * args.d_model, vocab_size=args.vocab)
    model = ji.init(cfg, 0)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, args.seq)
    tc = TraceConfig(n_samples=args.samples, position_buckets=args.buckets)
    sigma = 0.05
    corr = gaussian_corruption(model, tokens, args.subject, sigma, tc)
    batch = jnp.asarray(np.broadcast_to(tokens, (args.samples + 1, args.seq)), jnp.int32)
    delta = jnp.concatenate([jnp.zeros_like(corr.delta[:1]), corr.delta])  # clean row first

    report = {"device": jax.devices()[0].device_kind, "config": vars(args), "kinds": {}}
    total_fast = total_loop = total_torch = 0.0
    for kind in args.kinds.split(","):
        run_fast = lambda: trace(model, tokens, args.subject, kind=kind, sigma=sigma, config=tc)  # noqa: E731
        t0 = time.perf_counter()
        res = run_fast()
        compile_fast = time.perf_counter() - t0
        res, fast_s = timed(run_fast, args.repeats)
        window = res.window
        answer = jnp.asarray(res.answer)
        t0 = time.perf_counter()
        jax.block_until_ready(loop_cell(model, batch, delta, answer, 0, 0, kind=kind, window=window))
        compile_loop = time.perf_counter() - t0
        cells = [(t, l) for t in range(args.seq) for l in range(cfg.n_layers)]
        if args.loop_sample:
            pick = np.random.default_rng(1).permutation(len(cells))[: args.loop_sample]
            cells = [cells[i] for i in sorted(pick)]
        table, loop_s = timed(lambda: loop_table(model, batch, delta, answer, kind, window, cells), args.loop_repeats)
        loop_s *= args.seq * cfg.n_layers / len(cells)
        # FLOPs of the whole sweep vs the whole loop (every cell): the speedup the compute alone allows
        flops_fast = compiled_flops(ct._trace_jit, model, jnp.asarray(tokens, jnp.int32), corr, answer, kind=kind,
                                    freeze=None, window=window, chunk=tc.chunk, engine=ct._select_engine(model, tc),
                                    skip_before=args.subject[0], buckets=tc.position_buckets)
        flops_loop = args.seq * cfg.n_layers * compiled_flops(loop_cell, model, batch, delta, answer, 0, 0, kind=kind,
                                                              window=window)
        report["kinds"][kind] = {
            "fast_s": fast_s, "loop_s": loop_s, "speedup": loop_s / fast_s, "loop_cells_timed": len(cells),
            "flops_fast": flops_fast, "flops_loop": flops_loop, "flop_ratio": flops_loop / flops_fast,
            "compile_fast_s": compile_fast, "compile_loop_s": compile_loop,
            "max_abs_diff": float(np.nanmax(np.abs(table - res.probs))), "p_clean": res.p_clean,
            "p_corrupt": res.p_corrupt,
        }
        if args.torch_loop:
            ttable, torch_s = torch_loop_table(model, batch, delta, answer, kind, window, cells)
            torch_s *= args.seq * cfg.n_layers / len(cells)
            report["kinds"][kind].update({"torch_loop_s": torch_s, "speedup_vs_torch_loop": torch_s / fast_s,
                                          "torch_max_abs_diff": float(np.nanmax(np.abs(ttable - res.probs)))})
            total_torch += torch_s
        total_fast += fast_s
        total_loop += loop_s
        print(json.dumps({kind: report["kinds"][kind]}), flush=True)
    report["total"] = {"fast_s": total_fast, "loop_s": total_loop, "speedup": total_loop / total_fast}
    if args.torch_loop:
        report["total"].update({"torch_loop_s": total_torch, "speedup_vs_torch_loop": total_torch / total_fast})
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
