"""Supervised board-game metrics of a dictionary (Karvonen, Wright, Rager et al. 2024).

A *board property* is one binary feature of the game state at a token (e.g. "square c4
holds one of my stones"). Each latent at a threshold ``t * max_activation`` (``t`` in
``{0, 0.1, ..., 1}``; ``t = 0`` means "fires at all") is a binary classifier of every
property.

* ``coverage``: for each threshold, the mean over properties of the best latent's F1;
  the coverage is the maximum over thresholds.
* ``board_reconstruction``: on training inputs each latent is labelled with every
  property it predicts with precision >= 0.95 over >= 10 firings; on test inputs the
  predicted board is the union of the labels of the active latents; the score is the F1
  of predicted vs true properties (pooled over inputs and properties) at the best
  threshold.

Properties that are never true in the evaluation data (e.g. the zeroed "empty" channel
of the blank-masked state) carry no information and are dropped. Latents' maximum
activations come from the data the classifiers are fit on (the training split for
reconstruction).
"""

from __future__ import annotations

import numpy as np

__all__ = ["THRESHOLDS", "coverage", "board_reconstruction", "f1_matrix"]

THRESHOLDS = np.round(np.linspace(0.0, 1.0, 11), 2)


def _check(acts: np.ndarray, props: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    acts, props = np.asarray(acts, np.float32), np.asarray(props)
    if acts.ndim != 2 or props.ndim != 2 or len(acts) != len(props):
        raise ValueError(f"acts must be [N, F] and props [N, P] with the same N, got {acts.shape} and {props.shape}")
    return acts, props.astype(bool)


def _fires(acts: np.ndarray, max_act: np.ndarray, t: float) -> np.ndarray:
    """``[N, F]`` bool: activation above ``t * max`` (above 0 for t = 0); never for latents that never fire."""
    return (acts > t * max_act) & (acts > 0) & (max_act > 0)


def f1_matrix(on: np.ndarray, props: np.ndarray) -> np.ndarray:
    """``[F, P]`` F1 of each latent (``on [N, F]`` bool) as a classifier of each property (``[N, P]`` bool)."""
    on_f = on.astype(np.float32)
    tp = on_f.T @ props.astype(np.float32)  # [F, P]
    denom = on_f.sum(0)[:, None] + props.sum(0)[None, :]
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)


def coverage(acts: np.ndarray, props: np.ndarray, thresholds=THRESHOLDS) -> dict:
    """``{"coverage", "per_threshold" [len(thresholds)], "best_threshold"}``."""
    acts, props = _check(acts, props)
    props = props[:, props.any(0)]
    max_act = acts.max(0)
    per = np.array([f1_matrix(_fires(acts, max_act, t), props).max(0).mean() for t in thresholds])
    i = int(per.argmax())
    return {"coverage": float(per[i]), "per_threshold": per.tolist(), "best_threshold": float(thresholds[i])}


def board_reconstruction(train_acts: np.ndarray, train_props: np.ndarray, test_acts: np.ndarray,
                         test_props: np.ndarray, thresholds=THRESHOLDS, min_precision: float = 0.95,
                         min_firings: int = 10) -> dict:
    """``{"reconstruction", "per_threshold", "best_threshold", "n_labelled"}`` (see the module docstring)."""
    train_acts, train_props = _check(train_acts, train_props)
    test_acts, test_props = _check(test_acts, test_props)
    keep = train_props.any(0) | test_props.any(0)
    train_props, test_props = train_props[:, keep], test_props[:, keep]
    max_act = train_acts.max(0)
    per, labelled = [], []
    for t in thresholds:
        on = _fires(train_acts, max_act, t)
        fired = on.sum(0).astype(np.float32)  # [F]
        tp = on.astype(np.float32).T @ train_props.astype(np.float32)  # [F, P]
        labels = (tp >= min_precision * fired[:, None]) & (fired[:, None] >= min_firings)
        pred = (_fires(test_acts, max_act, t).astype(np.float32) @ labels.astype(np.float32)) > 0  # [N, P]
        tp_all = np.sum(pred & test_props)
        denom = pred.sum() + test_props.sum()
        per.append(float(2 * tp_all / denom) if denom else 0.0)
        labelled.append(int(labels.any(1).sum()))
    i = int(np.argmax(per))
    return {"reconstruction": per[i], "per_threshold": per, "best_threshold": float(thresholds[i]),
            "n_labelled": labelled[i]}
