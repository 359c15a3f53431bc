"""Peak host memory while loading a bfloat16 checkpoint, relative to its file size. Prints JSON.

    python benchmarks/load_memory.py                 # a random ~1 GB bf16 Llama checkpoint
    python benchmarks/load_memory.py --size small    # ~100 MB, seconds

The checkpoint is written once (``ji.init`` + ``ji.save_pretrained(..., dtype="bfloat16")``) to a temp
directory; then a fresh process loads it with ``ji.load(path, "bfloat16")`` and reports its resident
set before the load (``VmRSS``) and the peak during it (``VmHWM``). Target: peak - before <= 1.3 x the
file size (tensors are read straight into bf16, shard by shard, and placed as they are read).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SIZES = {
    # ~509 M parameters: ~1.0 GB in bfloat16
    "1gb": dict(vocab_size=32000, d_model=2048, n_layers=8, n_heads=16, n_kv_heads=8, d_mlp=5632),
    "small": dict(vocab_size=8000, d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, d_mlp=1408),
}

_CHILD = r"""
import json, sys, time
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
import jax, jax.numpy as jnp
import jaxinterp as ji
jax.block_until_ready(jnp.zeros(1))  # backend up before the baseline
before = status("VmRSS")
t0 = time.perf_counter()
model = ji.load(sys.argv[1], "bfloat16")
jax.block_until_ready(jax.tree_util.tree_leaves(model.params))
seconds = time.perf_counter() - t0
print(json.dumps({"before": before, "peak": status("VmHWM"), "after": status("VmRSS"), "seconds": seconds,
                  "params": model.num_params()}))
"""


def write_checkpoint(path: Path, size: str) -> int:
    import jax
    import jaxinterp as ji
    from jaxinterp.models.llama import LlamaConfig

    cfg = LlamaConfig(max_seq_len=2048, **SIZES[size])
    model = ji.init(cfg, 0, dtype="bfloat16")
    ji.save_pretrained(model, path, dtype="bfloat16", max_shard_bytes=256 << 20)
    del model
    jax.clear_caches()
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="1gb")
    parser.add_argument("--dir", default=None, help="reuse/keep the checkpoint here instead of a temp dir")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.dir or tmp) / f"llama-{args.size}-bf16"
        t0 = time.perf_counter()
        if (path / "config.json").exists():
            file_bytes = sum(p.stat().st_size for p in path.glob("*.safetensors"))
        else:
            file_bytes = write_checkpoint(path, args.size)
        written = time.perf_counter() - t0
        out = subprocess.run([sys.executable, "-c", _CHILD, str(path)], check=True, capture_output=True, text=True)
        child = json.loads(out.stdout.strip().splitlines()[-1])
    report = {
        "benchmark": "load_memory", "size": args.size, "params": child["params"], "file_bytes": file_bytes,
        "rss_before_bytes": child["before"], "rss_peak_bytes": child["peak"], "rss_after_bytes": child["after"],
        "peak_over_file": round((child["peak"] - child["before"]) / file_bytes, 3),
        "kept_over_file": round((child["after"] - child["before"]) / file_bytes, 3),
        "load_seconds": round(child["seconds"], 2), "write_seconds": round(written, 2), "target": "<= 1.3",
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
