"""Train any registered port on the facts world; resumable; exports a Hugging Face directory.

    jaxinterp train-lm --preset facts-gpt --set train.steps=2000 --out results/facts-gpt

(``jaxinterp train-lm`` = ``python -m jaxinterp.experiments.train_lm.main``; ``--config`` is an old
name of ``--preset``.) Writes under ``--out`` (default ``results/train_lm/<preset>/``): ``config.json``,
``ckpt/`` (orbax checkpoints of params, optimizer state, step = data
position, RNG key), ``metrics.jsonl``, ``results.json``, ``loss.png`` and ``export/`` (config.json
+ model.safetensors + tokenizer files + world.json, loadable by ``ji.load`` and transformers).
Re-running the same command after a kill resumes from the newest intact checkpoint and ends
with the same parameters, bit for bit, as an uninterrupted run; a rerun with another config is
refused naming the fields (only ``train.steps`` and the eval/save cadence may change, never to
fewer steps than the checkpoint holds), and so is a second process on the same ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxinterp import train as train_lib
from jaxinterp.checkpoint import OutputLock
from jaxinterp.experiments.common import experiment_main, pyplot, save_figure
from jaxinterp.experiments.data.facts_world import FactsWorld
from jaxinterp.experiments.train_lm.config import PRESETS, Config
from jaxinterp.experiments.train_lm.data import FactsBatches, answer_weights
from jaxinterp.experiments.train_lm.evaluate import evaluate_world
from jaxinterp.loading import load, resolve_source, save_pretrained
from jaxinterp.model import Model, get_family, init, run

__all__ = ["build_model", "load_initial", "decay_mask", "make_optimizer", "lm_loss", "make_train_step", "train", "export",
           "main"]


# model / optimiser ---------------------------------------------------------------------------
def build_model(cfg: Config, world: FactsWorld, key: jax.Array) -> Model:
    """A fresh model of ``cfg.model`` sized to the world's vocabulary and the data's context, or
    the weights of ``cfg.train.init_from`` (checked against ``cfg.model`` and the world)."""
    if cfg.train.init_from is not None:
        return load_initial(cfg, world)
    fam = get_family(cfg.model.family)
    fields = {f.name for f in dataclasses.fields(fam.config_cls)}
    args = {"vocab_size": world.vocab_size, **cfg.model.args}
    if "max_seq_len" in fields:
        args.setdefault("max_seq_len", cfg.data.seq_len)
    unknown = sorted(set(args) - fields)
    if unknown:
        raise ValueError(f"model.args {unknown} are not fields of {fam.config_cls.__name__}: {sorted(fields)}")
    return init(fam.config_cls(**args), key)


def load_initial(cfg: Config, world: FactsWorld) -> Model:
    """``ji.load(cfg.train.init_from)`` after checking family, ``model.args``, vocabulary and context."""
    src = cfg.train.init_from
    src_dir = resolve_source(src)  # resolved once: the weights and world.json come from the same directory
    model = load(src_dir)
    if model.family != cfg.model.family:
        raise ValueError(f"train.init_from={src!r} is a {model.family!r} model but model.family is "
                         f"{cfg.model.family!r}; pick a --config of family {model.family!r}")
    loaded = dataclasses.asdict(model.config)
    wanted = {"vocab_size": world.vocab_size, **cfg.model.args}
    clash = {k: (v, loaded[k]) for k, v in wanted.items() if k in loaded and loaded[k] != v}
    unknown = sorted(set(cfg.model.args) - set(loaded))
    if unknown:
        raise ValueError(f"model.args {unknown} are not fields of {type(model.config).__name__}: {sorted(loaded)}")
    if clash:
        raise ValueError(f"train.init_from={src!r} disagrees with the config (field: (config, loaded)): {clash}; "
                         f"the loaded architecture is used as is, so drop or fix these model.args / the world")
    world_json = src_dir / "world.json"
    if world_json.exists() and FactsWorld.from_dir(world_json.parent).facts != world.facts:
        raise ValueError(f"train.init_from={src!r} was trained on another facts world ({world_json}) than "
                         f"data.world; set data.world.seed / entities_per_domain to match it")
    max_len = loaded.get("max_seq_len")
    if max_len is not None and max_len < cfg.data.seq_len:
        raise ValueError(f"train.init_from={src!r} has max_seq_len {max_len} < data.seq_len {cfg.data.seq_len}")
    return model


def make_optimizer(cfg: Config) -> optax.GradientTransformation:
    o = cfg.check().optim
    schedule = optax.warmup_cosine_decay_schedule(0.0, o.lr, max(o.warmup_steps, 1), max(cfg.train.steps, 2),
                                                  end_value=o.lr * o.end_lr_frac)
    return optax.chain(optax.clip_by_global_norm(o.clip_norm),
                       optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=decay_mask))


NO_DECAY_NAMES = ("A_log", "D")  # Mamba's SSM parameters (reference Mamba: ``_no_weight_decay``)


def decay_mask(params) -> Any:
    """True for the leaves AdamW decays: matrices (``ndim >= 2`` per layer) except Mamba's ``A_log`` and ``D``.

    Norm scales and biases (1-D per layer) are never decayed; neither are ``A_log`` (decaying it
    pulls every ``A = -exp(A_log)`` toward -1 and erases the multi-timescale S4D init) or ``D`` (the
    skip). GPT-style trees have no such names, so their mask is the plain matrix one. Parameters
    under ``layers`` are stacked on a leading layer axis, which does not count.
    """
    def keep(path, p):
        name = str(getattr(path[-1], "key", path[-1])) if path else ""
        stacked = bool(path) and getattr(path[0], "key", None) == "layers"
        return p.ndim - stacked >= 2 and name not in NO_DECAY_NAMES

    return jax.tree_util.tree_map_with_path(keep, params)


def lm_loss(params, model: Model, tokens: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Next-token cross-entropy of ``tokens [B, T+1]``: the mean, or the ``weights [B, T]`` mean."""
    logits = run(model.replace(params=params), tokens[:, :-1]).logits  # [B, T, V]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens[:, 1:])  # [B, T]
    return ce.mean() if weights is None else (ce * weights).sum() / weights.sum()


def batch_loss(params, skeleton: Model, batch: dict, key) -> jax.Array:
    """``lm_loss`` of a ``{"tokens", "weights"}`` batch (the loop's ``loss_fn``; no randomness)."""
    return lm_loss(params, skeleton, batch["tokens"], batch["weights"])


def make_train_step(optimizer: optax.GradientTransformation, mesh: Mesh):
    """The jitted loop step: state replicated over ``mesh``, batches split over its ``data`` axis."""
    return train_lib.make_train_step(train_lib.loss_step(batch_loss, optimizer), NamedSharding(mesh, P()),
                                     NamedSharding(mesh, P("data")))


# state ----------------------------------------------------------------------------------------
def data_mesh() -> Mesh:
    """A 1-D ``data`` mesh over every device."""
    return Mesh(np.array(jax.devices()), ("data",))


def _check_batch(cfg: Config, mesh: Mesh) -> None:
    n = mesh.devices.size
    if cfg.data.batch_size % n:
        raise ValueError(f"data.batch_size ({cfg.data.batch_size}) must be divisible by the {n} devices of the "
                         f"data mesh")


# loop -------------------------------------------------------------------------------------------
RESUMABLE_FIELDS = ("train.steps", "train.eval_every", "train.save_every", "train.keep", "train.eval_prompts")


def train(cfg: Config, out: Path, *, progress: bool = True, log=print) -> tuple[Model, dict]:
    """Run (or resume) training in ``out`` (locked); returns the final model and the last evaluation.

    The loop state is ``{"params", "opt", "key"}`` (the key is carried for stochastic extensions
    such as dropout) plus the step, which is the data position. A resume may change only
    ``RESUMABLE_FIELDS``; anything else in ``cfg`` differing from the checkpoint's is refused.
    """
    world = FactsWorld(cfg.data.world)
    model = build_model(cfg, world, jax.random.PRNGKey(cfg.train.seed))
    mesh = data_mesh()
    _check_batch(cfg, mesh)
    optimizer = make_optimizer(cfg)
    state = jax.device_put(train_lib.init_state(model.params, optimizer, jax.random.key(cfg.train.seed + 1)),
                           NamedSharding(mesh, P()))
    data = FactsBatches(world, cfg.data.batch_size, cfg.data.seq_len, cfg.data.seed, cfg.data.without_domain)

    def batches(step: int) -> dict:
        tokens = data.batch(step)
        weights = answer_weights(world, tokens, cfg.data.answer_weight) if cfg.data.answer_weight != 1.0 else None
        return {"tokens": tokens, "weights": weights}

    last_eval: dict = {}

    def evaluate(step: int, state, metrics) -> dict:
        last_eval.update(evaluate_world(model.replace(params=state["params"]), world, cfg.train.eval_prompts, 128))
        row = {k: v for k, v in last_eval.items() if k != "per_relation"}
        log(f"step {step}: {row}")
        return {"eval": row}

    loop = train_lib.LoopConfig(steps=cfg.train.steps, save_every=cfg.train.save_every or cfg.train.steps,
                                keep=cfg.train.keep, log_every=10, desc=cfg.name, quiet=not progress)
    hooks = [train_lib.Hook(cfg.train.eval_every, evaluate)] if cfg.train.eval_every else []
    with OutputLock(out):
        state, _ = train_lib.fit(make_train_step(optimizer, mesh), state, batches, loop, directory=out / "ckpt",
                                 frozen=model.replace(params={}), run_config=cfg.to_dict(),
                                 may_change=RESUMABLE_FIELDS, hooks=hooks, metrics_path=out / "metrics.jsonl", log=log)
    return model.replace(params=jax.device_get(state["params"])), last_eval


def export(model: Model, world: FactsWorld, directory: Path) -> Path:
    """config.json + model.safetensors + tokenizer files + world.json (save_pretrained replaces the directory)."""
    with tempfile.TemporaryDirectory() as tok_dir:
        world.save_tokenizer(Path(tok_dir), model_max_length=getattr(model.config, "max_seq_len", 2048))
        save_pretrained(model, directory, tokenizer_dir=tok_dir)
    world.config.to_json(directory / "world.json")
    return directory


def _plot_loss(metrics_path: Path, title: str, png: Path) -> None:
    plt = pyplot()

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    pts = sorted({r["step"]: r["loss"] for r in rows if r.get("loss") is not None}.items())
    if not pts:
        return
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot([p[0] for p in pts], [p[1] for p in pts])
    ax.set_xlabel("step"), ax.set_ylabel("train loss (nats per token, log scale)"), ax.set_yscale("log")
    ax.set_title(f"{title}: next-token cross-entropy", fontsize=9)
    save_figure(fig, png)


# CLI ---------------------------------------------------------------------------------------------
def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", dest="preset", choices=sorted(PRESETS), default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)
    p.add_argument("--eval-prompts", type=int, default=None,
                   help="prompts per split in the final evaluation (default: all)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar (for log files)")


def train_and_export(cfg: Config, out: Path, *, eval_prompts: int | None = None, progress: bool = True) -> dict:
    """``train``, then export, evaluate and plot; returns the results."""
    log = lambda msg: print(msg, flush=True)
    t0 = time.perf_counter()
    model, _ = train(cfg, out, progress=progress, log=log)
    train_s = time.perf_counter() - t0
    world = FactsWorld(cfg.data.world)
    export(model, world, out / "export")
    evaluation = evaluate_world(model, world, eval_prompts)
    results = {"config": cfg.to_dict(), "train_seconds": train_s, "num_params": model.num_params(),
               "devices": len(jax.devices()), "eval": evaluation}
    if (out / "metrics.jsonl").exists():
        _plot_loss(out / "metrics.jsonl", cfg.name, out / "loss.png")
    log("first-token argmax accuracy on fact prompts (train templates / held-out paraphrases) and on "
        "counterfactual in-context passages (copy)")
    log(f"train {evaluation['train_acc']:.3f}  paraphrase {evaluation['paraphrase_acc']:.3f}  "
        f"copy {evaluation['copy_acc']:.3f}  ({train_s:.0f}s) -> {out / 'export'}")
    return results


main = experiment_main("train_lm", PRESETS, train_and_export, doc=__doc__, model_keys=("train.init_from",),
                       shortcuts={"--init-from": "train.init_from"}, add_arguments=_arguments)


if __name__ == "__main__":
    raise SystemExit(main())
