"""ELM train-step time: jaxinterp (jit) vs an equivalent PyTorch + PEFT step, same model config.

One step = three frozen forwards for the target (x, c+ x, c- x), one frozen forward on
retain text, LoRA forwards on erase / retain / fluency text, backward, AdamW update.
Prints JSON: median step seconds of each (compile time reported separately) and the ratio.

    python benchmarks/elm_step.py [--d-model 256 --layers 4 --batch 8 --seq 48 --steps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxinterp as ji
from jaxinterp import lora, train
from jaxinterp.unlearning import elm
from jaxinterp.models.gpt2 import GPT2Config


def make_batch(args, rng):
    v = args.vocab
    erase = [[0] + list(rng.integers(3, v, args.seq - 1)) for _ in range(args.batch)]
    retain = [[0] + list(rng.integers(3, v, args.seq - 1)) for _ in range(args.batch)]
    fluency = [e + list(rng.integers(3, v, 16)) for e in erase]
    expert, novice = [0] + list(range(3, 9)), [0] + list(range(9, 15))
    return elm.make_elm_batch(erase, expert, novice, retain, fluency, [len(e) for e in erase], erase_len=args.seq,
                              retain_len=args.seq, fluency_len=args.seq + 16, pad_id=1)


def bench_jax(args, batch, cfg, lcfg):
    base = ji.init(GPT2Config.tiny(vocab_size=args.vocab, max_seq_len=256, d_model=args.d_model,
                                   n_layers=args.layers, n_heads=args.heads, d_mlp=4 * args.d_model), 0)
    lm = lora.init(base, lcfg, key=0)
    opt = optax.adamw(cfg.lr)
    step = train.make_train_step(train.loss_step(lambda a, b, bt, k: elm.elm_loss(a, b, bt, k, cfg), opt))
    state = train.init_state(lm.lora, opt, jax.random.PRNGKey(0))
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    t0 = time.perf_counter()
    state, m = step(state, batch, base)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, m = step(state, batch, base)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), compile_s


def bench_torch(args, batch, cfg, lcfg):
    import peft
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(vocab_size=args.vocab, n_positions=256, n_embd=args.d_model, n_layer=args.layers,
                                     n_head=args.heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(hf_cfg).float()
    model.requires_grad_(False)
    pcfg = peft.LoraConfig(r=lcfg.rank, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout, fan_in_fan_out=True,
                           target_modules=["c_attn", "c_proj", "c_fc"], bias="none", task_type="CAUSAL_LM")
    model = peft.get_peft_model(model, pcfg).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.01)
    b = {k: torch.as_tensor(np.asarray(v)) for k, v in batch.items()}
    b = {k: (v.long() if v.dtype in (torch.int32, torch.int64) else v) for k, v in b.items()}
    ramp_valid = b["erase_valid"].float()

    def step():
        with torch.no_grad(), model.disable_adapter():
            lp = lambda z: torch.log_softmax(z / cfg.temperature, -1)
            base_l = model(b["erase"]).logits
            exp_l = model(b["expert"]).logits.gather(1, b["expert_index"][..., None].expand(-1, -1, args.vocab))
            nov_l = model(b["novice"]).logits.gather(1, b["novice_index"][..., None].expand(-1, -1, args.vocab))
            idx = ramp_valid.cumsum(1) - 1
            n = (ramp_valid.sum(1, keepdim=True) - 1).clamp(min=1)
            eta = (1 + (cfg.eta - 1) * idx / n)[..., None]
            edit = lp(base_l) - eta * (lp(exp_l) - lp(nov_l))
            kth = edit.topk(cfg.top_k, -1).values[..., -1:]
            target = torch.softmax(edit.masked_fill(edit < kth, -torch.inf), -1)
            retain_labels = model(b["retain"]).logits.argmax(-1)
        mask = lambda m: m.float() / m.float().sum().clamp(min=1)
        logp = torch.log_softmax(model(b["erase"]).logits, -1)
        erase = -((target * logp).sum(-1) * mask(b["erase_valid"])).sum()
        logp_r = torch.log_softmax(model(b["retain"]).logits, -1)
        retain = -(logp_r.gather(-1, retain_labels[..., None])[..., 0] * mask(b["retain_valid"])).sum()
        logp_f = torch.log_softmax(model(b["fluency"]).logits[:, :-1], -1)
        nll = -logp_f.gather(-1, b["fluency"][:, 1:, None])[..., 0]
        fluency = (nll * mask(b["fluency_mask"][:, :-1])).sum()
        loss = erase + retain + fluency
        opt.zero_grad()
        loss.backward()
        opt.step()
        return float(loss)

    t0 = time.perf_counter()
    step()
    warm = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), warm


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=48)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    jax.config.update("jax_default_matmul_precision", "highest")
    cfg = elm.ElmConfig.tiny(eta=4.0, top_k=50)
    lcfg = lora.LoraConfig(rank=args.rank, alpha=16.0, dropout=0.05)
    batch = make_batch(args, np.random.default_rng(0))
    jax_s, jax_compile = bench_jax(args, batch, cfg, lcfg)
    torch_s, torch_first = bench_torch(args, batch, cfg, lcfg)
    print(json.dumps({"benchmark": "elm_step", "device": "cpu", "config": vars(args),
                      "jax_step_s": jax_s, "jax_compile_s": jax_compile, "torch_step_s": torch_s,
                      "torch_first_step_s": torch_first, "speedup_jax_over_torch": torch_s / jax_s}, indent=2))


if __name__ == "__main__":
    main()
