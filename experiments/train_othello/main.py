"""Train othello-gpt: a GPT-2-style next-move predictor on random legal Othello games.

    jaxinterp train-othello                  # = python -m jaxinterp.experiments.train_othello.main

(``--preset long`` is the default: the shipped model's config.) Writes to ``--out`` (default
``results/train_othello/<preset>/``) ``results.json``, ``config.json`` and ``export/``: the model as a
Hugging Face directory (config.json + model.safetensors) with a ``token_map.json`` (token ->
square name) and ``metrics.json`` (= ``results.json``, for the model card): legal-move accuracy
(the top-1 predicted move is legal) and a linear probe's board-state accuracy (mine /
theirs / empty per square) on held-out games, for the trained model and its
random-initialised twin (the control).

Training state (params, optimizer, step, RNG key) is checkpointed with orbax under
``--ckpt`` (default ``<out>/ckpt``) every ``--save-every`` steps; re-running the same
command after a kill resumes from the latest checkpoint and ends with the same parameters,
bit for bit, as an uninterrupted run (a checkpoint of a different config is refused).
Legal-move accuracy on 200 held-out games is logged every ``--eval-every`` steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxinterp as ji
from jaxinterp import train as train_lib
from jaxinterp.experiments.common import UsageError, experiment_main
from jaxinterp.experiments.data import othello
from jaxinterp.models.gpt2 import GPT2Config

from .config import TrainOthelloConfig

DEFAULT_PRESET = "long"  # the preset of the shipped models/embedded/othello-gpt (the first preset is the default)
PRESETS = {"long": TrainOthelloConfig.long, "medium": TrainOthelloConfig.medium, "small": TrainOthelloConfig.small,
           "tiny": TrainOthelloConfig.tiny, "standard8": TrainOthelloConfig.standard8}


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


@functools.lru_cache(maxsize=4)
def _train_step(cfg: TrainOthelloConfig):
    """The jitted loop step, one per config: ``batch_size`` games of ``data [G, n_moves]`` (the
    frozen argument, kept on device) drawn with the step's fresh split of the state's key."""

    def loss(model, data, _, key):
        return next_move_loss(model, data[jax.random.randint(key, (cfg.batch_size,), 0, data.shape[0])])

    return train_lib.make_train_step(train_lib.loss_step(loss, make_optimizer(cfg)))


def train(cfg: TrainOthelloConfig, tokens: np.ndarray, *, ckpt_dir: str | Path | None = None,
          save_every: int = 500, eval_every: int = 0, eval_fn=None, progress: bool = True, log=print):
    """Train (or resume) on ``tokens [G, n_moves]``; returns (model, metrics rows).

    With ``ckpt_dir`` (locked while training), the state (params, optimizer, RNG key) and step
    are saved there every ``save_every`` steps and at the end, and a re-run resumes from the
    newest intact checkpoint, ending bit-identical to an uninterrupted run; a checkpoint of a
    different config is refused (a longer ``steps`` continues the run). Batches are drawn
    on-device from a JAX key split once per step, so the key is the whole data-order state.
    Every ``eval_every`` steps ``eval_fn(model)`` (e.g. legal-move accuracy) is logged; the rows
    (``{"step", "loss", "grad_norm"}`` every 50 steps and at the last) are also in
    ``<ckpt_dir>/metrics.jsonl``.
    """
    model = ji.init(model_config(cfg), cfg.seed)
    state = train_lib.init_state(model, make_optimizer(cfg), jax.random.key(cfg.seed))
    t0 = time.time()

    def evaluate(step, state, metrics):
        log(f"step {step}/{cfg.steps}: loss {float(metrics['loss']):.4f}, {eval_fn(state['params'])}, "
            f"{time.time() - t0:.0f}s")

    hooks = [train_lib.Hook(eval_every, evaluate)] if eval_fn is not None and eval_every else []
    loop = train_lib.LoopConfig(steps=cfg.steps, save_every=max(save_every, 1), log_every=50, desc="othello-gpt",
                                quiet=not progress)
    state, rows = train_lib.fit(_train_step(cfg), state, None, loop, directory=ckpt_dir, frozen=jnp.asarray(tokens),
                                run_config=dataclasses.asdict(cfg), may_change=("steps",), hooks=hooks, log=log)
    return state["params"], rows


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


def _arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--ckpt", default=None, help="checkpoint directory (default: <out>/ckpt); re-running the same "
                    "command resumes from its latest checkpoint")
    ap.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps")
    ap.add_argument("--eval-every", type=int, default=500,
                    help="log legal-move accuracy on 200 held-out games every N steps (0: never)")
    ap.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar (for log files)")


def run(cfg: TrainOthelloConfig, out: Path, *, ckpt: str | None = None, save_every: int = 500, eval_every: int = 500,
        progress: bool = True) -> dict:
    """Generate the games, train (resumably), export to ``out/export`` and evaluate; returns the metrics."""
    if save_every < 1 or eval_every < 0:
        raise UsageError(f"--save-every must be >= 1 and --eval-every >= 0, got {save_every}, {eval_every}")
    board = othello.OthelloConfig(size=cfg.board_size)
    t0 = time.time()
    train_games = othello.random_games(board, cfg.n_train_games, seed=cfg.seed, full_only=True)
    eval_games = othello.random_games(board, cfg.n_eval_games, seed=cfg.seed + 10_000, full_only=True)
    print(f"generated {cfg.n_train_games + cfg.n_eval_games} games in {time.time() - t0:.1f}s")
    monitor = othello.Games(**{f.name: getattr(eval_games, f.name)[:200] for f in dataclasses.fields(othello.Games)})

    def eval_fn(model):  # progress check on 200 of the held-out games
        return f"legal-move acc {legal_move_accuracy(model, board, monitor):.4f}"

    model, losses = train(cfg, othello.square_to_token(board, train_games.squares),
                          ckpt_dir=Path(ckpt) if ckpt else out / "ckpt", save_every=save_every,
                          eval_every=eval_every, eval_fn=eval_fn, progress=progress,
                          log=lambda m: print(m, flush=True))
    ji.save_pretrained(model, out / "export")  # before evaluation, so a failed evaluation loses no training
    metrics = {"config": dataclasses.asdict(cfg), "final_loss": losses[-1]["loss"] if losses else None,
               "train_seconds": time.time() - t0,  # this process only (a resumed run counts from the resume)
               "trained": evaluate(model, cfg, eval_games),
               "random_init": evaluate(ji.init(model_config(cfg), cfg.seed + 1), cfg, eval_games)}
    write_model_dir(model, cfg, out / "export", metrics)
    print(f"legal-move accuracy: share of positions whose top-1 predicted move is legal; probe accuracy: a linear "
          f"probe's mine / theirs / empty accuracy per square (resid_post of layer {cfg.layer_for_probe}); "
          f"{cfg.n_eval_games} held-out games")
    for name in ("trained", "random_init"):
        m = metrics[name]
        print(f"{name:<12} legal-move accuracy {m['legal_move_accuracy']:.4f}  "
              f"probe accuracy {m['probe_accuracy']:.4f}")
    return metrics


main = experiment_main("train_othello", PRESETS, run, doc=__doc__, add_arguments=_arguments)


if __name__ == "__main__":
    raise SystemExit(main())
