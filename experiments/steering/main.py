"""Steering a facts-world model toward one attribute with mean-difference vectors (contrastive
activation addition), swept over scales: how often the steered answers change to the target vs
how much recall of unrelated facts drops.

    jaxinterp steer                                         # facts-gpt, color -> red, both contrasts
    jaxinterp steer --set relation=pet target=dog layers=1,2
    jaxinterp steer --preset smoke --out /tmp/steer         # seconds

(``jaxinterp steer`` = ``python -m jaxinterp.experiments.steering.main``.) Writes ``results.json``,
``config.json``, ``sweep.png`` (rates vs scale per layer) and ``tradeoff.png`` to the output directory.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

import jaxinterp as ji
from jaxinterp.experiments.common import UsageError, experiment_main, pyplot, save_figure
from jaxinterp.experiments.data.facts_world import load_world_model
from jaxinterp.experiments.steering.config import SteeringConfig

MAX_DROP = 0.05  # the summary's budget: the best target rate losing at most this much unrelated recall


# ----------------------------------------------------------------------------- data


def split_entities(world, cfg: SteeringConfig):
    """(entities that build the vector, evaluated entities): a seeded split."""
    entities = list(world.entities)
    order = np.random.default_rng(cfg.seed).permutation(len(entities))
    cut = int(round(cfg.vector_share * len(entities)))
    return [entities[i] for i in order[:cut]], [entities[i] for i in order[cut:]]


def _prompts(world, entities, relation: str):
    n = len(world.relation(relation).templates)
    return [world.prompt(e.name, relation, t) for e in entities for t in range(n)]


def contrast_sets(world, entities, cfg: SteeringConfig, target_id: int) -> dict[str, tuple[list, list]]:
    """``{contrast: (positive, negative)}`` token-id lists from the vector entities."""
    has = [e for e in entities if e.attributes[cfg.relation] == cfg.target]
    other = [e for e in entities if e.attributes[cfg.relation] != cfg.target]
    if not has or not other:
        raise UsageError(f"the vector entities need subjects with and without {cfg.relation}={cfg.target} "
                         f"(got {len(has)} with, {len(other)} without); change seed or vector_share")
    others = _prompts(world, other, cfg.relation)
    sets = {"recall": ([list(p.ids) for p in _prompts(world, has, cfg.relation)], [list(p.ids) for p in others]),
            "answer": ([list(p.ids) + [target_id] for p in others], [list(p.ids) + [p.answer_id] for p in others])}
    return {c: sets[c] for c in cfg.contrasts}


def eval_sets(world, entities, cfg: SteeringConfig) -> dict[str, list]:
    """The evaluated prompts: the relation for subjects without the target, the other relations
    (unrelated facts) for every evaluated subject, and the bare names (free continuations)."""
    steered = _prompts(world, [e for e in entities if e.attributes[cfg.relation] != cfg.target], cfg.relation)
    unrelated = [p for e in entities for r in world.relations_of(e) if r.name != cfg.relation
                 for p in _prompts(world, [e], r.name)]
    names = [[world.bos_id] + world.encode(e.name) for e in entities]
    return {"steered": steered, "unrelated": unrelated, "names": names}


# ----------------------------------------------------------------------------- measurement


def measure(model, sets, site: str, vector, scale: float, cfg: SteeringConfig, target_id: int) -> dict:
    """Rates at one (site, vector, scale); greedy generation with ``ji.Steer`` at every step."""
    iv = None if scale == 0 else {site: ji.Steer(vector, jnp.float32(scale), where=cfg.where)}
    first = ji.generate(model, [list(p.ids) for p in sets["steered"]], max_new_tokens=1, interventions=iv).tokens[:, 0]
    answers = np.asarray([p.answer_id for p in sets["steered"]])
    unrel = ji.generate(model, [list(p.ids) for p in sets["unrelated"]], max_new_tokens=1, interventions=iv).tokens[:, 0]
    free = ji.generate(model, sets["names"], max_new_tokens=cfg.free_tokens, interventions=iv, stop_at_eos=False)
    return {
        "scale": float(scale),
        "target_rate": float(np.mean(first == target_id)),      # answer became the target
        "changed_rate": float(np.mean(first != answers)),        # answer no longer the true object
        "unrelated_recall": float(np.mean(unrel == np.asarray([p.answer_id for p in sets["unrelated"]]))),
        "mention_rate": float(np.mean([(row == target_id).any() for row in free.tokens])),
    }


def sweep(model, world, vector_sets, sets, cfg: SteeringConfig, target_id: int) -> dict:
    """``{contrast: {layer: {"norm", "rows": [per scale]}}}``; the recall drop is against scale 0."""
    out: dict = {}
    for contrast, (pos, neg) in vector_sets.items():
        out[contrast] = {}
        for layer in cfg.layers:
            site = f"blocks.{layer}.resid_post"
            vector = ji.steering.mean_difference(model, pos, neg, site)
            rows = [measure(model, sets, site, vector, s, cfg, target_id) for s in cfg.scales]
            base = measure(model, sets, site, vector, 0.0, cfg, target_id)["unrelated_recall"] \
                if 0.0 not in cfg.scales else rows[cfg.scales.index(0.0)]["unrelated_recall"]
            for row in rows:
                row["unrelated_recall_drop"] = base - row["unrelated_recall"]
            out[contrast][str(layer)] = {"site": site, "vector_norm": float(jnp.linalg.norm(vector)), "rows": rows}
            best = max(rows, key=lambda r: r["target_rate"])
            print(f"{contrast:7s} layer {layer}: |v| {out[contrast][str(layer)]['vector_norm']:.2f}, best target "
                  f"rate {best['target_rate']:.2f} at scale {best['scale']:g} (recall drop "
                  f"{best['unrelated_recall_drop']:+.2f})", flush=True)
    return out


def example_settings(results: dict, best: dict) -> dict:
    """Per contrast: the (layer, scale) with a target rate >= 0.5 and the least unrelated-recall
    drop, else the contrast's best within the drop budget (else its first row)."""
    out = {}
    for contrast, layers in results.items():
        rows = [{**r, "layer": int(layer)} for layer, entry in layers.items() for r in entry["rows"]]
        strong = [r for r in rows if r["target_rate"] >= 0.5]
        pick = min(strong, key=lambda r: r["unrelated_recall_drop"]) if strong else best[contrast]
        out[contrast] = (pick.get("layer", rows[0]["layer"]), pick.get("scale", rows[0]["scale"]))
    return out


def examples(model, world, sets, vector_sets, settings: dict, cfg: SteeringConfig) -> list[dict]:
    """Continuations of one prompt per evaluated subject (the first ``n_examples``), unsteered and
    steered at each contrast's ``settings`` (layer, scale), as text."""
    per_subject = len(world.relation(cfg.relation).templates)
    chosen = sets["steered"][::per_subject][: cfg.n_examples]
    if not chosen:
        return []
    prompts = [list(p.ids) for p in chosen]
    base = ji.generate(model, prompts, max_new_tokens=cfg.free_tokens, stop_at_eos=False)
    rows = []
    for contrast, (pos, neg) in vector_sets.items():
        layer, scale = settings[contrast]
        site = f"blocks.{layer}.resid_post"
        iv = {site: ji.Steer(ji.steering.mean_difference(model, pos, neg, site), jnp.float32(scale), where=cfg.where)}
        out = ji.generate(model, prompts, max_new_tokens=cfg.free_tokens, interventions=iv, stop_at_eos=False)
        rows += [{"contrast": contrast, "layer": layer, "scale": scale, "prompt": p.text,
                  "unsteered": world.decode(b), "steered": world.decode(s)}
                 for p, b, s in zip(chosen, base.tokens, out.tokens)]
    return rows


def summary(results: dict, max_drop: float) -> dict:
    """Per contrast: the best target rate whose unrelated-recall drop stays <= ``max_drop``."""
    out = {}
    for contrast, layers in results.items():
        best = {"target_rate": 0.0}
        for layer, entry in layers.items():
            for row in entry["rows"]:
                if row["unrelated_recall_drop"] <= max_drop and row["target_rate"] > best["target_rate"]:
                    best = {**row, "layer": int(layer)}
        out[contrast] = best
    return out


# ----------------------------------------------------------------------------- plots


def plot(results: dict, cfg: SteeringConfig, out: Path) -> None:
    plt = pyplot()
    contrasts = list(results)
    fig, axes = plt.subplots(2, len(contrasts), figsize=(5.5 * len(contrasts), 7), squeeze=False)
    for j, contrast in enumerate(contrasts):
        for layer, entry in results[contrast].items():
            scales = [r["scale"] for r in entry["rows"]]
            line, = axes[0, j].plot(scales, [r["target_rate"] for r in entry["rows"]], "o-", label=f"layer {layer}")
            axes[0, j].plot(scales, [r["changed_rate"] for r in entry["rows"]], ":", color=line.get_color())
            axes[1, j].plot(scales, [r["unrelated_recall_drop"] for r in entry["rows"]], "o-", label=f"layer {layer}")
        axes[0, j].set_title(f"{contrast}: answers -> {cfg.target!r} (solid), changed (dotted)", fontsize=9)
        axes[1, j].set_title(f"{contrast}: drop in recall of unrelated facts", fontsize=9)
        for ax in axes[:, j]:
            ax.set_xlabel("scale (x mean difference)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        axes[0, j].set_ylim(-0.02, 1.02)
    save_figure(fig, out / "sweep.png")

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for contrast, layers in results.items():
        for layer, entry in layers.items():
            ax.plot([r["unrelated_recall_drop"] for r in entry["rows"]], [r["target_rate"] for r in entry["rows"]],
                    "o-" if contrast == "recall" else "s--", label=f"{contrast}, layer {layer}")
    ax.set_xlabel("drop in recall of unrelated facts")
    ax.set_ylabel(f"rate of answers changed to {cfg.target!r}")
    ax.set_title(f"steering {cfg.relation} -> {cfg.target} ({cfg.model})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, out / "tradeoff.png")


# ----------------------------------------------------------------------------- run


def run(cfg: SteeringConfig, out: Path) -> dict:
    t0 = time.time()
    model, world = load_world_model(cfg.model)
    names = [r.name for r in world.relations]
    if cfg.relation not in names:
        raise UsageError(f"relation must be one of {names}, got {cfg.relation!r}")
    rel = world.relation(cfg.relation)
    if cfg.target not in rel.objects:
        raise UsageError(f"target must be an object of {cfg.relation}: one of {list(rel.objects)}, got {cfg.target!r}")
    if max(cfg.layers) >= model.config.n_layers:
        raise UsageError(f"layers must be in [0, {model.config.n_layers}), got {list(cfg.layers)}")
    target_id = world.encode(cfg.target)[0]
    vector_entities, eval_entities = split_entities(world, cfg)
    vector_sets = contrast_sets(world, vector_entities, cfg, target_id)
    sets = eval_sets(world, eval_entities, cfg)
    results = sweep(model, world, vector_sets, sets, cfg, target_id)
    best = summary(results, MAX_DROP)
    plot(results, cfg, out)
    return {
        "model": cfg.model,
        "relation": cfg.relation,
        "target": cfg.target,
        "n_vector_examples": {c: [len(p), len(n)] for c, (p, n) in vector_sets.items()},
        "n_eval": {k: len(v) for k, v in sets.items()},
        "metrics": {
            "target_rate": "share of evaluated prompts (subjects whose true object is not the target) whose "
                           "greedy answer is the target",
            "changed_rate": "share whose greedy answer is no longer the true object",
            "unrelated_recall": "share of the evaluated subjects' other facts answered correctly",
            "unrelated_recall_drop": "unrelated_recall at scale 0 minus at this scale",
            "mention_rate": f"share of {cfg.free_tokens}-token free continuations of a subject's name "
                            "that contain the target",
        },
        "sweep": results,
        "best_within_recall_drop": {"max_drop": MAX_DROP, **best},
        "examples": examples(model, world, sets, vector_sets, example_settings(results, best), cfg),
        "wall_s": round(time.time() - t0, 1),
    }


PRESETS = {"default": SteeringConfig.default, "smoke": SteeringConfig.smoke}
main = experiment_main("steering", PRESETS, run, doc=__doc__)

if __name__ == "__main__":
    raise SystemExit(main())
