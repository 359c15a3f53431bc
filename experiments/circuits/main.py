"""Sparse feature circuits vs neuron circuits for facts-world behaviours (Marks et al. 2024 on facts-gpt).

    jaxinterp circuits                       # results/circuits/default/
    jaxinterp circuits --set tasks=copy steps=20

For each task (``recall``: the subject decides the answer; ``copy``: the answer is copied from a
passage) the node effects of patching clean -> counterfactual on the logit difference, by
integrated gradients over SAE features and SAE errors at every attn_out / mlp_out / resid_post of
every layer (SAEs from ``jaxinterp train-saes``, trained on first use), and the same over neurons
(attn_out and resid_post dimensions, MLP neurons at mlp.post). Then on held-out pairs:
faithfulness (m(C) - m(empty)) / (m(M) - m(empty)) of the top-n nodes and completeness (the same
for everything but them), the rest mean-ablated; the feature circuit's graph (nodes above
``node_threshold``, edges above ``edge_threshold``) as JSON, PNG and SVG; and the top nodes'
estimated effects against exact single-node patching.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxinterp.circuits import Neurons, discover, exact_effects, faithfulness_curve, mean_nodes, node_effects
from jaxinterp.experiments.common import experiment_main, pyplot, save_figure
from jaxinterp.experiments.data.facts_world import load_world_model
from jaxinterp.checkpoint import OutputLock as locked  # re-entrant: the harness holds it too
from jaxinterp.experiments.train_saes.main import ensure_saes
from jaxinterp.grads import site_shapes

from .config import CircuitsConfig
from .tasks import TASKS, Task, logit_diff

PRESETS = {"default": CircuitsConfig.default, "smoke": CircuitsConfig.smoke}
FAITHFUL = 0.8  # the faithfulness a circuit size is reported for


def neuron_dictionaries(model, kinds) -> dict:
    """``{site: Neurons}`` at ``blocks.{i}.<kind>`` for every layer and kind."""
    sites = [s for s in model.sites if s.startswith("blocks.") and s.split(".", 2)[2] in kinds]
    shapes = site_shapes(model, jnp.zeros((1, 2), jnp.int32), sites)
    return {s: Neurons(int(shapes[s].shape[-1])) for s in sites}


def node_labels(model, effects, nodes, tokens: np.ndarray) -> dict:
    """``"<index> <token>"``: each feature labelled with the token where it is largest in the clean batch."""
    vocab = model.to_str_tokens(np.arange(model.config.vocab_size))
    labels = {}
    for n in nodes:
        if n.is_error:
            continue
        acts = np.asarray(effects.clean[effects.sites.index(n.site)][0][..., n.index])  # [B, T]
        b, t = np.unravel_index(np.argmax(acts), acts.shape)
        labels[n] = f"{n.index} {vocab[tokens[b, t]]!s}"
    return labels


def first_count(curve: dict, level: float) -> int | None:
    """The smallest node count whose circuit reaches ``level`` faithfulness (None: none does)."""
    hits = [c for c, f in zip(curve["counts"], curve["faithfulness"]) if f >= level]
    return hits[0] if hits else None


def circuit_kind(cfg: CircuitsConfig, model, dicts: dict, train: Task, test: Task) -> tuple:
    """Node effects on the discovery pairs, curves on the held-out pairs, exact checks of the top nodes."""
    t0 = time.time()
    args_train, args_test = (train.good, train.bad), (test.good, test.bad)
    effects = node_effects(model, dicts, train.clean, logit_diff, patch=train.patch, method=cfg.method,
                           steps=cfg.steps, metric_args=args_train)
    t_effects = time.time() - t0
    means = mean_nodes(model, dicts, train.clean)
    curve = faithfulness_curve(model, dicts, test.clean, logit_diff, effects, cfg.counts, means=means,
                               metric_args=args_test)
    top = [n for n, _ in effects.ranked()[:cfg.check_nodes]]
    exact = exact_effects(model, dicts, train.clean, logit_diff, effects, top, metric_args=args_train)
    estimated = effects.nodes()
    checks = [{"node": str(n), "estimated": estimated[n], "exact": exact[n]} for n in top]
    info = {"m_clean": effects.m_clean, "m_patch": effects.m_patch, "n_nodes": curve["n_nodes"],
            "effects_seconds": t_effects, "seconds": time.time() - t0, "curve": curve, "exact_check": checks,
            f"nodes_for_{FAITHFUL}": first_count(curve, FAITHFUL)}
    return effects, info


def feature_graph(cfg: CircuitsConfig, model, saes: dict, task: Task, effects, out: Path) -> dict:
    """The feature circuit's graph: ``<out>/<task>_circuit.{json,png,svg}``."""
    t0 = time.time()
    circuit, _ = discover(model, saes, task.clean, logit_diff, effects=effects, node_threshold=cfg.node_threshold,
                          edge_threshold=cfg.edge_threshold, max_nodes_per_site=cfg.max_nodes_per_site,
                          metric_args=(task.good, task.bad))
    circuit.labels = node_labels(model, effects, circuit.nodes, task.clean)
    title = (f"{cfg.model}: {task.name} circuit of SAE features, metric = logit diff (clean answer - patch answer, "
             f"{len(task.clean)} pairs)\nnode effects by {cfg.method} ({cfg.steps} steps); nodes |effect| >= "
             f"{cfg.node_threshold} (<= {cfg.max_nodes_per_site} per site), edges >= {cfg.edge_threshold}, in logits")
    circuit.info.update(title=title, metric_name="logit diff")
    paths = [circuit.save_json(out / f"{task.name}_circuit.json"), circuit.render(out / f"{task.name}_circuit.png"),
             circuit.render(out / f"{task.name}_circuit.svg")]
    return {**circuit.info, "files": [str(p) for p in paths], "seconds": time.time() - t0}


def plot_curves(cfg: CircuitsConfig, results: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(len(results), 2, figsize=(10, 3.6 * len(results) + 0.6), squeeze=False)
    for row, (name, res) in enumerate(results.items()):
        for col, key in enumerate(("faithfulness", "completeness")):
            ax = axes[row, col]
            for kind, style in (("features", "o-"), ("neurons", "s--")):
                c = res[kind]["curve"]
                x = np.maximum(np.array(c["counts"]), 0.5)  # 0 nodes drawn at 0.5 on the log axis
                ax.plot(x, c[key], style, label=f"{kind} ({c['n_nodes']} nodes)", ms=4)
            ax.set_xscale("log")
            ax.axhline(1.0, color="0.6", lw=0.8)
            ax.axhline(0.0, color="0.6", lw=0.8)
            ax.set_xlabel("nodes in the circuit C (top by |IG effect|; 0 drawn at 0.5)", fontsize=8)
            what = "m(C)" if key == "faithfulness" else "m(M \\ C)"
            ax.set_ylabel(f"{key} (fraction)\n({what} - m(empty)) / (m(M) - m(empty))", fontsize=8)
            kept = "keep C" if key == "faithfulness" else "keep all but C"
            ax.set_title(f"{name}: {key} ({kept}, mean-ablate the rest)", fontsize=9)
            ax.legend(fontsize=8)
    fig.suptitle(f"{cfg.model}: SAE-feature vs neuron circuits; metric m = logit diff (clean - patch answer, in "
                 f"logits), {cfg.n_test} held-out pairs", fontsize=10)
    save_figure(fig, path)


def run(cfg: CircuitsConfig, out: Path) -> dict:
    with locked(out):
        model, world = load_world_model(cfg.model)
        saes = ensure_saes(cfg.saes, cfg.model)
        neurons = neuron_dictionaries(model, cfg.neuron_kinds)
        results = {}
        for name in cfg.tasks:
            train, test = TASKS[name](model, world, cfg.n_train + cfg.n_test, cfg.seed).split(cfg.n_train)
            res = {"description": train.description, "n_train": len(train.clean), "n_test": len(test.clean),
                   "seq_len": int(train.clean.shape[1])}
            effects, res["features"] = circuit_kind(cfg, model, saes, train, test)
            _, res["neurons"] = circuit_kind(cfg, model, neurons, train, test)
            res["graph"] = feature_graph(cfg, model, saes, train, effects, out)
            results[name] = res
        plot_curves(cfg, results, out / "faithfulness.png")
    print_summary(cfg, results)
    return {"model": cfg.model, "saes": cfg.saes, "tasks": results}


def print_summary(cfg: CircuitsConfig, results: dict) -> None:
    print(f"faithfulness of the top-n nodes on held-out pairs ((m(C) - m(empty)) / (m(M) - m(empty)), mean ablation; "
          f"1 = the circuit alone recovers the model's logit difference); {cfg.model}")
    for name, res in results.items():
        f, n = res["features"]["curve"], res["neurons"]["curve"]
        print(f"{name}: m(M) {f['m_full']:.2f}, m(empty) {f['m_empty']:.2f}; nodes for faithfulness {FAITHFUL}: "
              f"features {res['features'][f'nodes_for_{FAITHFUL}']}, neurons {res['neurons'][f'nodes_for_{FAITHFUL}']}")
        for kind, c in (("features", f), ("neurons", n)):
            print(f"  {kind:<9} " + "  ".join(f"{k}: {v:.2f}" for k, v in zip(c["counts"], c["faithfulness"])))


main = experiment_main("circuits", PRESETS, run, doc=__doc__)

if __name__ == "__main__":
    sys.exit(main())
