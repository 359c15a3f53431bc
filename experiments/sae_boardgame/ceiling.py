"""Ceiling check for the board metrics: score a *probe dictionary* instead of an SAE.

    python -m jaxinterp.experiments.sae_boardgame.ceiling --set layers=2,3

A linear softmax probe (mine / theirs / empty per square) is fit on the residual stream
of the training games; its per-square class probabilities for "mine" and "theirs" are
used as the latents of a dictionary (2 x n_squares latents) and scored with exactly the
coverage and board-reconstruction metrics the SAEs get. If the trained model's probe
dictionary does not reconstruct the board far better than the random-init twin's, no
SAE on that model can be expected to: the model, not the SAE, is the weak link.

A second, model-free baseline is the *last-move dictionary*: one latent per square that
fires when that square was the move just played (what a residual stream that holds
little more than the current token embedding offers). It labels "square X is theirs"
and nothing else, so it bounds what an SAE on an uninformative model can reach.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import jax
import numpy as np

import jaxinterp as ji
from jaxinterp.experiments.common import experiment_main
from jaxinterp.experiments.data import othello
from jaxinterp.experiments.train_othello.main import fit_probe, probe_logits
from jaxinterp.sae.board import board_reconstruction, coverage

from .main import board_size_of, collect


def probe_latents(probe: dict, x: np.ndarray) -> np.ndarray:
    """``[N, 3 S]`` latents: probability of (mine, theirs, empty) per square, in the board-state layout."""
    return np.asarray(jax.nn.softmax(probe_logits(probe, x), -1)).reshape(len(x), -1)


def last_move_latents(board: othello.OthelloConfig, games: othello.Games) -> np.ndarray:
    """``[G * T, S]`` one-hot of the square played by each input move (``games.squares[:, :-1]``)."""
    sq = games.squares[:, :-1].reshape(-1)
    return np.eye(board.n_squares, dtype=np.float32)[sq]


def score_last_move(games: dict, board: othello.OthelloConfig, n_label: int) -> dict:
    """Coverage / reconstruction of the last-move dictionary on the test games."""
    props = {k: othello.mine_theirs_blank_masked(g)[:, :-1].reshape(-1, board.n_squares * 3) for k, g in games.items()}
    a_tr, a_te = last_move_latents(board, games["train"])[:n_label], last_move_latents(board, games["test"])
    rec = board_reconstruction(a_tr, props["train"][:n_label], a_te, props["test"])
    return {"coverage": coverage(a_te, props["test"])["coverage"], "reconstruction": rec["reconstruction"],
            "n_labelled": rec["n_labelled"]}


def score(model, site: str, games: dict, board: othello.OthelloConfig, n_label: int) -> dict:
    """Probe-dictionary coverage / reconstruction and probe accuracy on the test games."""
    tr_acts, tr_props, _ = collect(model, games["train"], board, site)
    te_acts, te_props, _ = collect(model, games["test"], board, site)
    tr_cls = othello.mine_theirs_empty(games["train"])[:, :-1].argmax(-1).reshape(len(tr_acts), -1)
    te_cls = othello.mine_theirs_empty(games["test"])[:, :-1].argmax(-1).reshape(len(te_acts), -1)
    probe = fit_probe(tr_acts, tr_cls)
    a_tr, a_te = probe_latents(probe, tr_acts[:n_label]), probe_latents(probe, te_acts)
    acc = float((a_te.reshape(len(te_acts), -1, 3).argmax(-1) == te_cls).mean())
    cov = coverage(a_te, te_props)
    rec = board_reconstruction(a_tr, tr_props[:n_label], a_te, te_props)
    return {"probe_accuracy": acc, "coverage": cov["coverage"], "reconstruction": rec["reconstruction"],
            "reconstruction_per_threshold": rec["per_threshold"], "n_labelled": rec["n_labelled"]}


@dataclasses.dataclass(frozen=True, kw_only=True)
class CeilingConfig:
    """``layers``: resid_post layers probed (None: all); ``baseline_only``: only the last-move dictionary."""

    model: str = "othello-gpt"
    layers: Optional[tuple[int, ...]] = None
    n_train_games: int = 2000
    n_test_games: int = 500
    random_seed: int = 1
    baseline_only: bool = False

    def __post_init__(self):
        if self.n_train_games < 2 or self.n_test_games < 1:
            raise ValueError(f"n_train_games must be >= 2 and n_test_games >= 1, got {self.n_train_games}, "
                             f"{self.n_test_games}")


def run(cfg: CeilingConfig, out_dir: Path) -> dict:
    trained = ji.load(cfg.model)
    board = othello.OthelloConfig(size=board_size_of(trained))
    games = {"train": othello.random_games(board, cfg.n_train_games, seed=100, full_only=True),
             "test": othello.random_games(board, cfg.n_test_games, seed=200, full_only=True)}
    layers = cfg.layers if cfg.layers is not None else range(trained.config.n_layers)
    n_label = cfg.n_train_games // 2 * (board.n_moves - 1)
    print("coverage / reconstruction: the SAE board metrics (F1) of a probe dictionary; probe acc: accuracy of the "
          "mine / theirs / empty probe per square on held-out games")
    out = {"last_move": score_last_move(games, board, n_label)}
    print(f"last-move dictionary  coverage {out['last_move']['coverage']:.3f}  "
          f"reconstruction {out['last_move']['reconstruction']:.3f}", flush=True)
    control = ji.init(trained.config, cfg.random_seed)
    models = [] if cfg.baseline_only else [("trained", trained), ("random_init", control)]
    for name, model in models:
        for layer in layers:
            r = score(model, f"blocks.{layer}.resid_post", games, board, n_label)
            out[f"{name}/L{layer}"] = r
            print(f"{name:11s} L{layer}  probe acc {r['probe_accuracy']:.3f}  coverage {r['coverage']:.3f}  "
                  f"reconstruction {r['reconstruction']:.3f}  labelled {r['n_labelled']}", flush=True)
    return out


PRESETS = {"default": CeilingConfig}
main = experiment_main("sae_boardgame_ceiling", PRESETS, run, doc=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
