"""Train any registered port on the facts world; resumable; exports a Hugging Face directory.

    jaxinterp train-lm --preset facts-gpt --set train.steps=2000 --out results/facts-gpt

(``jaxinterp train-lm`` = ``python -m jaxinterp.experiments.train_lm.main``; ``--config`` is an old
name of ``--preset``.) Writes under ``--out`` (default ``results/train_lm/<preset>/``): ``config.json``,
``ckpt/`` (orbax checkpoints of params, optimizer state, step = data
position, RNG key), ``metrics.jsonl``, ``results.json``, ``loss.png`` and ``export/`` (config.json
+ model.safetensors + tokenizer files + world.json, loadable by ``ji.load`` and transformers).
Re-running the same command after a kill resumes from the latest checkpoint and ends with the
same parameters, bit for bit, as an uninterrupted run.
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
from tqdm import tqdm

from jaxinterp.checkpoint import Checkpointer
from jaxinterp.experiments.common import experiment_main, pyplot, save_figure
from jaxinterp.experiments.data.facts_world import FactsWorld
from jaxinterp.experiments.train_lm.config import PRESETS, Config
from jaxinterp.experiments.train_lm.data import FactsBatches, answer_weights
from jaxinterp.experiments.train_lm.evaluate import evaluate_world
from jaxinterp.loading import load, resolve_source, save_pretrained
from jaxinterp.model import Model, get_family, init, run

__all__ = ["build_model", "load_initial", "decay_mask", "make_optimizer", "make_train_step", "train", "export", "main"]


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


def make_train_step(model: Model, optimizer: optax.GradientTransformation):
    """jit(params, opt_state, tokens, weights=None) -> (params, opt_state, loss); batch sharding
    comes from the input."""

    skeleton = model.replace(params={})  # config only: the parameters are jit arguments, not constants

    def step(params, opt_state, tokens, weights=None):
        loss, grads = jax.value_and_grad(lm_loss)(params, skeleton, tokens, weights)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


# state ----------------------------------------------------------------------------------------
def data_mesh() -> Mesh:
    """A 1-D ``data`` mesh over every device."""
    return Mesh(np.array(jax.devices()), ("data",))


def initial_state(cfg: Config, model: Model, optimizer, mesh: Mesh) -> dict:
    replicated = NamedSharding(mesh, P())
    params = jax.device_put(model.params, replicated)
    opt_state = jax.device_put(optimizer.init(params), replicated)
    return {"params": params, "opt": opt_state, "step": 0,
            "key": jax.random.key(cfg.train.seed + 1)}  # carried for stochastic extensions (dropout)


def _check_batch(cfg: Config, mesh: Mesh) -> None:
    n = mesh.devices.size
    if cfg.data.batch_size % n:
        raise ValueError(f"data.batch_size ({cfg.data.batch_size}) must be divisible by the {n} devices of the "
                         f"data mesh")


# loop -------------------------------------------------------------------------------------------
def train(cfg: Config, out: Path, *, progress: bool = True, log=print) -> tuple[Model, dict]:
    """Run (or resume) training; returns the final model and the last evaluation."""
    out.mkdir(parents=True, exist_ok=True)
    world = FactsWorld(cfg.data.world)
    model = build_model(cfg, world, jax.random.PRNGKey(cfg.train.seed))
    mesh = data_mesh()
    _check_batch(cfg, mesh)
    optimizer = make_optimizer(cfg)
    state = initial_state(cfg, model, optimizer, mesh)
    ckpt = Checkpointer(out / "ckpt", keep=cfg.train.keep, save_every=max(cfg.train.save_every, 1))
    if ckpt.latest_step() is not None:
        state = ckpt.restore(template=state)
        log(f"resumed from step {state['step']}")
    data = FactsBatches(world, cfg.data.batch_size, cfg.data.seq_len, cfg.data.seed)
    batch_sharding = NamedSharding(mesh, P("data"))
    step_fn = make_train_step(model, optimizer)
    metrics_path = out / "metrics.jsonl"
    last_eval: dict = {}
    bar = tqdm(range(state["step"], cfg.train.steps), initial=state["step"], total=cfg.train.steps,
               disable=not progress, desc=cfg.name)
    for step in bar:
        batch = data.batch(step)
        weights = None
        if cfg.data.answer_weight != 1.0:
            weights = jax.device_put(answer_weights(world, batch, cfg.data.answer_weight), batch_sharding)
        tokens = jax.device_put(batch, batch_sharding)
        state["params"], state["opt"], loss = step_fn(state["params"], state["opt"], tokens, weights)
        state["key"], _ = jax.random.split(state["key"])
        state["step"] = step + 1
        record = {"step": step + 1, "loss": None}
        if (step + 1) % 10 == 0 or step + 1 == cfg.train.steps:
            record["loss"] = float(loss)
            bar.set_postfix(loss=f"{record['loss']:.3f}")
        if cfg.train.eval_every and (step + 1) % cfg.train.eval_every == 0:
            last_eval = evaluate_world(model.replace(params=state["params"]), world, cfg.train.eval_prompts, 128)
            record["eval"] = {k: v for k, v in last_eval.items() if k != "per_relation"}
            log(f"step {step + 1}: {record['eval']}")
        if record["loss"] is not None or "eval" in record:
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if cfg.train.save_every and (step + 1) % cfg.train.save_every == 0 and ckpt.save(step + 1, state):
            log(f"saved checkpoint step {step + 1}")
    ckpt.save(state["step"], state, force=True)
    ckpt.close()
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
