"""Feature dashboards of an SAE on a facts-world model (facts-gpt by default).

    jaxinterp sae-dashboard                                  # results/sae_dashboard/default/
    jaxinterp sae-dashboard --set sae=path/to/sae --out results/dash2   # any ji.sae.load format

Without ``--sae`` a TopK SAE is trained on the site's activations (``SAETrainer``) and saved in
SAELens layout to ``<out>/sae`` (``--sae <out>/sae`` rebuilds the same page). The dashboard
(``jaxinterp.sae.dashboard``) is written to ``<out>/index.html``, the SAE's reconstruction
quality (L0, FVE, CE loss recovered when spliced) and timings to ``<out>/results.json``.
Config fields are set with ``--set`` (``--set steps=500 site=blocks.1.mlp_out``); ``--preset smoke``
runs in seconds.
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
from jaxinterp.sae import Reads, SAETrainConfig, SAETrainer, Splice, unstack
from jaxinterp.sae.dashboard import DashboardConfig, build_dashboard, token_strings
from jaxinterp.experiments.common import experiment_main
from jaxinterp.sae.metrics import downstream_metrics, reconstruction_metrics

from .config import SAEDashboardConfig

PRESETS = {"default": SAEDashboardConfig.default, "smoke": SAEDashboardConfig.smoke}


def facts_rows(cfg: SAEDashboardConfig, model, n: int, seed: int) -> tuple[np.ndarray, int]:
    """``(tokens [n, seq_len], bos id)``: packed facts-world documents of the model's world."""
    from jaxinterp.experiments.data.facts_world import FactsWorld
    from jaxinterp.experiments.train_lm.data import FactsBatches

    source = Path(getattr(model, "source", cfg.model))
    if not (source / "world.json").exists():
        raise ValueError(f"{cfg.model!r} has no world.json; this run needs a facts-world model "
                         f"(embedded: {ji.embedded_models()})")
    world = FactsWorld.from_dir(source)
    return FactsBatches(world, n, cfg.seq_len - 1, seed=seed).batch(0), world.bos_id


def site_acts(model, tokens: np.ndarray, site: str, keep: np.ndarray, batch: int = 64) -> np.ndarray:
    """``[M, D]`` activations of ``site`` at the positions where ``keep`` is True."""
    fwd = jax.jit(lambda m, t: m.run(t, capture=site).cache[site])
    acts = np.concatenate([np.asarray(fwd(model, tokens[i:i + batch])) for i in range(0, len(tokens), batch)])
    return acts[keep]


def train_sae(cfg: SAEDashboardConfig, model, out: Path):
    """A TopK SAE on ``cfg.site`` (training rows disjoint from the dashboard's), saved to ``out/sae``."""
    tokens, bos = facts_rows(cfg, model, cfg.train_rows, seed=cfg.seed + 1)
    acts = site_acts(model, tokens, cfg.site, tokens != bos)
    d = acts.shape[1]
    run = SAETrainConfig(family="topk", d_in=d, d_sae=cfg.expansion * d, k=cfg.k, steps=cfg.steps,
                         batch_size=cfg.batch_size, lr=cfg.lr, lr_warmup_steps=min(100, cfg.steps // 10 + 1),
                         lr_decay_frac=0.2, dead_tokens=20 * cfg.batch_size, aux_k=min(64, cfg.expansion * d),
                         seed=cfg.seed)
    trainer = SAETrainer({"topk": (run, [{}])})
    batch_fn = lambda t: acts[np.random.default_rng([cfg.seed, t]).integers(0, len(acts), cfg.batch_size)]
    t0 = time.time()
    states, _ = trainer.fit(trainer.init(acts[:8192]), batch_fn, log_every=max(cfg.steps // 5, 1))
    sae = unstack(states["topk"], 0).sae.replace(reads=Reads(site=cfg.site))
    ji.sae.save(sae, out / "sae", model_name=cfg.model, context_size=cfg.seq_len)
    return sae, {"train_seconds": time.time() - t0, "train_tokens": int(len(acts))}


def run(cfg: SAEDashboardConfig, out: Path) -> dict:
    # the experiment harness holds --out's lock for the whole run (a second run there is refused)
    model = ji.load(cfg.model)
    if cfg.sae is None:
        sae, info = train_sae(cfg, model, out)
    else:
        sae, info = ji.sae.load(cfg.sae), {"sae": cfg.sae}
    site = sae.site or cfg.site
    tokens, bos = facts_rows(cfg, model, cfg.rows, seed=cfg.seed + 2)
    mask = tokens != bos
    sae_inputs = np.asarray(Splice(sae).sae_input(jnp.asarray(site_acts(model, tokens, site, mask))))
    quality = {**reconstruction_metrics(sae, sae_inputs),
               **downstream_metrics(model, tokens, site, sae)}
    vocab = token_strings(Path(model.source) / "tokenizer.json", model.config.vocab_size)
    t0 = time.time()
    meta = (f"{cfg.model}; {sae.family} SAE, d_in {sae.d_in}, {sae.d_sae} latents; L0 {quality['l0']:.1f}, "
            f"FVE {quality['fve']:.3f}, CE loss recovered {quality['loss_recovered']:.3f}")
    page, stats = build_dashboard(model, sae, tokens, vocab, out / "index.html", site=site, mask=mask,
                                  cfg=DashboardConfig(n_features=cfg.n_features, top_contexts=cfg.top_contexts),
                                  title=f"SAE features: {cfg.model} {site}", meta=meta)
    results = {"config": dataclasses.asdict(cfg), "site": site, **info, **quality,
               "dashboard_seconds": time.time() - t0, "dead_frac_dashboard": float((stats.freq == 0).mean()),
               "page": str(page)}
    print("L0: active latents per token; FVE: fraction of the site's variance the reconstruction explains; CE loss "
          "recovered: 1 = splicing the SAE in keeps the LM loss, 0 = as bad as zero-ablating the site")
    print(f"{sae.family} SAE at {site}: L0 {quality['l0']:.1f}, FVE {quality['fve']:.3f}, CE loss recovered "
          f"{quality['loss_recovered']:.3f}; dashboard {page}")
    return results


main = experiment_main("sae_dashboard", PRESETS, run, doc=__doc__)

if __name__ == "__main__":
    sys.exit(main())
