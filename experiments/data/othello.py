"""Othello: a vectorised rules engine (numpy), random legal games, and board-state functions.

Boards are ``int8`` arrays ``[G, S]`` (``S = size * size`` squares, row-major) holding
``+1`` black, ``-1`` white, ``0`` empty; black moves first. Every operation runs on a
batch of ``G`` games at once: the rays from each square in the eight directions are
precomputed, so legality and flipping are gathers and cumulative products, not loops
over squares.

Tokens: the ``S - 4`` squares that are not occupied at the start are numbered
``1 .. S - 4`` in row-major order; ``0`` is padding. A game is the sequence of moves
actually played; passes are implicit (the player with no legal move is skipped), so the
player to move is recomputed from the rules, never from the move's parity.

Board-state functions (Karvonen et al. 2024) describe the position *after* each move,
relative to the player who moves next:

* ``mine_theirs_empty``: ``[G, T, S, 3]`` one-hot (mine, theirs, empty),
* ``mine_theirs_blank_masked``: the same with the "empty" channel zeroed,
* ``legal_moves``: ``[G, T, S]`` squares where the next player may move.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

__all__ = [
    "OthelloConfig",
    "Games",
    "initial_boards",
    "legal_mask",
    "play",
    "random_games",
    "replay",
    "mine_theirs_empty",
    "mine_theirs_blank_masked",
    "legal_moves",
    "square_to_token",
    "token_to_square",
    "square_name",
    "batches",
]

_DIRECTIONS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
BLACK, WHITE, EMPTY = 1, -1, 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class OthelloConfig:
    """Board geometry. ``size`` must be even and >= 4 (8 is standard, 6 runs fast on CPU)."""

    size: int = 8

    def __post_init__(self):
        if self.size < 4 or self.size % 2:
            raise ValueError(f"OthelloConfig.size must be an even integer >= 4, got {self.size}")

    @classmethod
    def standard(cls) -> "OthelloConfig":
        return cls(size=8)

    @classmethod
    def small(cls) -> "OthelloConfig":
        return cls(size=6)

    @property
    def n_squares(self) -> int:
        return self.size * self.size

    @property
    def n_moves(self) -> int:
        """Moves in a game that fills the board."""
        return self.n_squares - 4

    @property
    def vocab_size(self) -> int:
        """Playable squares plus the padding token 0."""
        return self.n_moves + 1

    @property
    def center(self) -> tuple[int, ...]:
        h = self.size // 2
        return ((h - 1) * self.size + h - 1, (h - 1) * self.size + h, h * self.size + h - 1, h * self.size + h)



def _shift(a: np.ndarray, dr: int, dc: int) -> np.ndarray:
    """Move every cell of ``[G, N, N]`` by ``(dr, dc)``; cells pushed off the board vanish."""
    n = a.shape[-1]
    out = np.zeros_like(a)
    rs, rd = (slice(0, n - dr), slice(dr, n)) if dr >= 0 else (slice(-dr, n), slice(0, n + dr))
    cs, cd = (slice(0, n - dc), slice(dc, n)) if dc >= 0 else (slice(-dc, n), slice(0, n + dc))
    out[:, rd, cd] = a[:, rs, cs]
    return out


def initial_boards(cfg: OthelloConfig, n_games: int) -> np.ndarray:
    """``[G, S]`` starting position (white on the main-diagonal centre squares)."""
    board = np.zeros((n_games, cfg.n_squares), np.int8)
    a, b, c, d = cfg.center
    board[:, [a, d]] = WHITE
    board[:, [b, c]] = BLACK
    return board


def _grids(cfg: OthelloConfig, board: np.ndarray, player: np.ndarray):
    """``(mine, theirs, empty)`` bool ``[G, N, N]`` for ``player`` (``[G]`` of +-1)."""
    b = board.reshape(-1, cfg.size, cfg.size)
    p = player.astype(np.int8)[:, None, None]
    return b == p, b == -p, b == EMPTY


def legal_mask(cfg: OthelloConfig, board: np.ndarray, player: np.ndarray) -> np.ndarray:
    """``[G, S]`` bool: empty squares where ``player`` (``[G]`` of +-1) flips at least one stone."""
    mine, theirs, empty = _grids(cfg, board, player)
    legal = np.zeros_like(mine)
    for dr, dc in _DIRECTIONS:
        run = _shift(mine, dr, dc) & theirs  # opponent stones adjacent to mine along (dr, dc)
        for _ in range(cfg.size - 3):
            run |= _shift(run, dr, dc) & theirs
        legal |= _shift(run, dr, dc) & empty
    return legal.reshape(board.shape[0], -1)


def _flips(cfg: OthelloConfig, board: np.ndarray, player: np.ndarray, square: np.ndarray) -> np.ndarray:
    """``[G, N, N]`` bool: stones flipped by ``player`` moving at ``square`` (``[G]``)."""
    mine, theirs, _ = _grids(cfg, board, player)
    g = board.shape[0]
    move = np.zeros(g * cfg.n_squares, bool)
    move[np.arange(g) * cfg.n_squares + square] = True
    move = move.reshape(g, cfg.size, cfg.size)
    flips = np.zeros_like(mine)
    for dr, dc in _DIRECTIONS:
        x, line, closed = _shift(move, dr, dc), np.zeros_like(mine), np.zeros(g, bool)
        for k in range(cfg.size - 1):
            closed |= (x & mine).any((1, 2)) & (k > 0)  # reached an own stone after >= 1 opponent
            x = x & theirs
            line |= x
            x = _shift(x, dr, dc)
        flips |= line & closed[:, None, None]
    return flips


def play(cfg: OthelloConfig, board: np.ndarray, player: np.ndarray, square: np.ndarray) -> np.ndarray:
    """Place ``player``'s stone at ``square`` (``[G]``; ``-1`` leaves that game unchanged) and flip.

    Raises ``ValueError`` on an illegal move.
    """
    board = board.copy()
    g = np.nonzero(square >= 0)[0]
    if g.size == 0:
        return board
    sq, pl = square[g], player[g]
    flips = _flips(cfg, board[g], pl, sq).reshape(g.size, -1)  # [g, S]
    bad = (board[g, sq] != EMPTY) | ~flips.any(-1)
    if bad.any():
        i = int(np.nonzero(bad)[0][0])
        raise ValueError(f"illegal move {square_name(cfg, int(sq[i]))} in game {int(g[i])}")
    sub = np.where(flips, pl[:, None], board[g])
    sub[np.arange(g.size), sq] = pl
    board[g] = sub
    return board


def _next_player(cfg: OthelloConfig, board: np.ndarray, mover: np.ndarray) -> np.ndarray:
    """Who moves after ``mover`` just moved: the opponent unless they must pass. ``[G]``."""
    opp = -mover
    return np.where(legal_mask(cfg, board, opp).any(-1), opp, mover).astype(np.int8)


@dataclasses.dataclass(frozen=True)
class Games:
    """A batch of games: ``squares [G, L]`` (-1 padded), ``lengths [G]``, and the positions they visit.

    ``boards [G, L, S]`` is the board after each move and ``to_move [G, L]`` the player who
    moves next (after a pass this is the player who just moved; 0 once the game is over).
    """

    squares: np.ndarray
    lengths: np.ndarray
    boards: np.ndarray
    to_move: np.ndarray


def replay(cfg: OthelloConfig, squares: np.ndarray) -> Games:
    """Replay move sequences ``[G, L]`` of square indices (``-1`` = game over), checking legality."""
    squares = np.asarray(squares, np.int64)
    n, length = squares.shape
    board = initial_boards(cfg, n)
    player = np.full(n, BLACK, np.int8)
    boards = np.zeros((n, length, cfg.n_squares), np.int8)
    to_move = np.zeros((n, length), np.int8)
    for t in range(length):
        sq = squares[:, t]
        board = play(cfg, board, player, sq)
        live = sq >= 0
        player = np.where(live, _next_player(cfg, board, player), player)
        over = ~legal_mask(cfg, board, player).any(-1)
        boards[:, t] = board
        to_move[:, t] = np.where(over, 0, player)
    lengths = (squares >= 0).sum(1)
    return Games(squares=squares, lengths=lengths, boards=boards, to_move=to_move)


def random_games(cfg: OthelloConfig, n_games: int, seed: int = 0, full_only: bool = False) -> Games:
    """``n_games`` random legal games (uniform over legal moves; passes handled).

    ``full_only`` keeps only games that fill the board (drawing extra games as needed).
    """
    rng = np.random.default_rng(seed)
    out: list[np.ndarray] = []
    have = 0
    while have < n_games:
        sq = _random_batch(cfg, max(n_games - have, 16) * (2 if full_only else 1), rng)
        if full_only:
            sq = sq[(sq >= 0).sum(1) == cfg.n_moves]
        out.append(sq)
        have += len(sq)
    return replay(cfg, np.concatenate(out)[:n_games])


def _random_batch(cfg: OthelloConfig, n: int, rng: np.random.Generator) -> np.ndarray:
    board = initial_boards(cfg, n)
    player = np.full(n, BLACK, np.int8)
    squares = np.full((n, cfg.n_moves), -1, np.int64)
    for t in range(cfg.n_moves):
        legal = legal_mask(cfg, board, player)  # [G, S]
        live = legal.any(-1)
        if not live.any():
            break
        scores = np.where(legal, rng.random(legal.shape), -1.0)
        sq = np.where(live, scores.argmax(-1), -1)
        board = play(cfg, board, player, sq)
        player = np.where(live, _next_player(cfg, board, player), player)
        squares[:, t] = sq
    return squares


# ----------------------------------------------------------------------------- tokens


def _playable(cfg: OthelloConfig) -> np.ndarray:
    return np.setdiff1d(np.arange(cfg.n_squares), np.asarray(cfg.center))


def square_to_token(cfg: OthelloConfig, squares: np.ndarray) -> np.ndarray:
    """Square indices (``-1`` = none) -> tokens ``1..S-4`` (``0`` = padding)."""
    lut = np.zeros(cfg.n_squares + 1, np.int32)
    lut[_playable(cfg)] = np.arange(1, cfg.n_moves + 1)
    squares = np.asarray(squares)
    if np.isin(squares, np.asarray(cfg.center)).any():
        raise ValueError(f"centre squares {cfg.center} are never played and have no token")
    return lut[np.where(squares < 0, cfg.n_squares, squares)]


def token_to_square(cfg: OthelloConfig, tokens: np.ndarray) -> np.ndarray:
    """Inverse of ``square_to_token`` (padding -> ``-1``)."""
    tokens = np.asarray(tokens)
    if tokens.min(initial=0) < 0 or tokens.max(initial=0) > cfg.n_moves:
        raise ValueError(f"Othello tokens lie in [0, {cfg.n_moves}], got {tokens.min()}..{tokens.max()}")
    lut = np.concatenate([[-1], _playable(cfg)])
    return lut[tokens]


def square_name(cfg: OthelloConfig, square: int) -> str:
    """``"c4"``-style name (column letter, 1-based row)."""
    return f"{'abcdefghijklmnop'[square % cfg.size]}{square // cfg.size + 1}"


# ----------------------------------------------------------------------------- board states


def mine_theirs_empty(games: Games) -> np.ndarray:
    """``[G, L, S, 3]`` float32 one-hot (mine, theirs, empty) after each move, relative to the player to move.

    After the last move (nobody to move) "mine" is the player who would have moved by
    alternation, i.e. the opponent of the last mover.
    """
    boards = games.boards.astype(np.int8)  # [G, L, S]
    me = games.to_move.astype(np.int8)
    last_mover = _movers(games)
    me = np.where(me == 0, -last_mover, me)[..., None]  # [G, L, 1]
    return np.stack([boards == me, boards == -me, boards == EMPTY], axis=-1).astype(np.float32)


def mine_theirs_blank_masked(games: Games) -> np.ndarray:
    """``mine_theirs_empty`` with the empty channel zeroed."""
    out = mine_theirs_empty(games)
    out[..., 2] = 0.0
    return out


def legal_moves(cfg: OthelloConfig, games: Games) -> np.ndarray:
    """``[G, L, S]`` float32: legal squares for the player to move after each move (0 when over)."""
    g, length, s = games.boards.shape
    flat_b = games.boards.reshape(g * length, s)
    flat_p = games.to_move.reshape(-1)
    legal = legal_mask(cfg, flat_b, np.where(flat_p == 0, 1, flat_p)) & (flat_p != 0)[:, None]
    return legal.reshape(g, length, s).astype(np.float32)


def _movers(games: Games) -> np.ndarray:
    """``[G, L]`` the colour of the stone placed by each move."""
    idx = np.maximum(games.squares, 0)[..., None]
    return np.take_along_axis(games.boards, idx, axis=-1)[..., 0]


# ----------------------------------------------------------------------------- batches


def batches(cfg: OthelloConfig, batch_size: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Endless ``[B, n_moves]`` int32 token batches of fresh full-length random games."""
    step = 0
    while True:
        games = random_games(cfg, batch_size, seed=seed * 1_000_003 + step, full_only=True)
        yield square_to_token(cfg, games.squares)
        step += 1
