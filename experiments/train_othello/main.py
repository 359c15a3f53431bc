"""Train othello-gpt: a GPT-2-style next-move predictor on random legal Othello games.

    python -m jaxinterp.experiments.train_othello.main --preset small --out models/embedded/othello-gpt

Writes the model as a Hugging Face directory (config.json + model.safetensors) with a
``token_map.json`` (token -> square name), and ``metrics.json``: legal-move accuracy
(the top-1 predicted move is legal) and a linear probe's board-state accuracy (mine /
theirs / empty per square) on held-out games, for the trained model and its
random-initialised twin (the control).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import jaxinterp as ji
from jaxinterp.experiments.data import othello
from jaxinterp.models.gpt2 import GPT2Config

from .config import TrainOthelloConfig

PRESETS = {"small": TrainOthelloConfig.small, "tiny": TrainOthelloConfig.tiny, "standard8": TrainOthelloConfig.standard8}


def model_config(cfg: TrainOthelloConfig) -> GPT2Config:
    board = othello.OthelloConfig(size=cfg.board_size)
    return GPT2Config(vocab_size=board.vocab_size, max_seq_len=board.n_moves - 1, d_model=cfg.d_model,
                      n_layers=cfg.n_layers, n_heads=cfg.n_heads, d_mlp=cfg.d_mlp)


def next_move_loss(model, tokens):
    """Mean cross-entropy of moves 2..n given the preceding moves. ``tokens [B, n_moves]``."""
    logits = model.run(tokens[:, :-1]).logits  # [B, T, V]
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def make_optimizer(cfg: TrainOthelloConfig):
    sched = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.lr * 0.1)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=cfg.weight_decay))


def train(cfg: TrainOthelloConfig, tokens: np.ndarray):
    """Train from scratch on ``tokens [G, n_moves]``; returns (model, losses)."""
    model = ji.init(model_config(cfg), cfg.seed)
    opt = make_optimizer(cfg)
    state = opt.init(model)

    @jax.jit
    def step(model, state, batch):
        loss, grads = jax.value_and_grad(next_move_loss)(model, batch)
        updates, state = opt.update(grads, state, model)
        return optax.apply_updates(model, updates), state, loss

    rng = np.random.default_rng(cfg.seed)
    losses = []
    for i in (bar := tqdm(range(cfg.steps), desc="othello-gpt")):
        batch = jnp.asarray(tokens[rng.integers(0, len(tokens), cfg.batch_size)])
        model, state, loss = step(model, state, batch)
        if i % 50 == 0 or i == cfg.steps - 1:
            losses.append((i, float(loss)))
            bar.set_postfix(loss=f"{losses[-1][1]:.4f}")
    return model, losses


def legal_move_accuracy(model, board: othello.OthelloConfig, games: othello.Games, batch: int = 256) -> float:
    """Fraction of positions whose top-1 predicted next move is legal."""
    tokens = othello.square_to_token(board, games.squares)
    legal = othello.legal_moves(board, games)[:, :-1]  # [G, T, S] legal after moves 0..T-1
    fwd = jax.jit(lambda m, t: m.run(t).logits)
    hits = []
    for i in range(0, len(tokens), batch):
        logits = np.array(fwd(model, jnp.asarray(tokens[i:i + batch, :-1])))
        logits[..., 0] = -np.inf  # never predict padding
        squares = othello.token_to_square(board, logits.argmax(-1))  # [b, T]
        hits.append(np.take_along_axis(legal[i:i + batch], squares[..., None], -1)[..., 0])
    return float(np.concatenate(hits).mean())


def residuals(model, tokens: np.ndarray, layer: int, batch: int = 256) -> np.ndarray:
    """``[G, T, D]`` resid_post of ``layer`` for ``tokens[:, :-1]``."""
    site = f"blocks.{layer}.resid_post"
    fwd = jax.jit(lambda m, t: m.run(t, capture=site).cache[site])
    return np.concatenate([np.asarray(fwd(model, jnp.asarray(tokens[i:i + batch, :-1])))
                           for i in range(0, len(tokens), batch)])


def fit_probe(x, y, steps: int = 500, lr: float = 1e-2) -> dict:
    """Per-square softmax probe (mine/theirs/empty) on standardised inputs, Adam from zeros.

    ``x [N, D]``, ``y [N, S]`` class ids in {0, 1, 2}; returns ``w``, ``b`` and the input ``mu``/``sd``.
    """
    x = jnp.asarray(x)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xs, ys = (x - mu) / sd, jnp.asarray(y)
    params = {"w": jnp.zeros((x.shape[1], ys.shape[1], 3)), "b": jnp.zeros((ys.shape[1], 3))}
    opt = optax.adam(lr)

    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(_probe_apply(p, xs), ys).mean()

    @jax.jit
    def step(p, st):
        up, st = opt.update(jax.grad(loss)(p), st)
        return optax.apply_updates(p, up), st

    st = opt.init(params)
    for _ in range(steps):
        params, st = step(params, st)
    return {**params, "mu": mu, "sd": sd}


def _probe_apply(p, xs):
    return jnp.einsum("nd,dsc->nsc", xs, p["w"]) + p["b"]  # [N, S, 3]


def probe_logits(probe: dict, x) -> jax.Array:
    """``[N, S, 3]`` logits of a ``fit_probe`` probe on raw inputs ``x [N, D]``."""
    return _probe_apply(probe, (jnp.asarray(x) - probe["mu"]) / probe["sd"])


def linear_probe_accuracy(feats: np.ndarray, states: np.ndarray, steps: int, seed: int = 0) -> float:
    """Train a linear mine/theirs/empty probe on half the games, return accuracy on the other half.

    ``feats [G, T, D]``, ``states [G, T, S, 3]`` one-hot.
    """
    g = feats.shape[0] // 2
    x_tr, x_te = (a.reshape(-1, a.shape[-1]) for a in (feats[:g], feats[g:]))
    y_tr, y_te = (a.reshape(-1, *a.shape[2:]).argmax(-1) for a in (states[:g], states[g:]))
    probe = fit_probe(x_tr, y_tr, steps)
    return float((probe_logits(probe, x_te).argmax(-1) == jnp.asarray(y_te)).mean())


def evaluate(model, cfg: TrainOthelloConfig, games: othello.Games) -> dict:
    board = othello.OthelloConfig(size=cfg.board_size)
    tokens = othello.square_to_token(board, games.squares)
    states = othello.mine_theirs_empty(games)[:, :-1]  # state after each input move
    feats = residuals(model, tokens, cfg.layer_for_probe)
    return {
        "legal_move_accuracy": legal_move_accuracy(model, board, games),
        "probe_layer": cfg.layer_for_probe,
        "probe_accuracy": linear_probe_accuracy(feats, states, cfg.probe_steps),
    }


def write_model_dir(model, cfg: TrainOthelloConfig, out: Path, metrics: dict) -> None:
    board = othello.OthelloConfig(size=cfg.board_size)
    ji.save_pretrained(model, out)
    squares = othello.token_to_square(board, np.arange(board.vocab_size))
    token_map = {"board_size": board.size, "pad_token": 0,
                 "tokens": {str(t): (othello.square_name(board, int(s)) if s >= 0 else "<pad>")
                            for t, s in enumerate(squares)}}
    (out / "token_map.json").write_text(json.dumps(token_map, indent=1))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--out", default="results/othello-gpt")
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config fields")
    args = ap.parse_args(argv)
    overrides = {}
    fields = {f.name: f.type for f in dataclasses.fields(TrainOthelloConfig)}
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in fields:
            raise SystemExit(f"unknown config field {key!r}; fields: {sorted(fields)}")
        overrides[key] = type(getattr(TrainOthelloConfig(), key))(value)
    cfg = PRESETS[args.preset](**overrides)
    board = othello.OthelloConfig(size=cfg.board_size)
    t0 = time.time()
    train_games = othello.random_games(board, cfg.n_train_games, seed=cfg.seed, full_only=True)
    eval_games = othello.random_games(board, cfg.n_eval_games, seed=cfg.seed + 10_000, full_only=True)
    print(f"generated {cfg.n_train_games + cfg.n_eval_games} games in {time.time() - t0:.1f}s")
    model, losses = train(cfg, othello.square_to_token(board, train_games.squares))
    out = Path(args.out)
    ji.save_pretrained(model, out)  # before evaluation, so a failed evaluation loses no training
    metrics = {"config": dataclasses.asdict(cfg), "final_loss": losses[-1][1], "train_seconds": time.time() - t0,
               "trained": evaluate(model, cfg, eval_games),
               "random_init": evaluate(ji.init(model_config(cfg), cfg.seed + 1), cfg, eval_games)}
    write_model_dir(model, cfg, out, metrics)
    print(json.dumps({k: v for k, v in metrics.items() if k != "config"}, indent=1))
    return metrics


if __name__ == "__main__":
    main()
