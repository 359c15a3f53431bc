"""Compile time against depth: ``run`` on a random Llama config with few vs many layers. Prints JSON.

    python benchmarks/compile_depth.py                     # 4 vs 48 layers
    python benchmarks/compile_depth.py --layers 2 8        # quicker

Layers are stacked and scanned, so the compiled program holds one block whatever the depth:
compile time should stay flat (target: 48 layers <= 1.5x the time of 4). Each depth is compiled
in a fresh process-level cache state (``jax.clear_caches``), with and without capturing every
residual, and the HLO size is reported with it.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np


def compile_seconds(n_layers: int, capture, args) -> dict:
    import jaxinterp as ji
    from jaxinterp.models.llama import LlamaConfig

    cfg = LlamaConfig.llama_tiny(vocab_size=args.vocab, d_model=args.d_model, n_layers=n_layers, n_heads=8,
                                 n_kv_heads=4, d_mlp=2 * args.d_model, max_seq_len=args.seq)
    params = ji.model.abstract_params(cfg)  # shapes only: compile without allocating weights
    model = ji.Model(params, cfg, "llama")
    tokens = jax.ShapeDtypeStruct((args.batch, args.seq), jnp.int32)
    fn = jax.jit(lambda m, t: m.run(t, capture=capture, token_check="clip").logits)
    jax.clear_caches()
    t0 = time.perf_counter()
    lowered = fn.lower(model, tokens)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return {"layers": n_layers, "capture": capture, "lower_s": round(t1 - t0, 3), "compile_s": round(t2 - t1, 3),
            "total_s": round(t2 - t0, 3), "hlo_chars": len(compiled.as_text())}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs=2, default=(4, 48))
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--reps", type=int, default=2, help="compiles per setting (the minimum is kept)")
    args = parser.parse_args(argv)
    rows = []
    for capture in (None, "blocks.*.resid_post"):
        for n in args.layers:
            runs = [compile_seconds(n, capture, args) for _ in range(args.reps)]
            rows.append(min(runs, key=lambda r: r["total_s"]))
    few, many = args.layers
    ratio = {}
    for capture in (None, "blocks.*.resid_post"):
        a, b = (next(r for r in rows if r["layers"] == n and r["capture"] == capture) for n in (few, many))
        ratio[str(capture)] = round(b["total_s"] / a["total_s"], 3)
    report = {"benchmark": "compile_depth", "device": str(jax.devices()[0]), "jax": jax.__version__,
              "rows": rows, f"ratio_{many}_over_{few}": ratio, "target": "<= 1.5"}
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
