"""SAEs for every layer of a facts-world model, trained from one stream of harvested activations.

    jaxinterp train-saes                          # facts-gpt: attn_out, mlp_out, resid_post x 4 layers
    jaxinterp train-saes --preset facts-mamba     # facts-mamba: mixer_out, resid_post x 2 layers

Writes each SAE in SAELens layout to ``<out>/saes/<site>/`` (``ji.sae.load`` reads it back, site
included), their quality (L0, fraction of variance explained, CE loss recovered when spliced in)
to ``results.json`` and a table on stdout. Training is checkpointed in ``<out>/ckpt`` (a killed run
resumes; another config in the same ``--out`` is refused) and the directory is locked while it is
written. Other experiments (circuits, SHIFT, behaviour clusters) call ``ensure_saes`` and train
the SAEs here on first use.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxinterp as ji
from jaxinterp.checkpoint import check_run_config
from jaxinterp.experiments.common import experiment_main, write_json
from jaxinterp.experiments.data.facts_world import load_world_model
from jaxinterp.checkpoint import OutputLock as locked  # re-entrant: the harness holds it too
from jaxinterp.experiments.train_lm.data import FactsBatches
from jaxinterp.sae import Reads, grid_runs, harvest_grid, unstack
from jaxinterp.sae.metrics import downstream_metrics, reconstruction_metrics
from jaxinterp.sites import resolve_sites

from .config import TrainSAEsConfig

PRESETS = {"facts-gpt": TrainSAEsConfig.facts_gpt, "facts-mamba": TrainSAEsConfig.facts_mamba,
           "smoke": TrainSAEsConfig.smoke}
INDEX = "index.json"  # <out>/saes/index.json: written last, lists the finished SAEs


def default_sites(model, cfg: TrainSAEsConfig) -> tuple[str, ...]:
    """``cfg.sites``, or every ``blocks.{i}.<kind>`` site of the model for ``kind`` in ``cfg.site_kinds``."""
    if cfg.sites is not None:
        for s in cfg.sites:
            resolve_sites(s, model.sites)
        return tuple(s for s in model.sites if s in cfg.sites)
    sites = tuple(s for s in model.sites if s.startswith("blocks.") and s.split(".", 2)[2] in cfg.site_kinds)
    if not sites:
        raise ValueError(f"{cfg.model} has no site of kinds {list(cfg.site_kinds)}")
    return sites


def train(cfg: TrainSAEsConfig, model, world, sites: tuple[str, ...], ckpt: Path) -> tuple[dict, dict]:
    """``({site: SAE}, info)``: one TopK SAE per site, every site from the same forward per step."""
    d = model.config.d_model
    runs = {s: grid_runs("topk", d, [cfg.expansion * d], [cfg.k], steps=cfg.steps, batch_size=cfg.rows * cfg.seq_len,
                         lr=cfg.lr, lr_warmup_steps=min(50, cfg.steps // 10 + 1), lr_decay_frac=0.3,
                         dead_tokens=20 * cfg.rows * cfg.seq_len, aux_k=min(64, cfg.expansion * d), seed=cfg.seed)
            for s in sites}
    batches = FactsBatches(world, cfg.rows, cfg.seq_len - 1, seed=cfg.seed)
    token_fn = lambda t: batches.batch(t + cfg.buffer_factor)  # noqa: E731  (t < 0 fills the buffer)
    t0 = time.time()
    states, history = harvest_grid(model, runs, token_fn, cfg.steps, buffer_factor=cfg.buffer_factor, seed=cfg.seed,
                                   ckpt_dir=ckpt, save_every=cfg.save_every, log_every=max(cfg.steps // 5, 1))
    saes = {s: unstack(next(iter(states[s].values())), 0).sae.replace(reads=Reads(site=s)) for s in sites}
    return saes, {"train_seconds": time.time() - t0, "train_tokens": cfg.steps * cfg.rows * cfg.seq_len,
                  "final_mse": {s: history[-1][1][s] for s in sites} if history else {}}


def quality(model, saes: dict, tokens: np.ndarray) -> dict:
    """Per site: L0, FVE, cosine, dead fraction (``reconstruction_metrics``) and CE loss recovered / KL when
    spliced in (``downstream_metrics``) on ``tokens`` (held-out rows, every position)."""
    sites = list(saes)
    fwd = jax.jit(lambda m, t: m.run(t, capture=sites).cache)
    acts = {s: [] for s in sites}
    for i in range(0, len(tokens), 32):
        cache = fwd(model, jnp.asarray(tokens[i:i + 32]))
        for s in sites:
            acts[s].append(np.asarray(cache[s]).reshape(-1, cache[s].shape[-1]))
    out = {}
    for s, sae in saes.items():
        rec = reconstruction_metrics(sae, np.concatenate(acts[s]))
        out[s] = {**{k: rec[k] for k in ("l0", "fve", "cosine", "dead_frac")},
                  **downstream_metrics(model, tokens, s, sae)}
    return out


def sae_dir(out: Path) -> Path:
    return Path(out) / "saes"


def load_saes(out: Path) -> dict:
    """``{site: SAE}`` written by a finished run into ``out`` (model order)."""
    index = json.loads((sae_dir(out) / INDEX).read_text())
    return {s: ji.sae.load(sae_dir(out) / s) for s in index["sites"]}


def ensure_saes(out: str | Path, model: str = "facts-gpt") -> dict:
    """The SAEs in ``out`` (a ``train-saes`` output directory), trained there first if it holds none
    (the preset of ``model`` when there is one, else the facts-gpt preset on ``model``)."""
    out = Path(out)
    if not (sae_dir(out) / INDEX).exists():
        preset = PRESETS.get(model)
        cfg = preset() if preset is not None else TrainSAEsConfig(model=model)
        print(f"no SAEs in {out}: training them now (jaxinterp train-saes --model {model} --out {out})")
        results = run(cfg, out)
        write_json(out / "results.json", results)
        write_json(out / "config.json", json.loads(json.dumps(dataclasses.asdict(cfg), default=str)))
    return load_saes(out)


def table(rows: dict) -> str:
    """The quality table (markdown)."""
    lines = ["| site | L0 | FVE | CE clean | CE with SAE | CE zero-ablated | loss recovered | dead |",
             "|---|---|---|---|---|---|---|---|"]
    for s, q in rows.items():
        lines.append(f"| {s} | {q['l0']:.1f} | {q['fve']:.3f} | {q['ce_clean']:.3f} | {q['ce_sae']:.3f} | "
                     f"{q['ce_zero']:.2f} | {q['loss_recovered']:.3f} | {q['dead_frac']:.3f} |")
    return "\n".join(lines)


def run(cfg: TrainSAEsConfig, out: Path) -> dict:
    out = Path(out)
    with locked(out):
        model, world = load_world_model(cfg.model)
        sites = default_sites(model, cfg)
        config = json.loads(json.dumps(dataclasses.asdict(cfg), default=str))
        check_run_config(out / "ckpt", config, hint=f"use another --out or delete {out}")
        saes, info = train(cfg, model, world, sites, out / "ckpt")
        for s, sae in saes.items():
            ji.sae.save(sae, sae_dir(out) / s, model_name=cfg.model, context_size=cfg.seq_len)
        eval_tokens = FactsBatches(world, cfg.eval_rows, cfg.seq_len - 1, seed=cfg.seed + 1000).batch(0)
        t0 = time.time()
        rows = quality(model, saes, eval_tokens)
        write_json(sae_dir(out) / INDEX, {"model": cfg.model, "sites": list(sites)})
    size = sum(p.stat().st_size for p in sae_dir(out).rglob("*") if p.is_file())
    print("L0: active latents per token; FVE: fraction of the site's variance explained; CE loss recovered: 1 = "
          "splicing the SAE in keeps the LM loss, 0 = as bad as zero-ablating the site (held-out rows)")
    print(table(rows))
    return {"model": cfg.model, "sites": list(sites), **info, "eval_seconds": time.time() - t0,
            "bytes_on_disk": size, "quality": rows, "table": table(rows)}


main = experiment_main("train_saes", PRESETS, run, doc=__doc__)

if __name__ == "__main__":
    sys.exit(main())
