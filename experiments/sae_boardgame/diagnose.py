"""Where board reconstruction is won and lost: a breakdown of the union-of-labels board.

    python -m jaxinterp.experiments.sae_boardgame.diagnose \
        --set families=topk topk_ks=16 expansion=8 steps=1500 batch_size=1024 n_train_games=20000

Trains the config's SAEs exactly as ``main.py`` does (same games, seeds, batches) on the
trained model and the random-init control, then, for each SAE at its best reconstruction
threshold: precision and recall of the predicted board, recall by game stage (input
position buckets), the share of true positives that are "the square just played is
theirs" (what the model-free last-move dictionary gets), the labels' precision on the
test games, and, per square, the F1 of the best latent as a detector of "this square was
just played". Writes ``results.json`` and ``config.json`` to ``--out`` (default
``results/sae_boardgame_diagnose/<preset>/``); the presets and settings are ``main.py``'s.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from jaxinterp.sae import unstack
from jaxinterp.sae.board import _fires, board_reconstruction, f1_matrix
from jaxinterp.sae.metrics import latent_acts

from jaxinterp.experiments.common import experiment_main

from .config import BoardgameConfig
from .main import PRESETS, load_data, models_of, train_saes

STAGES = ((0, 5), (5, 10), (10, 20), (20, 10_000))  # input-position buckets [lo, hi)


def reconstruction_breakdown(label_acts: np.ndarray, label_props: np.ndarray, test_acts: np.ndarray,
                             test_props: np.ndarray, threshold: float, positions: np.ndarray,
                             last_prop: np.ndarray, min_precision: float = 0.95, min_firings: int = 10) -> dict:
    """The board-reconstruction prediction at one threshold, taken apart.

    ``positions [N_test]``: input position of each test row; ``last_prop [N_test]``: index of
    the property "the square just played is theirs" in that row. Labels, firing rule and F1
    are those of ``board_reconstruction`` (its ``per_threshold`` entry for ``threshold``).
    """
    label_props, test_props = np.asarray(label_props, bool), np.asarray(test_props, bool)
    max_act = label_acts.max(0)
    on = _fires(label_acts, max_act, threshold)
    fired = on.sum(0).astype(np.float32)
    tp_lab = on.astype(np.float32).T @ label_props.astype(np.float32)
    labels = (tp_lab >= min_precision * fired[:, None]) & (fired[:, None] >= min_firings)
    on_test = _fires(test_acts, max_act, threshold)
    pred = (on_test.astype(np.float32) @ labels.astype(np.float32)) > 0
    hit = pred & test_props
    n_tp, n_pred, n_true = int(hit.sum()), int(pred.sum()), int(test_props.sum())
    stages = {}
    for lo, hi in STAGES:
        m = (positions >= lo) & (positions < hi)
        if m.any():
            stages[f"{lo}-{min(hi, int(positions.max()) + 1)}"] = {
                "recall": float(hit[m].sum() / max(test_props[m].sum(), 1)),
                "precision": float(hit[m].sum() / max(pred[m].sum(), 1))}
    last_hits = int(hit[np.arange(len(hit)), last_prop].sum())
    # test-set precision of every (latent, label) pair whose latent fires on the test games
    f_test = on_test.sum(0)
    tp_test = on_test.astype(np.float32).T @ test_props.astype(np.float32)
    li, lp = np.nonzero(labels & (f_test[:, None] > 0))
    held = tp_test[li, lp] / f_test[li]
    return {"threshold": float(threshold), "f1": float(2 * n_tp / max(n_pred + n_true, 1)),
            "precision": n_tp / max(n_pred, 1), "recall": n_tp / max(n_true, 1), "by_stage": stages,
            "last_move_share_of_tp": last_hits / max(n_tp, 1), "n_labelled_latents": int(labels.any(1).sum()),
            "n_labels": int(labels.sum()),
            "label_test_precision_median": float(np.median(held)) if len(held) else 0.0,
            "label_test_precision_below_0.9": float((held < 0.9).mean()) if len(held) else 0.0}


def last_move_detectors(acts: np.ndarray, last_square: np.ndarray, n_squares: int, threshold: float) -> np.ndarray:
    """``[n_squares]`` F1 of the best latent (at ``threshold`` x max) as a detector of "square s was just played"."""
    onehot = np.eye(n_squares, dtype=bool)[last_square]
    return f1_matrix(_fires(acts, acts.max(0), threshold), onehot).max(0)


def run(cfg: BoardgameConfig, out: Path) -> dict:
    trained, board, games = load_data(cfg)
    n_in = board.n_moves - 1
    positions = np.tile(np.arange(n_in), cfg.n_test_games)
    last_sq = {k: g.squares[:, :-1].reshape(-1) for k, g in games.items()}
    last_prop = last_sq["test"] * 3 + 1  # mine / theirs / empty layout of mine_theirs_blank_masked
    n_label = cfg.n_label_games * n_in
    res = {"config": dataclasses.asdict(cfg)}
    print("recon: board-reconstruction F1 at its best threshold t (x max activation); precision / recall of the "
          "predicted board; last-move share: true positives that are 'the square just played is theirs'")
    for name, model in models_of(cfg, trained):
        runs, states, _, data = train_saes(cfg, model, games, board, progress=False)
        p_lab, test_props = data["label_props"], data["test_props"]
        rows = []
        for fam, (_, grid) in runs.items():
            for i, override in enumerate(grid):
                sae = unstack(states[fam], i).sae
                a_label, a_test = latent_acts(sae, data["label_acts"]), latent_acts(sae, data["test_acts"])
                rec = board_reconstruction(a_label, p_lab, a_test, test_props)
                row = {"family": fam, **override, "reconstruction": rec["reconstruction"],
                       **reconstruction_breakdown(a_label, p_lab, a_test, test_props,
                                                  rec["best_threshold"], positions, last_prop)}
                det = last_move_detectors(a_label, last_sq["train"][:n_label], board.n_squares, rec["best_threshold"])
                row["last_move_detector_f1_median"] = float(np.median(det[np.bincount(
                    last_sq["train"][:n_label], minlength=board.n_squares) > 0]))
                rows.append(row)
                print(f"[{name}] {fam} {json.dumps(override)}: recon {row['f1']:.3f} at t {row['threshold']}  "
                      f"precision {row['precision']:.3f} recall {row['recall']:.3f}  recall by stage "
                      + " ".join(f"{k}: {v['recall']:.3f}" for k, v in row["by_stage"].items())
                      + f"  last-move share {row['last_move_share_of_tp']:.2f}  "
                        f"last-move detector F1 {row['last_move_detector_f1_median']:.2f}", flush=True)
        res[name] = rows
    return res


main = experiment_main("sae_boardgame_diagnose", PRESETS, run, doc=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
