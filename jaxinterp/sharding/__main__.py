"""Command line: validate a target and estimate memory, or run a sharded patching experiment.

    python -m jaxinterp.sharding dry-run --config tpu_configs/v5e-16.yaml --model gpt2:small
    python -m jaxinterp.sharding dry-run --config tpu_configs/v5e-16.yaml --model llama:tinyllama_1b \
        --simulate --compile --batch 16 --seq 512
    python -m jaxinterp.sharding patch-sweep --config tpu_configs/cpu-8.yaml --model gpt2:tiny \
        --prompts 64 --out results/sharded_patching

``--model`` is a local Hugging Face directory or embedded model (only config.json is read
for a dry-run), or ``family:preset`` (``gpt2:small``, ``gpt_neox:pythia_410m``,
``llama:mistral_7b``, ``mamba:mamba_130m``; ``family`` alone for the default config).
``--simulate`` builds the target's mesh from simulated CPU devices and checks every
parameter's shard shape; ``--compile`` also compiles the sharded forward (abstract
inputs, nothing allocated) and reports XLA's per-device memory analysis.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxinterp.sharding.mesh import load_target

GiB = 1024 ** 3
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


# ----------------------------------------------------------------------------- model specs


def model_config(spec: str):
    """(family name, config) from ``family:preset``, ``family``, a directory or an embedded name."""
    from jaxinterp.families import families, family_for_model_type
    from jaxinterp.loading import resolve_source

    fams = families()
    name, _, preset = spec.partition(":")
    if name in fams and not Path(spec).exists():
        cls = fams[name].config_cls
        if not preset:
            return name, cls()
        if preset not in _presets(cls):
            raise SystemExit(f"unknown preset {preset!r} for {name}; presets: {_presets(cls)}")
        factory = getattr(cls, preset)
        return name, factory()
    path = resolve_source(spec)
    hf_config = json.loads((path / "config.json").read_text())
    fam = family_for_model_type(hf_config.get("model_type"))
    return fam.name, fam.config_cls.from_hf(hf_config)


def _presets(cls) -> list[str]:
    return sorted(n for n, v in vars(cls).items() if isinstance(v, classmethod) and n != "from_hf")


def abstract_params(family: str, config) -> Any:
    from jaxinterp.model import abstract_params as shapes

    return shapes(config)


# ----------------------------------------------------------------------------- dry run


def _validate(target, args) -> list[str]:
    problems = []
    if args.expect_processes is not None and args.expect_processes != target.num_processes:
        problems.append(f"target expects {target.num_processes} processes, the job has {args.expect_processes}")
    if args.devices is not None and args.devices != target.num_devices:
        problems.append(f"target needs {target.num_devices} devices, {args.devices} given")
    return problems


def dry_run(args) -> int:
    from jaxinterp import sharding as jsh

    target = jsh.load_target(args.config)
    rules = target.load_rules()
    mesh_shape = target.mesh.resolve(target.num_devices)
    family, config = model_config(args.model)
    shapes = abstract_params(family, config)
    est = jsh.estimate_per_device_bytes(family, shapes, rules, mesh_shape, args.dtype)
    n_opt = {"none": 0, "sgd": 0, "momentum": 1, "adam": 2}[args.optimizer]
    train_bytes = est["per_device_bytes"] * (1 + n_opt + (1 if args.optimizer != "none" else 0))
    act = _activation_estimate(family, config, rules, mesh_shape, args)
    need = (train_bytes if args.optimizer != "none" else est["per_device_bytes"]) + act["per_device_bytes"]
    budget = target.memory_per_device_gib * GiB
    report = {
        "target": target.name, "platform": target.platform, "devices": target.num_devices,
        "processes": target.num_processes, "devices_per_process": target.devices_per_process,
        "mesh": mesh_shape, "rules": rules.name, "model": args.model, "family": family,
        "params": int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes))),
        "dtype": args.dtype, "param_bytes_total": est["total_bytes"],
        "param_bytes_per_device": est["per_device_bytes"],
        "optimizer": args.optimizer, "train_state_bytes_per_device": train_bytes if args.optimizer != "none" else None,
        "activation_bytes_per_device": act["per_device_bytes"], "activation_assumptions": act["assumptions"],
        "estimated_bytes_per_device": need, "memory_per_device_bytes": budget,
        "fits": need <= budget, "replicated_large_params": est["replicated_large"][:20],
    }
    if args.simulate or args.compile:
        report["simulated"] = _simulate(target, family, config, shapes, rules, args)
    problems = _validate(target, args)
    if not report["fits"]:
        problems.append(f"estimated {need / GiB:.2f} GiB per device exceeds the target's "
                        f"{target.memory_per_device_gib} GiB")
    report["problems"] = problems
    print(json.dumps(report, indent=2, default=str))
    return 1 if problems else 0


def _activation_estimate(family, config, rules, mesh_shape, args) -> dict:
    """Residual stream and one layer's attention pattern / MLP hidden of a forward at
    ``--batch x --seq`` (the live set of an unrolled forward without captures)."""
    from jaxinterp.sharding.place import shard_shape
    from jaxinterp.sharding.rules import resolve_spec

    b, t = args.batch, args.seq
    d = config.d_model
    itemsize = _ITEMSIZE[args.dtype]
    arrays = [(("batch", "seq", "embed"), (b, t, d)), (("batch", "seq", "vocab"), (b, t, config.vocab_size))]
    if hasattr(config, "n_heads"):
        arrays.append((("batch", "heads", "seq", "seq"), (b, config.n_heads, t, t)))
    if hasattr(config, "d_mlp"):
        arrays.append((("batch", "seq", "mlp"), (b, t, config.d_mlp)))
    if hasattr(config, "d_inner"):
        arrays.append((("batch", "seq", "d_inner"), (b, t, config.d_inner)))
    total = 0
    for axes, shape in arrays:
        spec = resolve_spec(axes, rules.activations, shape, mesh_shape)
        total += int(np.prod(shard_shape(shape, spec, mesh_shape))) * itemsize
    return {"per_device_bytes": 2 * total,  # live input + output of the largest ops
            "assumptions": f"forward at batch {b} x seq {t}, no captures"}


def _simulate(target, family, config, shapes, rules, args) -> dict:
    from jax.sharding import NamedSharding

    from jaxinterp import sharding as jsh
    from jaxinterp.model import Model

    devices = jax.devices()
    if len(devices) < target.num_devices:
        raise SystemExit(f"--simulate needs {target.num_devices} devices, {len(devices)} available "
                         f"(the CPU device count must be set before JAX starts; see main())")
    mesh = jsh.make_mesh(target.mesh, devices[:target.num_devices])
    shardings = jsh.param_shardings(family, shapes, mesh, rules)
    per_device = 0
    for leaf, sharding in zip(jax.tree_util.tree_leaves(shapes), jax.tree_util.tree_leaves(shardings)):
        per_device += int(np.prod(sharding.shard_shape(leaf.shape))) * _ITEMSIZE[args.dtype]
    out: dict[str, Any] = {"mesh": dict(mesh.shape), "param_bytes_per_device": per_device}
    if args.compile:
        dtype = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16, "float16": np.float16}[args.dtype]
        abstract = jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, dtype, sharding=sh),
                                          shapes, shardings)
        model = Model(abstract, config, family)
        tok_sh = NamedSharding(mesh, jsh.activation_spec(jsh.TOKENS_AXES, (args.batch, args.seq), mesh, rules))
        tokens = jax.ShapeDtypeStruct((args.batch, args.seq), np.int32, sharding=tok_sh)
        forward = jsh.make_forward(mesh, rules)
        t0 = time.perf_counter()
        compiled = forward.lower(model, tokens, {}).compile()
        mem = compiled.memory_analysis()
        out["compile_s"] = round(time.perf_counter() - t0, 2)
        if mem is not None:
            out["xla_memory_per_device"] = {k: int(getattr(mem, k)) for k in (
                "argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                "generated_code_size_in_bytes") if hasattr(mem, k)}
    return out


# ----------------------------------------------------------------------------- patching experiment


def patch_sweep(args) -> int:
    from jaxinterp.sharding import distributed
    from jaxinterp import sharding as jsh
    from jaxinterp.model import init

    distributed.initialize(distributed.config_from(args))
    target = jsh.load_target(args.config)
    if jax.device_count() != target.num_devices:
        raise SystemExit(f"target {target.name} needs {target.num_devices} devices; this job sees "
                         f"{jax.device_count()} ({jax.process_count()} processes)")
    rules = target.load_rules()
    mesh = jsh.make_mesh(target.mesh)
    family, config = model_config(args.model)
    if ":" in args.model or args.model == family:
        model = jsh.shard_model(init(config, args.seed), mesh, rules)  # random weights: a scaling run
    else:
        model = ji.load(args.model, args.dtype, mesh=mesh, rules=rules)
    rng = np.random.default_rng(args.seed)  # the same prompts on every process
    clean = rng.integers(0, config.vocab_size, (args.prompts, args.seq)).astype(np.int32)
    corrupt = clean.copy()
    corrupt[:, args.corrupt_position] = rng.integers(0, config.vocab_size, args.prompts)
    answer, foil = rng.integers(0, config.vocab_size, (2, args.prompts))
    t0 = time.perf_counter()
    out = jsh.runner.patching_tables(model, clean, corrupt, answer, foil, mesh, rules, batch_size=args.batch,
                                     progress=True)
    seconds = time.perf_counter() - t0
    if jax.process_index() == 0:
        _write_patching(Path(args.out), out, args, target, seconds)
    return 0


def _write_patching(out_dir: Path, out: dict, args, target, seconds: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    total = out["clean"] - out["corrupt"]  # [N]; prompts the corruption does not move are left out
    keep = np.abs(total) > 1e-4
    effect = (out["table"][keep] - out["corrupt"][keep, None, None]) / total[keep, None, None]  # [N', L, T]
    summary = {"target": target.name, "model": args.model, "prompts": args.prompts, "seq": args.seq,
               "devices": jax.device_count(), "processes": jax.process_count(), "seconds": round(seconds, 3),
               "prompts_scored": int(keep.sum()), "mean_normalised_effect": effect.mean(0).tolist(),
               "clean_logit_diff": out["clean"].tolist(), "corrupt_logit_diff": out["corrupt"].tolist()}
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2))
    np.savez_compressed(out_dir / "tables.npz", **out)
    fig, ax = plt.subplots(figsize=(1 + 0.5 * args.seq, 1 + 0.4 * effect.shape[1]))
    im = ax.imshow(effect.mean(0), aspect="auto", cmap="RdBu_r")
    ax.set_xlabel("position patched")
    ax.set_ylabel("layer (resid_pre)")
    ax.set_title(f"patching effect, {args.prompts} prompts on {jax.device_count()} devices")
    fig.colorbar(im)
    fig.savefig(out_dir / "patching.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {out_dir / 'results.json'} and {out_dir / 'patching.png'}")


# ----------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    from jaxinterp.sharding import distributed

    p = argparse.ArgumentParser(prog="python -m jaxinterp.sharding", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("dry-run", help="validate a target config and estimate per-device memory")
    d.add_argument("--config", required=True, help="tpu_configs/<target>.yaml or a target name")
    d.add_argument("--model", required=True, help="family:preset, a local HF directory or an embedded name")
    d.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    d.add_argument("--batch", type=int, default=8)
    d.add_argument("--seq", type=int, default=128)
    d.add_argument("--optimizer", default="none", choices=["none", "sgd", "momentum", "adam"],
                   help="add optimizer state for full fine-tuning (default: inference only)")
    d.add_argument("--devices", type=int, default=None, help="check the target against this device count")
    d.add_argument("--expect-processes", type=int, default=None)
    d.add_argument("--simulate", action="store_true", help="build the mesh on simulated CPU devices")
    d.add_argument("--compile", action="store_true", help="also compile the sharded forward (XLA memory)")
    s = sub.add_parser("patch-sweep", help="activation patching of many prompts, split over the mesh")
    s.add_argument("--config", required=True)
    s.add_argument("--model", required=True)
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    s.add_argument("--prompts", type=int, default=64)
    s.add_argument("--seq", type=int, default=8)
    s.add_argument("--corrupt-position", type=int, default=1)
    s.add_argument("--batch", type=int, default=None, help="prompts per program call (default: all)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="results/sharded_patching")
    distributed.add_flags(s)
    return p


def _simulate_cpu_devices(n: int) -> None:
    """Ask for ``n`` CPU devices; only possible before JAX starts its backend (a caller that
    already started it with enough devices, like the 8-device tests, is fine too)."""
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        return
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", n)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    simulate = getattr(args, "simulate", False) or getattr(args, "compile", False)
    if simulate or (args.command == "patch-sweep" and load_target(args.config).platform == "cpu"):
        _simulate_cpu_devices(load_target(args.config).num_devices)
    return {"dry-run": dry_run, "patch-sweep": patch_sweep}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
