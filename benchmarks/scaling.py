"""Per-device memory and step time of the sharded workloads across mesh shapes (JSON).

    python benchmarks/scaling.py                       # 8 simulated CPU devices, tiny GPT-2
    python benchmarks/scaling.py --d-model 256 --layers 4 --repeats 5 --out results/scaling.json

Workloads: ``forward`` (captures + interventions), ``sweep`` (a (layer, position) patching
sweep, sweep axis over data x fsdp), ``sae`` (one SAE train step, batch over data axes,
latents over tensor) and ``lora`` (one LoRA step, FSDP x TP base, replicated adapters).
For every workload and mesh ``(data, fsdp, tensor)`` it reports the parameter/state bytes
held per device (measured on the placed arrays), XLA's per-device memory analysis of the
compiled step, the compile time, and the median step time next to the single-device time
measured in the same run. On simulated CPU devices the times are shape-level evidence only
(all "devices" share the same cores); on a GPU/TPU host the same script gives real scaling.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxinterp.train import make_train_step

MESHES = [(8, 1, 1), (1, 8, 1), (1, 4, 2), (1, 2, 4), (1, 1, 8), (2, 2, 2)]


def _time(fn, args, repeats: int):
    """(compile seconds, median step seconds, compiled program)."""
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(*args))  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return compile_s, statistics.median(times), compiled


def _memory(compiled) -> dict:
    mem = compiled.memory_analysis()
    if mem is None:
        return {}
    return {k: int(getattr(mem, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")
            if hasattr(mem, k)}


def _max_device_bytes(tree) -> int:
    from jaxinterp import sharding as jsh

    return max(jsh.per_device_bytes(tree).values())


# ----------------------------------------------------------------------------- workloads


def forward_workload(model, mesh, rules, batch, seq):
    import jaxinterp as ji
    from jaxinterp import sharding as jsh

    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (batch, seq)).astype(np.int32)
    ivs = {"blocks.0.attn.z": ji.ZeroAblate(ji.heads_mask(seq, model.config.n_heads, [0])),
           "blocks.*.resid_post": ji.Scale(jnp.float32(0.9))}
    placed = jsh.shard_model(model, mesh, rules)
    fn = jsh.make_forward(mesh, rules, capture="blocks.*.resid_post")
    args = (placed, jsh.place_tokens(tokens, mesh, rules), jsh.place_interventions(ivs, model.sites, mesh, rules))
    return fn, args, placed.params


def sweep_workload(model, mesh, rules, batch, seq):
    import jaxinterp as ji
    from jaxinterp import sharding as jsh
    from jaxinterp.sharding.workloads import SWEEP_AXES

    tokens = np.random.default_rng(1).integers(0, model.config.vocab_size, (1, seq)).astype(np.int32)
    corrupt = tokens.copy()
    corrupt[:, 1] = (corrupt[:, 1] + 1) % model.config.vocab_size
    cache = model.run(tokens, capture="blocks.*.resid_pre").cache
    masks, _ = jsh.layer_position_masks(model, seq)
    n_dev = jsh.workloads.sweep_axes_size(mesh)
    masks, _n = jsh.workloads._pad_leading(masks, n_dev)
    constrain = jsh.activation_constraint(mesh, jsh.load_rules(rules).without(SWEEP_AXES))
    placed = jsh.shard_model(model, mesh, rules)

    def one(shared, item):
        m, toks, vals = shared
        out = ji.run(m, toks, interventions={s: ji.Patch(vals[s], item[s]) for s in item}, logits_at=seq - 1,
                     constrain=constrain)
        return out.logits[:, 0] - out.logits[:, 1]  # [B, V] at the last position

    sharding = NamedSharding(mesh, P(SWEEP_AXES))
    fn = jax.jit(jax.vmap(one, in_axes=(None, 0), spmd_axis_name=SWEEP_AXES))
    items = jax.device_put({k: np.asarray(v) for k, v in masks.items()}, sharding)
    return fn, ((placed, jnp.asarray(corrupt), {s: cache[s] for s in masks}), items), placed.params


def sae_workload(model, mesh, rules, batch, seq):
    from jaxinterp import sae
    from jaxinterp import sharding as jsh

    d = model.config.d_model
    x = np.random.default_rng(2).normal(size=(batch * seq, d)).astype(np.float32)
    cfg = sae.SAETrainConfig(family="relu", d_in=d, d_sae=8 * d, steps=10, batch_size=len(x), lr_warmup_steps=0,
                             sparsity_coeff=1e-3)
    state = sae.unstack(sae.init_state(cfg, [{}], x), 0)
    shardings = jsh.param_shardings("sae", state, mesh, rules, strict=False)
    batch_sh = NamedSharding(mesh, jsh.activation_spec(("batch", "embed"), x.shape, mesh, jsh.load_rules(rules)))
    fn = make_train_step(functools.partial(sae.sae_step, cfg=cfg), shardings, batch_sh, donate=False)
    placed = jax.device_put(state, shardings)
    return fn, (placed, jax.device_put(x, batch_sh)), placed


def lora_workload(model, mesh, rules, batch, seq):
    from jaxinterp import lora
    from jaxinterp import sharding as jsh

    tokens = np.random.default_rng(3).integers(0, model.config.vocab_size, (batch, seq + 1)).astype(np.int32)
    adapters, base = lora.split(lora.init(model, lora.LoraConfig(rank=8)))
    opt = optax.adam(1e-3)

    def step(state, toks):
        ad, b, os_ = state

        def loss_fn(a):
            logits = lora.run(lora.combine(a, b), toks[:, :-1], mode="unmerged").logits
            return optax.softmax_cross_entropy_with_integer_labels(logits, toks[:, 1:]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(ad)
        upd, os_ = opt.update(grads, os_, ad)
        return (optax.apply_updates(ad, upd), b, os_), loss

    opt_state = opt.init(adapters)
    state_sh = (jsh.param_shardings("lora", adapters, mesh, rules),
                base.replace(params=jsh.param_shardings(model.family, base.params, mesh, rules)),
                jsh.param_shardings("lora", opt_state, mesh, rules, strict=False))
    tok_sh = NamedSharding(mesh, jsh.activation_spec(("batch", "seq"), tokens.shape, mesh, jsh.load_rules(rules)))
    fn = make_train_step(step, state_sh, tok_sh, donate=False)
    placed = jax.device_put((adapters, base, opt_state), state_sh)
    return fn, (placed, jax.device_put(tokens, tok_sh)), placed


WORKLOADS = {"forward": forward_workload, "sweep": sweep_workload, "sae": sae_workload, "lora": lora_workload}


# ----------------------------------------------------------------------------- main


def measure(name, model, mesh, rules, args) -> dict:
    fn, inputs, state = WORKLOADS[name](model, mesh, rules, args.batch, args.seq)
    compile_s, step_s, compiled = _time(fn, inputs, args.repeats)
    return {"state_bytes_per_device": _max_device_bytes(state), "xla_memory": _memory(compiled),
            "compile_s": round(compile_s, 3), "step_s": round(step_s, 6)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=8, help="simulated CPU devices (ignored on GPU/TPU)")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rules", default="fsdp_tp")
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    if os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
        jax.config.update("jax_num_cpu_devices", args.devices)  # before the backend starts
    jax.config.update("jax_default_matmul_precision", "highest")

    import jaxinterp as ji
    from jaxinterp import sharding as jsh
    from jaxinterp.models.gpt2 import GPT2Config

    config = GPT2Config.tiny(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=8,
                             d_mlp=4 * args.d_model, max_seq_len=max(128, args.seq + 1))
    model = ji.init(config, 0)
    n = jax.device_count()
    report = {"platform": jax.devices()[0].platform, "devices": n, "model": str(config), "rules": args.rules,
              "batch": args.batch, "seq": args.seq, "workloads": {}}
    workloads = [w for w in args.workloads.split(",") if w]
    single = jsh.make_mesh({"data": 1}, jax.devices()[:1])
    for name in workloads:
        base = measure(name, model, single, args.rules, args)
        rows = [{"mesh": {"data": 1, "fsdp": 1, "tensor": 1}, "devices": 1, **base}]
        for shape in MESHES:
            if int(np.prod(shape)) != n:
                continue
            mesh = jsh.make_mesh(dict(zip(jsh.MESH_AXES, shape)))
            row = measure(name, model, mesh, args.rules, args)
            row["speedup_vs_1_device"] = round(base["step_s"] / row["step_s"], 3)
            row["state_fraction_vs_1_device"] = round(row["state_bytes_per_device"] / base["state_bytes_per_device"], 4)
            rows.append({"mesh": dict(mesh.shape), "devices": n, **row})
        report["workloads"][name] = rows
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    return report


if __name__ == "__main__":
    main()
