"""Othello engine vs a plain square-by-square reference and a hand-checked position."""

import numpy as np
import pytest

from jaxinterp.experiments.data import othello as o

DIRS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def ref_flips(board, n, player, sq):
    """Plain loop over directions: the stones a move at ``sq`` flips (empty list if none)."""
    r0, c0 = divmod(sq, n)
    out = []
    for dr, dc in DIRS:
        line, r, c = [], r0 + dr, c0 + dc
        while 0 <= r < n and 0 <= c < n and board[r * n + c] == -player:
            line.append(r * n + c)
            r, c = r + dr, c + dc
        if line and 0 <= r < n and 0 <= c < n and board[r * n + c] == player:
            out += line
    return out


def ref_game(n, squares):
    board = np.zeros(n * n, int)
    h = n // 2
    board[[(h - 1) * n + h - 1, h * n + h]] = -1
    board[[(h - 1) * n + h, h * n + h - 1]] = 1
    player, boards, to_move = 1, [], []
    legal = lambda b, p: [s for s in range(n * n) if b[s] == 0 and ref_flips(b, n, p, s)]
    for sq in squares:
        if sq < 0:
            break
        assert sq in legal(board, player)
        for f in ref_flips(board, n, player, sq):
            board[f] = player
        board[sq] = player
        nxt = -player if legal(board, -player) else player
        player = nxt if legal(board, nxt) else 0
        boards.append(board.copy())
        to_move.append(player)
        if player == 0:
            break
    return np.array(boards), np.array(to_move)


@pytest.mark.parametrize("size", [6, 8])
def test_engine_matches_reference(size):
    cfg = o.OthelloConfig(size=size)
    games = o.random_games(cfg, 24, seed=size)
    assert (games.lengths > 0).all()
    for g in range(len(games.lengths)):
        boards, to_move = ref_game(size, games.squares[g])
        n = games.lengths[g]
        assert len(boards) == n
        np.testing.assert_array_equal(games.boards[g, :n], boards)
        np.testing.assert_array_equal(games.to_move[g, :n], to_move)
        # legal moves after each position == reference enumeration
        legal = o.legal_moves(cfg, games)[g, :n]
        for t in range(0, n, 5):
            p = to_move[t]
            want = np.zeros(size * size)
            if p:
                want[[s for s in range(size * size) if boards[t][s] == 0 and ref_flips(boards[t], size, p, s)]] = 1
            np.testing.assert_array_equal(legal[t], want)


def test_passes_occur_and_are_handled():
    cfg = o.OthelloConfig(size=6)
    games = o.random_games(cfg, 300, seed=3)
    movers = o._movers(games)
    live = games.squares[:, 1:] >= 0
    assert ((movers[:, 1:] == movers[:, :-1]) & live).sum() > 0  # some player moved twice in a row
    # every recorded move was legal for the recorded mover (replay re-checks legality)
    o.replay(cfg, games.squares)


def test_hand_checked_position():
    cfg = o.OthelloConfig(size=8)
    sq = lambda name: (int(name[1]) - 1) * 8 + "abcdefgh".index(name[0])
    # Black d3 (flips d4), white c3 (flips d4 back), black c4 (flips d4? no: c4->d4 white, e4 black => flips d4)
    games = o.replay(cfg, np.array([[sq("d3"), sq("c3"), sq("c4")]]))
    b = games.boards[0, -1].reshape(8, 8)
    black = {"d3", "c4", "d4", "e4", "d5", "e5"} - {"e5"}
    white = {"c3", "e5"}
    for r in range(8):
        for c in range(8):
            name = "abcdefgh"[c] + str(r + 1)
            want = 1 if name in black else -1 if name in white else 0
            assert b[r, c] == want, name
    # after black's 2nd move, white moves: "mine" = white
    mte = o.mine_theirs_empty(games)[0, -1].reshape(8, 8, 3)
    assert mte[2, 2, 0] == 1 and mte[4, 4, 0] == 1  # c3, e5 are white = mine
    assert mte[3, 3, 1] == 1 and mte[0, 0, 2] == 1
    masked = o.mine_theirs_blank_masked(games)
    assert masked[..., 2].sum() == 0 and (masked[..., :2] == o.mine_theirs_empty(games)[..., :2]).all()
    with pytest.raises(ValueError, match="illegal move a1"):
        o.replay(cfg, np.array([[0]]))


def test_tokens_roundtrip_and_errors():
    cfg = o.OthelloConfig(size=6)
    games = o.random_games(cfg, 8, seed=0, full_only=True)
    assert (games.lengths == cfg.n_moves).all()
    tok = o.square_to_token(cfg, games.squares)
    assert tok.min() == 1 and tok.max() <= cfg.n_moves
    np.testing.assert_array_equal(o.token_to_square(cfg, tok), games.squares)
    with pytest.raises(ValueError, match="even integer"):
        o.OthelloConfig(size=5)
    with pytest.raises(ValueError, match="tokens lie in"):
        o.token_to_square(cfg, np.array([cfg.n_moves + 1]))


def test_embedded_othello_gpt_predicts_legal_moves():
    import jaxinterp as ji
    from jaxinterp.experiments.train_othello.main import legal_move_accuracy

    model = ji.load("othello-gpt")
    cfg = o.OthelloConfig(size=6)
    assert model.config.vocab_size == cfg.vocab_size and model.config.max_seq_len == cfg.n_moves - 1
    games = o.random_games(cfg, 40, seed=12345, full_only=True)
    assert legal_move_accuracy(model, cfg, games) > 0.9  # model card: 0.956 on 2,000 games
    control = ji.init(model.config, 1)
    assert legal_move_accuracy(control, cfg, games) < 0.3


def test_default_preset_is_the_shipped_models_config():
    """``train_othello.main`` with no ``--preset`` retrains the shipped model (same config, field for field)."""
    import dataclasses
    import json

    from jaxinterp.experiments.train_othello.main import DEFAULT_PRESET, PRESETS
    from jaxinterp.loading import embedded_dir

    shipped = json.loads((embedded_dir("othello-gpt") / "metrics.json").read_text())["config"]
    assert dataclasses.asdict(PRESETS[DEFAULT_PRESET]()) == shipped


def test_train_resumes_bit_identical(tmp_path):
    """A run killed mid-training and re-run resumes from its checkpoint and ends with the same params."""
    import jax

    from jaxinterp.experiments.train_othello.config import TrainOthelloConfig
    from jaxinterp.experiments.train_othello.main import train

    cfg = TrainOthelloConfig.tiny(steps=12, warmup_steps=3)
    board = o.OthelloConfig(size=cfg.board_size)
    tokens = o.square_to_token(board, o.random_games(board, 64, seed=0, full_only=True).squares)
    full, _ = train(cfg, tokens, progress=False)

    class Killed(Exception):
        pass

    def kill_at_8(model):
        raise Killed

    with pytest.raises(Killed):  # evaluated at step 8, after the step-4 save and before the step-8 one
        train(cfg, tokens, ckpt_dir=tmp_path, save_every=4, eval_every=8, eval_fn=kill_at_8, progress=False)
    logs = []
    resumed, _ = train(cfg, tokens, ckpt_dir=tmp_path, save_every=4, progress=False, log=logs.append)
    assert logs and "resumed from step 4" in logs[0]
    for a, b in zip(jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the checkpoint is from a different run's config: a clear error naming the field, not a silent mix
    with pytest.raises(ValueError, match=r"different config \(lr: 0\.002 -> 0\.001\)"):
        train(TrainOthelloConfig.tiny(steps=12, warmup_steps=3, lr=1e-3), tokens, ckpt_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="checkpoint at step 12, past the 10 steps asked for"):  # never the longer run
        train(TrainOthelloConfig.tiny(steps=10, warmup_steps=3), tokens, ckpt_dir=tmp_path, progress=False)
