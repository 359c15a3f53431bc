"""SAEs of six families on othello-gpt vs its random-init twin, judged by board-game metrics.

    jaxinterp sae-boardgame                      # = python -m jaxinterp.experiments.sae_boardgame.main
    jaxinterp sae-boardgame --preset long        # the README's headline run

For each model (trained othello-gpt, and a random-initialised model of the same config)
the residual stream ``blocks.{layer}.resid_post`` is collected on random legal games;
one ``SAETrainer`` trains every family's grid at once on those activations; each SAE
is then scored on held-out games: L0, MSE, FVE, cosine, dead/dense fractions, relative
reconstruction bias, CE loss recovered and KL (splicing the SAE into the model; zero
ablation as the floor), and the board-game coverage and board reconstruction of the
"mine / theirs" (blank-masked) board state (METHODS §4). Writes ``results.json``, ``config.json``
and ``frontier.png`` to ``--out``. SAE training state is checkpointed in ``<out>/ckpt`` (every
tenth of the run); re-running the same command resumes from it, and a different config with
the same ``--out`` is refused.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxinterp as ji
from jaxinterp.checkpoint import check_run_config
from jaxinterp.experiments.common import experiment_main, pyplot, save_figure
from jaxinterp.experiments.data import othello
from jaxinterp.sae import SAETrainConfig, SAETrainer, unstack
from jaxinterp.sae.board import board_reconstruction, coverage
from jaxinterp.sae.metrics import downstream_metrics, latent_acts, reconstruction_metrics

from .config import BoardgameConfig

PRESETS = {"default": BoardgameConfig, "long": BoardgameConfig.long, "scaled": BoardgameConfig.scaled,
           "smoke": BoardgameConfig.smoke}


def board_size_of(model) -> int:
    size = int(round((model.config.vocab_size - 1 + 4) ** 0.5))
    if size * size - 4 + 1 != model.config.vocab_size:
        raise ValueError(f"vocab_size {model.config.vocab_size} is not an Othello move vocabulary (S - 4 + 1)")
    return size


def collect(model, games: othello.Games, board: othello.OthelloConfig, site: str, batch: int = 256):
    """``(acts [G*T, D], props [G*T, P], tokens [G, T])`` for the inputs ``tokens[:, :-1]``."""
    tokens = othello.square_to_token(board, games.squares)[:, :-1]
    fwd = jax.jit(lambda m, t: m.run(t, capture=site).cache[site])
    acts = np.concatenate([np.asarray(fwd(model, jnp.asarray(tokens[i:i + batch]))) for i in range(0, len(tokens), batch)])
    props = othello.mine_theirs_blank_masked(games)[:, :-1]  # state after each input move
    return acts.reshape(-1, acts.shape[-1]), props.reshape(len(acts) * acts.shape[1], -1), tokens


def make_runs(cfg: BoardgameConfig, d_in: int) -> dict:
    base = dict(d_in=d_in, d_sae=cfg.expansion * d_in, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                lr_warmup_steps=min(100, cfg.steps // 10 + 1), lr_decay_frac=0.2, seed=cfg.seed,
                dead_tokens=50 * cfg.batch_size, aux_k=min(64, cfg.expansion * d_in))
    grids = {
        "relu": [{"sparsity_coeff": c} for c in cfg.l1_coeffs],
        "panneal": [{"sparsity_coeff": c} for c in cfg.l1_coeffs],
        "gated": [{"sparsity_coeff": c} for c in cfg.l1_coeffs],
        "topk": [{"k": k} for k in cfg.topk_ks],
        "batchtopk": [{"k": k} for k in cfg.topk_ks],
        "jumprelu": [{"sparsity_coeff": c} for c in cfg.jumprelu_coeffs],
    }
    extra = {"panneal": dict(p_end=cfg.p_end, anneal_start=int(cfg.anneal_frac * cfg.steps)),
             "topk": dict(k=max(cfg.topk_ks)), "batchtopk": dict(k=max(cfg.topk_ks)),
             "jumprelu": dict(sparsity_warmup_steps=cfg.steps // 10, bandwidth=cfg.jumprelu_bandwidth,
                             jumprelu_init_threshold=cfg.jumprelu_init_threshold)}
    return {fam: (SAETrainConfig(family=fam, **base, **extra.get(fam, {})), grids[fam]) for fam in cfg.families}


def batch_fn_for(acts: np.ndarray, batch_size: int, seed: int):
    n = len(acts) // batch_size * batch_size
    per_epoch = n // batch_size

    cache = {}  # the current epoch's permutation (one permutation of all rows per epoch, not per step)

    def batch(t: int) -> np.ndarray:
        epoch, i = divmod(t, per_epoch)
        if epoch not in cache:
            cache.clear()
            cache[epoch] = np.random.default_rng([seed, epoch]).permutation(len(acts))[:n]
        return acts[cache[epoch][i * batch_size:(i + 1) * batch_size]]

    return batch


def evaluate(cfg: BoardgameConfig, model, site: str, runs: dict, states: dict, data: dict) -> list[dict]:
    rows = []
    for fam, (run_cfg, grid) in runs.items():
        for i, override in enumerate(grid):
            sae = unstack(states[fam], i).sae
            row = {"family": fam, **override, **reconstruction_metrics(sae, data["test_acts"])}
            a_label, a_test = latent_acts(sae, data["label_acts"]), latent_acts(sae, data["test_acts"])
            cov = coverage(a_test, data["test_props"])
            rec = board_reconstruction(a_label, data["label_props"], a_test, data["test_props"])
            row.update(coverage=cov["coverage"], coverage_threshold=cov["best_threshold"],
                       reconstruction=rec["reconstruction"], reconstruction_threshold=rec["best_threshold"],
                       n_labelled=rec["n_labelled"])
            row.update(downstream_metrics(model, data["ce_tokens"], site, sae))
            rows.append(row)
            print(f"  {fam:9s} {json.dumps(override):28s} L0 {row['l0']:6.1f}  FVE {row['fve']:.3f}  "
                  f"cov {row['coverage']:.3f}  recon {row['reconstruction']:.3f}  CE rec {row['loss_recovered']:.3f}")
    return rows


def train_saes(cfg: BoardgameConfig, model, games: dict, board: othello.OthelloConfig, **fit_kw):
    """Capture the site on the train / test games and train every family's grid on the train
    activations. Returns (runs, states, history, data); ``data`` holds the test and labelling
    activations and properties and the CE-loss tokens."""
    site = f"blocks.{cfg.layer}.resid_post"
    train_acts, train_props, _ = collect(model, games["train"], board, site)
    test_acts, test_props, test_tokens = collect(model, games["test"], board, site)
    n_label = cfg.n_label_games * (board.n_moves - 1)
    data = {"site": site, "test_acts": test_acts, "test_props": test_props, "label_acts": train_acts[:n_label],
            "label_props": train_props[:n_label], "ce_tokens": test_tokens[:cfg.n_ce_games]}
    runs = make_runs(cfg, train_acts.shape[1])
    trainer = SAETrainer(runs)
    states, history = trainer.fit(trainer.init(train_acts[:8192]), batch_fn_for(train_acts, cfg.batch_size, cfg.seed),
                                  **fit_kw)
    return runs, states, history, data


def run_model(cfg: BoardgameConfig, model, name: str, games: dict, board: othello.OthelloConfig,
              ckpt_dir: Path | None = None) -> dict:
    """Train and evaluate one model's SAEs. With ``ckpt_dir``, training state is checkpointed
    every tenth of the run and a re-run resumes from the latest checkpoint (``history``, rows
    ``{"step", run: {metric: [G]}}``, then still covers the whole run: it is read back from the
    checkpoint directory's ``metrics.jsonl``)."""
    t0 = time.time()
    tenth = max(cfg.steps // 10, 1)
    runs, states, history, data = train_saes(cfg, model, games, board, log_every=tenth, ckpt_dir=ckpt_dir,
                                             save_every=tenth)
    print(f"[{name}] trained {sum(len(g) for _, g in runs.values())} SAEs in {time.time() - t0:.0f}s; evaluating")
    return {"rows": evaluate(cfg, model, data["site"], runs, states, data), "train_seconds": time.time() - t0,
            "history": history}


def plot(results: dict, path: Path) -> None:
    plt = pyplot()

    metrics = [("coverage", "board coverage (F1)"), ("reconstruction", "board reconstruction (F1)"),
               ("loss_recovered", "CE loss recovered (fraction)")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    colors = dict(zip(["relu", "panneal", "topk", "batchtopk", "jumprelu", "gated"], plt.cm.tab10.colors))
    for ax, (key, label) in zip(axes, metrics):
        for model_name, marker, fill in (("trained", "o", True), ("random_init", "x", False)):
            for fam in colors:
                rows = sorted((r for r in results[model_name]["rows"] if r["family"] == fam), key=lambda r: r["l0"])
                if not rows:
                    continue
                ax.plot([r["l0"] for r in rows], [r[key] for r in rows], marker=marker, color=colors[fam],
                        linestyle="-" if fill else ":", label=f"{fam} ({model_name})")
        ax.set_xscale("log")
        ax.set_xlabel("L0 (active latents per token, log scale)")
        ax.set_ylabel(label)
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    cfg = results["config"]
    fig.suptitle(f"SAEs on {Path(cfg['model']).name} blocks.{cfg['layer']}.resid_post (o, solid) vs its random-init "
                 f"twin (x, dotted): board metrics and CE recovered against sparsity")
    save_figure(fig, path)


METRICS_MEANING = ("L0: active latents per token; FVE: fraction of variance explained; CE recovered: (CE zero-ablated "
                   "- CE with the SAE spliced in) / (CE zero-ablated - CE clean); coverage: mean over board properties "
                   "of the best latent's F1; reconstruction: F1 of the board predicted from >=95%-precise latents")


def summary_table(results: dict) -> str:
    lines = [METRICS_MEANING, "| model | family | setting | L0 | FVE | CE recovered | coverage | reconstruction |",
             "|---|---|---|---|---|---|---|---|"]
    for model_name in ("trained", "random_init"):
        for r in results[model_name]["rows"]:
            setting = ", ".join(f"{k}={r[k]}" for k in ("sparsity_coeff", "k") if k in r)
            lines.append(f"| {model_name} | {r['family']} | {setting} | {r['l0']:.1f} | {r['fve']:.3f} | "
                         f"{r['loss_recovered']:.3f} | {r['coverage']:.3f} | {r['reconstruction']:.3f} |")
    return "\n".join(lines)


def load_data(cfg: BoardgameConfig):
    """(the trained model, the board, the train / test games) of a config."""
    trained = ji.load(cfg.model)
    board = othello.OthelloConfig(size=board_size_of(trained))
    games = {"train": othello.random_games(board, cfg.n_train_games, seed=cfg.seed + 100, full_only=True),
             "test": othello.random_games(board, cfg.n_test_games, seed=cfg.seed + 200, full_only=True)}
    return trained, board, games


def models_of(cfg: BoardgameConfig, trained) -> tuple:
    """(name, model) of the trained model and its random-init control."""
    return ("trained", trained), ("random_init", ji.init(trained.config, cfg.random_seed))


def run(cfg: BoardgameConfig, out: Path) -> dict:
    trained, board, games = load_data(cfg)
    results = {"config": dataclasses.asdict(cfg)}
    ckpt_root = out / "ckpt"
    check_run_config(ckpt_root, results["config"], hint=f"use another --out or delete {ckpt_root}")
    for name, model in models_of(cfg, trained):
        print(f"== {name}")
        results[name] = run_model(cfg, model, name, games, board, ckpt_dir=ckpt_root / name)
    plot(results, out / "frontier.png")
    print(summary_table(results))
    return results


main = experiment_main("sae_boardgame", PRESETS, run, doc=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
