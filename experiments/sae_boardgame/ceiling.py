"""Ceiling check for the board metrics: score a *probe dictionary* instead of an SAE.

    python -m jaxinterp.experiments.sae_boardgame.ceiling --out results/sae_boardgame_ceiling

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

import argparse
import json
from pathlib import Path

import jax
import numpy as np

import jaxinterp as ji
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


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="othello-gpt")
    ap.add_argument("--layers", default="", help="comma-separated layers (default: all)")
    ap.add_argument("--n-train-games", type=int, default=2000)
    ap.add_argument("--n-test-games", type=int, default=500)
    ap.add_argument("--random-seed", type=int, default=1)
    ap.add_argument("--out", default="results/sae_boardgame_ceiling")
    ap.add_argument("--baseline-only", action="store_true", help="only the model-free last-move dictionary")
    args = ap.parse_args(argv)
    trained = ji.load(args.model)
    board = othello.OthelloConfig(size=board_size_of(trained))
    games = {"train": othello.random_games(board, args.n_train_games, seed=100, full_only=True),
             "test": othello.random_games(board, args.n_test_games, seed=200, full_only=True)}
    layers = [int(v) for v in args.layers.split(",") if v] or list(range(trained.config.n_layers))
    n_label = args.n_train_games // 2 * (board.n_moves - 1)
    out = {"last_move": score_last_move(games, board, n_label)}
    print(f"last-move dictionary  coverage {out['last_move']['coverage']:.3f}  "
          f"reconstruction {out['last_move']['reconstruction']:.3f}", flush=True)
    models = [] if args.baseline_only else [("trained", trained), ("random_init", ji.init(trained.config, args.random_seed))]
    for name, model in models:
        for layer in layers:
            r = score(model, f"blocks.{layer}.resid_post", games, board, n_label)
            out[f"{name}/L{layer}"] = r
            print(f"{name:11s} L{layer}  probe acc {r['probe_accuracy']:.3f}  coverage {r['coverage']:.3f}  "
                  f"reconstruction {r['reconstruction']:.3f}  labelled {r['n_labelled']}", flush=True)
    path = Path(args.out)
    path.mkdir(parents=True, exist_ok=True)
    (path / "results.json").write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
