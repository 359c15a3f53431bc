"""The reconstruction breakdown against board_reconstruction and a direct per-row count."""

from __future__ import annotations

import numpy as np
import pytest

from jaxinterp.experiments.sae_boardgame.diagnose import last_move_detectors, reconstruction_breakdown
from jaxinterp.sae.board import THRESHOLDS, board_reconstruction


def _data(seed=0, n=600, f=12, p=9):
    rng = np.random.default_rng(seed)
    props = rng.random((2 * n, p)) < 0.3
    # latents: noisy copies of some properties (so some get labelled) plus pure noise
    acts = np.maximum(0, props[:, :f % p + 3] * rng.random((2 * n, f % p + 3)) * 2 - 0.2 * rng.random((2 * n, 1)))
    acts = np.concatenate([acts, np.maximum(0, rng.normal(size=(2 * n, f - acts.shape[1])))], 1).astype(np.float32)
    return acts[:n], props[:n], acts[n:], props[n:]


@pytest.mark.parametrize("seed", [0, 1])
def test_breakdown_f1_equals_board_reconstruction_and_stage_recall_is_a_direct_count(seed):
    la, lp, ta, tp = _data(seed)
    positions = np.arange(len(ta)) % 31
    last_prop = np.arange(len(ta)) % tp.shape[1]
    rec = board_reconstruction(la, lp, ta, tp)
    for i, t in enumerate(THRESHOLDS):
        b = reconstruction_breakdown(la, lp, ta, tp, t, positions, last_prop)
        assert b["f1"] == pytest.approx(rec["per_threshold"][i], abs=1e-9)
    b = reconstruction_breakdown(la, lp, ta, tp, rec["best_threshold"], positions, last_prop)
    assert b["n_labelled_latents"] == rec["n_labelled"]
    # direct, row by row: labels, predicted set, hits
    mx = la.max(0)
    t = rec["best_threshold"]
    fire = lambda a: (a > t * mx) & (a > 0) & (mx > 0)
    labels = []
    for j in range(la.shape[1]):
        on = fire(la)[:, j]
        labels.append({q for q in range(lp.shape[1]) if on.sum() >= 10 and (on & lp[:, q]).sum() >= 0.95 * on.sum()})
    hits = np.zeros(len(ta)); true = tp.sum(1); last = 0
    for r in range(len(ta)):
        pred = set().union(*[labels[j] for j in np.nonzero(fire(ta[r:r + 1])[0])[0]])
        hits[r] = sum(tp[r, q] for q in pred)
        last += int(last_prop[r] in pred and tp[r, last_prop[r]])
    assert b["recall"] == pytest.approx(hits.sum() / true.sum())
    m = positions < 5
    assert b["by_stage"]["0-5"]["recall"] == pytest.approx(hits[m].sum() / true[m].sum())
    assert b["last_move_share_of_tp"] == pytest.approx(last / max(hits.sum(), 1))


def test_last_move_detectors_one_latent_per_square_is_perfect():
    sq = np.random.default_rng(0).integers(0, 5, 200)
    acts = np.eye(5, dtype=np.float32)[sq] * 0.7
    assert np.allclose(last_move_detectors(acts, sq, 5, 0.5), 1.0)
    # a latent that fires on every row detects no square well
    assert last_move_detectors(np.ones((200, 1), np.float32), sq, 5, 0.0).max() < 0.5
