"""Linear relational embeddings (LRE) of every facts-world relation at every layer, facts-gpt vs
facts-mamba: faithfulness (the LRE's top token = the model's) and causality (the LRE-inverse edit of
the subject state flips the model's answer to a target subject's object), with baselines.

    jaxinterp lre                                       # results/lre/default/
    jaxinterp lre --preset smoke --out /tmp/lre         # two relations, seconds
    jaxinterp lre --set models=facts-gpt relations=lives_in,color n=12

(``jaxinterp lre`` = ``python -m jaxinterp.experiments.lre.main``.) Writes ``results.json``,
``config.json`` and ``lre.png`` (faithfulness and causality per relation and layer, per model).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from jaxinterp.experiments.common import UsageError, check_model, experiment_main, pyplot, save_figure
from jaxinterp.experiments.data.facts_world import load_world_model
from jaxinterp.readout import lre

from .config import LREConfig

PRESETS = {"default": LREConfig.default, "smoke": LREConfig.smoke}


class Batch(NamedTuple):
    tokens: np.ndarray   # [N, T] left-padded prompts
    mask: np.ndarray     # [N, T]
    pos: np.ndarray      # [N] the subject's last token
    answers: np.ndarray  # [N] the world's object token

    def rows(self, sl: slice) -> "Batch":
        return Batch(*(a[sl] for a in self))


# ----------------------------------------------------------------------------- data


def relation_prompts(world, relation: str, cfg: LREConfig) -> list:
    """Every subject of ``relation`` under train template ``cfg.template``, in a seeded order."""
    n_templates = len(world.relation(relation).templates)
    if cfg.template >= n_templates:
        raise UsageError(f"template must be in [0, {n_templates}) for {relation}, got {cfg.template}")
    items = [world.prompt(e.name, relation, cfg.template) for e in world.entities if relation in e.attributes]
    order = np.random.default_rng([cfg.seed, len(relation)]).permutation(len(items))
    return [items[i] for i in order]


def left_pad(items: list, length: int, pad_id: int) -> Batch:
    tokens = np.full((len(items), length), pad_id, np.int32)
    mask = np.zeros(tokens.shape, bool)
    pos = np.zeros(len(items), np.int32)
    for row, item in enumerate(items):
        start = length - len(item.ids)
        tokens[row, start:], mask[row, start:] = item.ids, True
        pos[row] = start + item.subject_span[1] - 1
    return Batch(tokens, mask, pos, np.array([item.answer_id for item in items], np.int32))


def check_relations(world, cfg: LREConfig) -> tuple[str, ...]:
    names = [r.name for r in world.relations]
    unknown = [r for r in cfg.relations if r not in names]
    if unknown:
        raise UsageError(f"unknown relations {unknown}; relations: {', '.join(names)}")
    return cfg.relations or tuple(names)


def targets_of(pred: np.ndarray) -> np.ndarray:
    """For each row, the next row (cyclically) whose prediction differs; -1 when every row agrees."""
    n = len(pred)
    out = np.full(n, -1)
    for i in range(n):
        other = [j % n for j in range(i + 1, i + n) if pred[j % n] != pred[i]]
        out[i] = other[0] if other else -1
    return out


# ----------------------------------------------------------------------------- scores


def score_split(model, op: lre.LRE, batch: Batch, cfg: LREConfig, translation: lre.LRE) -> dict:
    """Faithfulness per beta, causality per rank and the baselines on one split of a relation."""
    st = lre.states(model, batch.tokens, batch.pos, layer=op.layer, attention_mask=batch.mask)
    pred = np.asarray(jnp.argmax(st.logits, -1))
    faith = {b: float(np.mean(lre.faithfulness(model, op.with_beta(b), batch.tokens, batch.pos,
                                               precomputed=st))) for b in cfg.betas}
    out = {"model_accuracy": float(np.mean(pred == batch.answers)), "rows": len(pred), "faithfulness": faith,
           "faithfulness_translation": float(np.mean(lre.faithfulness(model, translation, batch.tokens, batch.pos,
                                                                      precomputed=st)))}
    targets = targets_of(pred)
    keep = targets >= 0
    if not keep.any():
        return {**out, "pairs": 0, "causality": {}, "causality_subject_patch": None}
    sub = batch.rows(keep)
    st_sub = lre.States(*(a[keep] for a in st))
    t_sub = np.searchsorted(np.flatnonzero(keep), targets[keep])  # target indices within the kept rows
    caus = {r: float(np.mean(lre.causality(model, op, sub.tokens, sub.pos, t_sub, rank=r, attention_mask=sub.mask,
                                           precomputed=st_sub))) for r in cfg.ranks if r <= op.weight.shape[0]}
    swapped = lre.patched_logits(model, sub.tokens, sub.pos, st_sub.s[t_sub], layer=op.layer, attention_mask=sub.mask)
    patch = float(np.mean(np.asarray(jnp.argmax(swapped, -1)) == pred[keep][t_sub]))
    return {**out, "pairs": int(keep.sum()), "causality": caus, "causality_subject_patch": patch}


def translation_lre(model, batch: Batch, layer: int) -> lre.LRE:
    """The paper's translation baseline ``o = s + mean(o_i - s_i)`` (estimation subjects)."""
    st = lre.states(model, batch.tokens, batch.pos, layer=layer, attention_mask=batch.mask)
    d = st.s.shape[-1]
    return lre.LRE(weight=jnp.eye(d, dtype=st.s.dtype), bias=(st.o - st.s).mean(0), layer=layer)


def relation_layer(model, batch: Batch, layer: int, cfg: LREConfig) -> dict:
    train, held = batch.rows(slice(0, cfg.n)), batch.rows(slice(cfg.n, None))
    op = lre.estimate(model, train.tokens, train.pos, layer=layer, n=cfg.n, attention_mask=train.mask)
    translation = translation_lre(model, train, layer)
    return {"train": score_split(model, op, train, cfg, translation), "held": score_split(model, op, held, cfg,
                                                                                           translation)}


def choose(per_relation: dict, metric: str) -> float | int:
    """The beta / rank with the best mean train score over relations (first on ties)."""
    keys = list(next(iter(per_relation.values()))["train"][metric])
    means = [np.mean([r["train"][metric][k] for r in per_relation.values()]) for k in keys]
    return keys[int(np.argmax(means))]


def summarise(per_relation: dict) -> dict:
    beta, rank = choose(per_relation, "faithfulness"), choose(per_relation, "causality")
    held = {name: {"faithfulness": r["held"]["faithfulness"][beta], "causality": r["held"]["causality"].get(rank),
                   "faithfulness_translation": r["held"]["faithfulness_translation"],
                   "causality_subject_patch": r["held"]["causality_subject_patch"],
                   "model_accuracy": r["held"]["model_accuracy"], "rows": r["held"]["rows"],
                   "pairs": r["held"]["pairs"]} for name, r in per_relation.items()}
    mean = {k: float(np.mean([h[k] for h in held.values() if h[k] is not None]))
            for k in ("faithfulness", "causality", "faithfulness_translation", "causality_subject_patch")}
    return {"beta": beta, "rank": rank, "mean": mean, "held": held}


def run_model(source: str, cfg: LREConfig) -> dict:
    check_model(source)
    model, world = load_world_model(source)
    relations = check_relations(world, cfg)
    prompts = {r: relation_prompts(world, r, cfg) for r in relations}
    few = {r: len(p) for r, p in prompts.items() if len(p) <= cfg.n}
    if few:
        raise UsageError(f"n={cfg.n} leaves no held-out subjects for {few} (subjects per relation); lower n")
    length = max(len(item.ids) for items in prompts.values() for item in items)  # one length: fewer compiles
    batches = {r: left_pad(items, length, world.pad_id) for r, items in prompts.items()}
    layers = {}
    for layer in range(model.config.n_layers):
        t0 = time.time()
        per_relation = {r: relation_layer(model, b, layer, cfg) for r, b in batches.items()}
        layers[layer] = {**summarise(per_relation), "detail": per_relation, "seconds": time.time() - t0}
        s = layers[layer]
        m = s["mean"]
        print(f"{source} layer {layer}: beta {s['beta']:g} rank {s['rank']}  faithfulness {m['faithfulness']:.3f}"
              f" (translation {m['faithfulness_translation']:.3f})  causality {m['causality']:.3f}"
              f" (subject patch {m['causality_subject_patch']:.3f})  [{s['seconds']:.0f}s]", flush=True)
    return {"family": model.family, "n_layers": model.config.n_layers, "d_model": int(model.config.d_model),
            "relations": list(relations), "layers": layers}


# ----------------------------------------------------------------------------- report


def plot(results: dict, png: Path) -> None:
    plt = pyplot()
    names = list(results)
    fig, axes = plt.subplots(2, len(names), figsize=(2.2 + 1.1 * sum(r["n_layers"] for r in results.values()), 7.5),
                             squeeze=False, gridspec_kw={"width_ratios": [r["n_layers"] for r in results.values()]})
    for col, name in enumerate(names):
        res = results[name]
        for row, metric in enumerate(("faithfulness", "causality")):
            grid = np.array([[res["layers"][l]["held"][r][metric] or 0.0 for l in range(res["n_layers"])]
                             for r in res["relations"]])  # [relations, layers]
            ax = axes[row, col]
            ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            for (i, j), v in np.ndenumerate(grid):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=6, color="w" if v < 0.6 else "k")
            ax.set_xticks(range(res["n_layers"]))
            ax.set_xlabel("layer (state entering block)")
            ax.set_yticks(range(len(res["relations"])))
            ax.set_yticklabels(res["relations"] if col == 0 else [], fontsize=7)
            ax.set_title(f"{name}: {metric}", fontsize=9)
    save_figure(fig, png)


def run(cfg: LREConfig, out: Path) -> dict:
    t0 = time.time()
    results = {name: run_model(name, cfg) for name in cfg.models}
    plot(results, out / "lre.png")
    print("held-out means per layer (faithfulness / causality; baselines: translation / subject patch):")
    for name, res in results.items():
        for layer, s in res["layers"].items():
            m = s["mean"]
            print(f"  {name:<12} layer {layer}: {m['faithfulness']:.3f} / {m['causality']:.3f}   "
                  f"baselines {m['faithfulness_translation']:.3f} / {m['causality_subject_patch']:.3f}")
    return {"models": results, "seconds": time.time() - t0}


main = experiment_main("lre", PRESETS, run, doc=__doc__)

if __name__ == "__main__":
    sys.exit(main())
