"""Logit lens vs tuned lens on a facts-world model (facts-gpt by default): KL-to-final per layer.

    jaxinterp lens                                   # results/lens/default/
    jaxinterp lens --preset smoke --out /tmp/lens    # seconds

Trains a ``ji.lens.TunedLens`` (one affine translator per layer, KL distillation to the model's
final distribution) on facts-world rows through the library's training loop (checkpoints in
``<out>/ckpt``: a killed run re-run with the same command resumes and ends bit-identical), saves
it to ``<out>/tuned_lens.safetensors``, and writes ``results.json`` (KL-to-final per layer for both
lenses on held-out rows) and ``kl_to_final.png``.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

import jaxinterp as ji
from jaxinterp.experiments.common import experiment_main, pyplot, save_figure
from jaxinterp.checkpoint import OutputLock as locked  # re-entrant: the harness holds it too
from jaxinterp.experiments.sae_dashboard.main import facts_rows

from .config import LensConfig

PRESETS = {"default": LensConfig.default, "smoke": LensConfig.smoke, "tiny": LensConfig.tiny}
# a resume may change these (evaluation only, or a longer run); any other change is refused
RESUMABLE_FIELDS = ("steps", "rows", "save_every")


def mean_kl(model, lens_logits, final, keep: np.ndarray) -> list[float]:
    """Mean ``KL(final || lens)`` per lens row over the positions where ``keep`` is True."""
    kl = np.asarray(ji.lens.kl_to_final(lens_logits, final))  # [n, B, T]
    return [float(k[keep].mean()) for k in kl]


def plot(layers: list[int], kl_logit: list[float], kl_tuned: list[float], title: str, png: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(layers, kl_logit, "o-", label="logit lens")
    ax.plot(layers, kl_tuned, "s-", label="tuned lens")
    ax.set_xlabel("layer (resid_post)")
    ax.set_ylabel("KL(final || lens), nats")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xticks(layers)
    ax.set_title(title, fontsize=9)
    ax.legend()
    save_figure(fig, png)


def run(cfg: LensConfig, out: Path) -> dict:
    with locked(out):
        model = ji.load(cfg.model)
        if model.config.n_layers < 2:
            raise ValueError(f"the lens run needs a model with at least 2 layers; {cfg.model!r} has "
                             f"{model.config.n_layers}")
        train, _ = facts_rows(cfg, model, cfg.train_rows, seed=cfg.seed + 1)
        held, bos = facts_rows(cfg, model, cfg.rows, seed=cfg.seed + 2)
        t0 = time.time()
        batches = [train[i:i + cfg.batch_rows] for i in range(0, len(train), cfg.batch_rows)]
        trained = list(range(model.config.n_layers - 1))  # the last layer's translator is the identity
        lens_cfg = ji.lens.TunedLensConfig(steps=cfg.steps, lr=cfg.lr, save_every=cfg.save_every, seed=cfg.seed)
        lens, history = ji.lens.train_tuned_lens(model, batches, lens_cfg, layers=trained, directory=out / "ckpt",
                                                 run_config=dataclasses.asdict(cfg), may_change=RESUMABLE_FIELDS,
                                                 quiet=False)
        train_seconds = time.time() - t0
        lens.save(out / "tuned_lens.safetensors")
        final = model.run(held).logits
        keep = held != bos
        kl_logit = mean_kl(model, ji.lens.logit_lens(model, held), final, keep)
        layers = list(range(model.config.n_layers))
        kl_tuned = mean_kl(model, lens(model, held), final, keep) + kl_logit[len(trained):]
        plot(layers, kl_logit, kl_tuned, f"{cfg.model}: {cfg.rows} held-out rows x {cfg.seq_len} tokens",
             out / "kl_to_final.png")
    print("KL(final || lens) per layer, nats (held-out rows, BOS excluded):")
    for layer, a, b in zip(layers, kl_logit, kl_tuned):
        print(f"  layer {layer}: logit lens {a:.4f}  tuned lens {b:.4f}")
    return {"layers": layers, "tuned_layers": trained, "kl_logit_lens": kl_logit, "kl_tuned_lens": kl_tuned,
            "train_steps": history[-1]["step"], "train_loss_first": history[0]["loss"],
            "train_loss_last": history[-1]["loss"], "train_kl_per_layer_last": history[-1]["kl_per_layer"],
            "train_seconds": train_seconds,
            "train_tokens": int(train.size), "eval_tokens": int(keep.sum()), "lens": str(out / "tuned_lens.safetensors")}


main = experiment_main("lens", PRESETS, run, doc=__doc__)

if __name__ == "__main__":
    sys.exit(main())
