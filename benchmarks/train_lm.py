"""Training throughput: the jaxinterp JAX loop vs an equivalent HF torch loop, plus MFU.

    python benchmarks/train_lm.py --d-model 128 --layers 4 --batch 24 --seq 96 --rounds 5

Both sides train the same GPT-2 config (same init, copied through safetensors) on the same
batches with AdamW + global-norm clipping (torch: ``clip_grad_norm_`` + ``torch.optim.AdamW``;
JAX: the train_lm optax step). Rounds alternate between the two so machine load affects both
alike; the median round is reported. Compile (JAX) / first-step (torch) time is reported
separately. MFU = model FLOP/s (6 N per token + attention) / the measured peak of a large
jitted float32 matmul. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
    """FLOP/s of a jitted [n, n] x [n, n] float32 matmul (best of ``reps``)."""
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    best = min(_timed(lambda: f(a, a).block_until_ready()) for _ in range(reps))
    return 2 * n ** 3 / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def model_flops_per_token(n_params_nonembed: int, n_layers: int, d_model: int, seq: int, vocab: int) -> float:
    """Training FLOPs per token: 6 x (non-embedding params + unembedding) + attention (6 L T D)."""
    return 6 * (n_params_nonembed + vocab * d_model) + 6 * n_layers * seq * d_model


def setup(args):
    import torch
    import transformers

    from jaxinterp.experiments.train_lm.config import Config, DataConfig, ModelSpec, OptimConfig, TrainConfig
    from jaxinterp.experiments.train_lm.main import data_mesh, make_optimizer, make_train_step
    import jaxinterp as ji

    torch.set_num_threads(args.torch_threads)
    hf_cfg = transformers.GPT2Config(vocab_size=args.vocab, n_positions=args.seq, n_embd=args.d_model,
                                     n_layer=args.layers, n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, attn_implementation="sdpa")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(hf_cfg).train()
    tmp = tempfile.mkdtemp()
    hf.save_pretrained(tmp)
    model = ji.load(tmp)
    cfg = Config(model=ModelSpec(), data=DataConfig(seq_len=args.seq, batch_size=args.batch),
                 optim=OptimConfig(lr=1e-3, warmup_steps=10), train=TrainConfig(steps=1000))
    jax_step = make_train_step(make_optimizer(cfg), data_mesh())  # the training loop's step
    torch_opt = torch.optim.AdamW(hf.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=0.1)
    return hf, torch_opt, model, cfg, jax_step


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=342)
    p.add_argument("--batch", type=int, default=24)
    p.add_argument("--seq", type=int, default=96)
    p.add_argument("--steps", type=int, default=5, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--torch-threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)
    import torch

    hf, torch_opt, model, cfg, jax_step = setup(args)
    rng = np.random.default_rng(0)
    batch = rng.integers(0, args.vocab, size=(args.batch, args.seq + 1)).astype(np.int32)
    tb = torch.as_tensor(batch, dtype=torch.long)

    def torch_step():
        out = hf(tb[:, :-1], labels=tb[:, :-1].clone())  # HF shifts labels internally
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        torch_opt.step()
        torch_opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    from jaxinterp.experiments.train_lm.main import make_optimizer
    from jaxinterp.train import init_state

    state = init_state(model.params, make_optimizer(cfg), jax.random.key(0))
    jax_batch, skeleton = {"tokens": jnp.asarray(batch), "weights": None}, model.replace(params={})
    t0 = time.perf_counter()
    state, metrics = jax_step(state, jax_batch, skeleton)
    metrics["loss"].block_until_ready()
    compile_s = time.perf_counter() - t0
    torch_first_s = _timed(torch_step)
    torch_step()  # warm-up (allocator, optimizer state)

    jax_times, torch_times = [], []
    for _ in range(args.rounds):
        t = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = jax_step(state, jax_batch, skeleton)
        metrics["loss"].block_until_ready()
        jax_times.append((time.perf_counter() - t) / args.steps)
        torch_times.append(_timed(lambda: [torch_step() for _ in range(args.steps)]) / args.steps)
    tokens_per_step = args.batch * args.seq
    jax_tps = tokens_per_step / float(np.median(jax_times))
    torch_tps = tokens_per_step / float(np.median(torch_times))
    nonembed = sum(p.numel() for n, p in hf.named_parameters() if "wte" not in n and "wpe" not in n)
    flops_tok = model_flops_per_token(nonembed, args.layers, args.d_model, args.seq, args.vocab)
    peak = matmul_peak()
    result = {
        "config": vars(args), "devices": [str(d) for d in jax.devices()],
        "jax_tokens_per_s": jax_tps, "torch_tokens_per_s": torch_tps, "speedup_jax_over_torch": jax_tps / torch_tps,
        "jax_compile_s": compile_s, "torch_first_step_s": torch_first_s,
        "model_flops_per_token": flops_tok, "matmul_peak_gflops": peak / 1e9,
        "jax_mfu": jax_tps * flops_tok / peak, "torch_mfu": torch_tps * flops_tok / peak,
        "jax_step_s_rounds": jax_times, "torch_step_s_rounds": torch_times,
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
