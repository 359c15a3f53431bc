"""Board-game metrics: a dictionary whose latents are exactly the board squares scores 1.0."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinterp.experiments.data import othello
from jaxinterp.sae import init_sae
from jaxinterp.sae.board import board_reconstruction, coverage, f1_matrix
from jaxinterp.sae.metrics import latent_acts


def _board_data(seed, n_games=40):
    cfg = othello.OthelloConfig(size=6)
    games = othello.random_games(cfg, n_games, seed=seed, full_only=True)
    props = othello.mine_theirs_blank_masked(games).reshape(-1, cfg.n_squares * 3)  # [N, 108]
    return props


def test_square_dictionary_has_perfect_coverage_and_reconstruction():
    train, test = _board_data(0), _board_data(1)
    p = train.shape[1]
    # activations that linearly encode the board; an SAE whose latents read exactly one property each
    sae = init_sae("relu", jax.random.PRNGKey(0), p, p)
    eye = jnp.eye(p)
    sae = sae.replace(params={"W_enc": eye, "b_enc": jnp.zeros(p), "W_dec": eye, "b_dec": jnp.zeros(p)})
    a_train, a_test = latent_acts(sae, train), latent_acts(sae, test)
    cov = coverage(a_test, test)
    rec = board_reconstruction(a_train, train, a_test, test)
    assert cov["coverage"] == pytest.approx(1.0) and rec["reconstruction"] == pytest.approx(1.0)
    assert rec["n_labelled"] == int(train.any(0).sum())  # every live property got its latent


def test_random_dictionary_scores_low_and_f1_matches_direct_count():
    train, test = _board_data(0), _board_data(1)
    acts = np.random.default_rng(0).random((len(test), 50)).astype(np.float32)
    assert coverage(acts, test)["coverage"] < 0.7
    assert board_reconstruction(np.random.default_rng(1).random((len(train), 50)), train, acts, test)[
        "reconstruction"] == 0.0  # no random latent reaches precision 0.95
    on = acts > 0.5
    f1 = f1_matrix(on, test > 0)
    i, j = 7, 12  # property 12: "mine" on square 4
    assert test[:, j].sum() > 0
    tp = np.sum(on[:, i] & (test[:, j] > 0))
    prec, rec = tp / on[:, i].sum(), tp / (test[:, j] > 0).sum()
    assert f1[i, j] == pytest.approx(2 * prec * rec / (prec + rec), rel=1e-6)


def test_threshold_rule_and_min_firings():
    # one latent fires at 1.0 exactly on property 0 (12 times) and weakly (0.05) on property 1 (5 times)
    props = np.zeros((40, 2), bool)
    props[:12, 0] = True
    props[12:17, 1] = True
    acts = np.zeros((40, 1), np.float32)
    acts[:12, 0] = 1.0
    acts[12:17, 0] = 0.05
    cov = coverage(acts, props)
    # threshold 0: precision 12/17 on property 0; threshold >= 0.1: perfect on property 0
    assert cov["per_threshold"][0] == pytest.approx((2 * 12 / 29 + 2 * 5 / 22) / 2)
    assert cov["per_threshold"][1] == pytest.approx(0.5)
    rec = board_reconstruction(acts, props, acts, props)
    assert rec["per_threshold"][0] == 0.0 and rec["per_threshold"][1] == pytest.approx(2 * 12 / (12 + 17))
    few = board_reconstruction(acts[:, :], props, acts, props, min_firings=13)
    assert few["reconstruction"] == 0.0
    with pytest.raises(ValueError, match="same N"):
        coverage(acts[:3], props)


def test_probe_dictionary_ceiling_reads_a_linearly_encoded_board():
    """The ceiling check's probe dictionary scores ~1.0 when the board is linearly decodable, ~0 on noise."""
    from jaxinterp.experiments.sae_boardgame.ceiling import fit_probe, probe_latents

    cfg = othello.OthelloConfig(size=6)
    games = [othello.random_games(cfg, 30, seed=s, full_only=True) for s in (0, 1)]
    onehot = [othello.mine_theirs_empty(g).reshape(-1, cfg.n_squares * 3).astype(np.float32) for g in games]
    props = [othello.mine_theirs_blank_masked(g).reshape(-1, cfg.n_squares * 3) for g in games]
    cls = [o.reshape(len(o), cfg.n_squares, 3).argmax(-1) for o in onehot]
    rng = np.random.default_rng(0)
    proj = rng.normal(size=(cfg.n_squares * 3, 128)).astype(np.float32)
    x = [o @ proj + 0.01 * rng.normal(size=(len(o), 128)).astype(np.float32) for o in onehot]
    probe = fit_probe(x[0], cls[0], steps=300, lr=5e-2)
    a_tr, a_te = probe_latents(probe, x[0]), probe_latents(probe, x[1])
    assert a_te.shape == (len(x[1]), cfg.n_squares * 3)
    assert (a_te.reshape(len(x[1]), -1, 3).argmax(-1) == cls[1]).mean() > 0.99  # latents in board-state layout
    assert board_reconstruction(a_tr, props[0], a_te, props[1])["reconstruction"] > 0.97
    noise = [rng.normal(size=xi.shape).astype(np.float32) for xi in x]
    probe = fit_probe(noise[0], cls[0], steps=300, lr=5e-2)
    rec = board_reconstruction(probe_latents(probe, noise[0]), props[0], probe_latents(probe, noise[1]), props[1])
    assert rec["reconstruction"] < 0.05


def test_last_move_dictionary_matches_direct_count():
    """The last-move baseline labels 'square just played is theirs'; its F1 is that prediction's direct F1."""
    from jaxinterp.experiments.sae_boardgame.ceiling import last_move_latents, score_last_move

    cfg = othello.OthelloConfig(size=6)
    games = {"train": othello.random_games(cfg, 60, seed=0, full_only=True),
             "test": othello.random_games(cfg, 30, seed=1, full_only=True)}
    n_label = 60 * (cfg.n_moves - 1)
    got = score_last_move(games, cfg, n_label)
    def flat(g):
        return othello.mine_theirs_blank_masked(g)[:, :-1].reshape(-1, cfg.n_squares * 3) > 0, g.squares[:, :-1].reshape(-1)

    props_tr, sq_tr = flat(games["train"])
    labels = np.zeros((cfg.n_squares, props_tr.shape[1]), bool)
    for x in range(cfg.n_squares):  # plain loop: the properties true on >= 95% of the >= 10 positions where x was just played
        rows = props_tr[sq_tr == x]
        if len(rows) >= 10:
            labels[x] = rows.mean(0) >= 0.95
    props, sq = flat(games["test"])
    assert (last_move_latents(cfg, games["test"]).argmax(-1) == sq).all()
    assert labels[np.arange(cfg.n_squares), np.arange(cfg.n_squares) * 3 + 1].sum() > 20  # mostly "x is theirs"
    pred = labels[sq]  # [N, P]
    assert got["n_labelled"] == labels.any(1).sum()
    assert got["reconstruction"] == pytest.approx(2 * np.sum(pred & props) / (pred.sum() + props.sum()), rel=1e-6)
