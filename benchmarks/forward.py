"""Forward-pass throughput: jaxinterp ``run`` (no capture / all resid_post / everything)
against Hugging Face torch on the same weights. Prints JSON.

    python benchmarks/forward.py                  # GPT-2 small shape, batch 8 x 128
    python benchmarks/forward.py --preset tiny    # seconds, for a smoke run

Timings are interleaved (one repetition of every variant per round) so that machine
noise hits all variants alike; medians are reported, and compile time separately.
XLA's own FLOP count of each compiled program shows what capture costs in compute.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

PRESETS = {
    "small": dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024),
    "tiny": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=512, n_positions=128),
}
CAPTURES = {"none": None, "resid_post": "blocks.*.resid_post", "all": "all",
            # every site but the [B, H, T, T] score / pattern tensors (attention stays fused) ...
            "all_but_attn_matrices": lambda sites: [s for s in sites if not s.endswith(("attn.scores", "attn.pattern"))],
            # ... and the pattern alone (attention unfused, one [B, H, T, T] tensor per layer written out)
            "attn_pattern": "blocks.*.attn.pattern"}


def _flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        return float(cost.get("flops", float("nan")))
    except Exception:  # cost analysis is backend-dependent
        return None


def _unembed_gemm(rows: int, d: int, vocab: int, rounds: int) -> dict:
    """The largest GEMM of the forward ([rows, d] x [d, vocab]) alone, XLA vs torch, interleaved medians:
    separates the BLAS each framework calls from anything the port does."""
    import torch

    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((rows, d), np.float32), rng.standard_normal((d, vocab), np.float32)
    ja, jb = jnp.asarray(a), jnp.asarray(b)
    mm = jax.jit(jnp.matmul).lower(ja, jb).compile()
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    jax.block_until_ready(mm(ja, jb)), ta @ tb
    times = {"xla": [], "torch": []}
    for _ in range(rounds):
        t0 = time.perf_counter()
        jax.block_until_ready(mm(ja, jb))
        times["xla"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ta @ tb
        times["torch"].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {**med, "xla_speedup_vs_torch": med["torch"] / med["xla"]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--no-torch", action="store_true", help="skip the Hugging Face torch reference")
    args = parser.parse_args(argv)

    import torch
    import transformers

    import jaxinterp as ji

    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(**PRESETS[args.preset])
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        model = ji.load(tmp)
    tokens = np.random.default_rng(0).integers(0, hf_cfg.vocab_size, size=(args.batch, args.seq))
    jtokens = jnp.asarray(tokens, jnp.int32)

    fns, compile_s, flops = {}, {}, {}
    for name, capture in CAPTURES.items():
        capture = capture(model.sites) if callable(capture) else capture
        fn = jax.jit(lambda m, t, capture=capture: m.run(t, capture=capture))
        t0 = time.perf_counter()
        compiled = fn.lower(model, jtokens).compile()
        compile_s[name] = time.perf_counter() - t0
        flops[name] = _flops(compiled)
        jax.block_until_ready(compiled(model, jtokens))  # warm-up
        fns[name] = compiled

    ttokens = torch.as_tensor(tokens)

    def torch_forward():
        with torch.no_grad():
            return hf(ttokens).logits

    if not args.no_torch:
        torch_forward()
    times: dict[str, list[float]] = {k: [] for k in [*fns, *([] if args.no_torch else ["hf_torch"])]}
    for _ in range(args.rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(model, jtokens))
            times[name].append(time.perf_counter() - t0)
        if not args.no_torch:
            t0 = time.perf_counter()
            torch_forward()
            times["hf_torch"].append(time.perf_counter() - t0)

    n_tok = args.batch * args.seq
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "benchmark": "forward",
        "preset": args.preset,
        "batch": args.batch,
        "seq": args.seq,
        "rounds": args.rounds,
        "devices": str(jax.devices()),
        "torch_threads": torch.get_num_threads(),
        "median_s": med,
        "tokens_per_s": {k: n_tok / v for k, v in med.items()},
        "compile_s": compile_s,
        "xla_flops": flops,
        "capture_resid_post_overhead": med["resid_post"] / med["none"] - 1.0,
        "capture_all_overhead": med["all"] / med["none"] - 1.0,
        "capture_all_but_attn_matrices_overhead": med["all_but_attn_matrices"] / med["none"] - 1.0,
        "capture_attn_pattern_overhead": med["attn_pattern"] / med["none"] - 1.0,
    }
    if not args.no_torch:
        result["unembed_gemm_s"] = _unembed_gemm(args.batch * args.seq, hf_cfg.n_embd, hf_cfg.vocab_size, args.rounds)
        result["jax_speedup_vs_torch"] = med["hf_torch"] / med["none"]
        result["jax_resid_post_speedup_vs_torch"] = med["hf_torch"] / med["resid_post"]
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
