"""Causal tracing on a facts-world model: per-fact tables, AIE per token class, severed /
path-blocked traces, knockout, and attribution-vs-activation patching.

    jaxinterp trace                                                    # facts-gpt (the default run)
    jaxinterp trace --preset facts-mamba                               # facts-mamba, alt-subject corruption
    jaxinterp trace --model DIR --set n_facts=8 --out results/ct       # any facts-world model

(``jaxinterp trace`` = ``python -m jaxinterp.experiments.causal_trace.main``.) Writes
``results.json`` (every number), ``config.json`` and PNGs (per-fact heatmaps, AIE heatmaps,
knockout curves) to the output directory.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import jaxinterp as ji
from jaxinterp.experiments.causal_trace.config import TraceExperimentConfig
from jaxinterp.experiments.common import UsageError, experiment_main, pyplot, save_figure
from jaxinterp.experiments.data.facts_world import load_world_model
from jaxinterp.patching import (
    TOKEN_CLASSES,
    TraceConfig,
    alt_subject_corruption,
    average_indirect_effect,
    embedding_sigma,
    gaussian_corruption,
    restore_probs,
    trace_batch,
)
from jaxinterp.patching.activation import activation_patching, attribution_patching
from jaxinterp.patching.knockout import attention_knockout, mean_ablation_knockout, site_means

GPT_KINDS = ("resid_post", "mlp_out", "attn_out")
GPT_FREEZE = ("mlp_out", "attn_out")
MAMBA_KINDS = ("resid_post", "mixer_out", "mixer.ssm_out", "mixer.gate")
MAMBA_FREEZE = ("mixer.ssm_out", "mixer.gate", "mixer_out")


def kinds_for(model) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if model.family == "mamba":
        return MAMBA_KINDS, MAMBA_FREEZE
    return GPT_KINDS, GPT_FREEZE


# ----------------------------------------------------------------------------- fact selection


@jax.jit
def _top(model, tokens):
    return jnp.argmax(ji.run(model, tokens, logits_at=-1).logits, axis=-1)  # logits [B, V]


def select_facts(model, world, cfg: TraceExperimentConfig) -> list:
    """Known facts (argmax = true object) of the most common prompt lengths, in a seeded order."""
    prompts = world.fact_prompts("train")
    order = np.random.default_rng(cfg.seed).permutation(len(prompts))[: max(8 * cfg.n_facts, 64)]
    cands = [prompts[i] for i in order]
    by_len: dict[int, list] = {}
    for p in cands:
        by_len.setdefault(len(p.ids), []).append(p)
    known = []
    for n, group in by_len.items():
        top = np.asarray(_top(model, jnp.asarray([p.ids for p in group])))
        known += [p for p, t in zip(group, top) if t == p.answer_id or not cfg.known_only]
    lengths = [n for n, _ in Counter(len(p.ids) for p in known).most_common(cfg.max_lengths)]
    chosen = [p for p in known if len(p.ids) in lengths][: cfg.n_facts]
    if not chosen:
        raise UsageError("the model knows none of the sampled facts (argmax != true object); "
                         "--set known_only=false traces them anyway")
    return chosen


def alt_subjects_for(world, prompt, n: int, rng) -> list[list[int]]:
    """Other subjects with the same number of tokens (the Mamba paper's corruption)."""
    width = prompt.subject_span[1] - prompt.subject_span[0]
    pool = [e.name for e in world.entities if len(e.name.split()) == width and e.name != prompt.subject]
    picks = rng.permutation(len(pool))[:n]
    return [world.encode(pool[i]) for i in picks]


# ----------------------------------------------------------------------------- tracing


def _groups(facts) -> dict[int, list]:
    out: dict[int, list] = {}
    for f in facts:
        out.setdefault(len(f.ids), []).append(f)
    return out


def corruption_alts(world, facts, cfg: TraceExperimentConfig):
    """``{id(fact): alternative subjects}`` for ``corruption="alt"`` (None for noise); equally many
    per prompt length (one program per length), the same for every kind and the span restoration."""
    if cfg.corruption != "alt":
        return None
    rng = np.random.default_rng(cfg.seed)
    alts = {id(f): alt_subjects_for(world, f, cfg.n_samples, rng) for f in facts}
    for group in _groups(facts).values():
        m = min(len(alts[id(f)]) for f in group)
        for f in group:
            alts[id(f)] = alts[id(f)][:m]
    return alts


def run_traces(model, world, facts, cfg: TraceExperimentConfig, sigma: float, window: int) -> dict:
    """``{name: [TraceResult]}`` for every kind and every severed / path-blocked variant."""
    kinds, freezes = kinds_for(model)
    jobs = [(k, None) for k in kinds] + [("resid_post", f) for f in freezes]
    alts = corruption_alts(world, facts, cfg)
    out: dict[str, list] = {}
    tc = TraceConfig(n_samples=cfg.n_samples, noise_multiplier=cfg.noise_multiplier, window=window,
                     engine=cfg.engine, position_buckets=cfg.position_buckets)
    for kind, freeze in tqdm(jobs, desc="trace kinds"):
        name = kind if freeze is None else f"{kind}|freeze={freeze}"
        results = []
        for n, group in _groups(facts).items():
            group_alts = None if alts is None else [alts[id(f)] for f in group]
            res = trace_batch(model, np.asarray([f.ids for f in group]), [f.subject_span for f in group], kind=kind,
                              sigma=None if alts else sigma, alt_subjects=group_alts, freeze=freeze, config=tc,
                              answers=[f.answer_id for f in group])
            results += res
        out[name] = results
    return out


def _fact_order(facts) -> list:
    groups = _groups(facts)
    return [f for n in groups for f in groups[n]]


def span_masks(subject, seq: int, n_layers: int) -> np.ndarray:
    """Restore masks ``[L cells, L, T]``: cell l restores every subject token at layer l only."""
    b, e = subject
    masks = np.zeros((n_layers, n_layers, seq), bool)
    for l in range(n_layers):
        masks[l, l, b:e] = True
    return masks


def run_span_restoration(model, world, facts, cfg: TraceExperimentConfig, sigma: float) -> dict:
    """Mean IE ``[L]`` of restoring the block output at the whole subject span in one layer
    (single subject tokens undercount a subject whose identity is spread over several tokens)."""
    alts = corruption_alts(world, facts, cfg)
    tc = TraceConfig(n_samples=cfg.n_samples, noise_multiplier=cfg.noise_multiplier)
    n_layers = model.config.n_layers
    ies, p_corrupts = [], []
    for f in tqdm(facts, desc="subject-span restoration"):
        if alts is not None:
            corruption = alt_subject_corruption(model, np.asarray(f.ids), f.subject_span, alts[id(f)])
        else:
            corruption = gaussian_corruption(model, np.asarray(f.ids), f.subject_span, sigma, tc)
        probs, _, p_corrupt, _ = restore_probs(model, np.asarray(f.ids), corruption,
                                               span_masks(f.subject_span, len(f.ids), n_layers),
                                               answer=f.answer_id)
        ies.append(np.asarray(probs) - float(p_corrupt))
        p_corrupts.append(float(p_corrupt))
    return {"subject_span_ie": np.mean(ies, 0).tolist(), "p_corrupt": float(np.mean(p_corrupts)), "n": len(ies)}


# ----------------------------------------------------------------------------- knockout


def run_knockout(model, world, facts, window: int) -> dict:
    """Answer probability vs window centre, blocking subject / last-subject / other sources."""
    curves: dict[str, list] = {"subject": [], "last_subject": [], "other": []}
    means = None
    if model.family == "mamba":
        docs = [[world.bos_id] + world.encode(d)[:63] for d in world.documents(8, seed=1)]
        width = min(len(d) for d in docs)
        means = site_means(model, np.asarray([d[:width] for d in docs]), "mixer.in_x")
    for f in tqdm(facts, desc="knockout"):
        b, e = f.subject_span
        t = len(f.ids)
        sources = {"subject": list(range(b, e)), "last_subject": [e - 1],
                   "other": [i for i in range(t - 1) if not b <= i < e]}
        for name, src in sources.items():
            if not src:
                continue
            if model.family == "mamba":
                res = mean_ablation_knockout(model, np.asarray(f.ids)[None], src, means=means, window=window,
                                             answer=f.answer_id)
            else:
                res = attention_knockout(model, np.asarray(f.ids)[None], src, window=window, answer=f.answer_id)
            curves[name].append(res.relative_change)
    return {k: np.mean(v, 0).tolist() for k, v in curves.items() if v}


# ----------------------------------------------------------------------------- attribution


def logit_diff(logits, good, bad):
    """Mean over rows of logit[good] - logit[bad]."""
    rows = jnp.arange(logits.shape[0])
    return (logits[rows, good] - logits[rows, bad]).mean()


def run_attribution(model, world, facts, cfg: TraceExperimentConfig) -> dict:
    """Pearson r between activation patching and attribution patching (alt-subject pairs)."""
    kinds, _ = kinds_for(model)
    sites = ["blocks.*.resid_pre"] + [f"blocks.*.{k}" for k in kinds[1:2]]
    if model.family != "mamba":
        sites.append("blocks.*.attn_out")
    rng = np.random.default_rng(cfg.seed + 1)
    act_all, att_all = [], []
    groups = _groups(facts[: cfg.n_attribution])
    for n, group in groups.items():
        clean = np.asarray([f.ids for f in group])
        corrupt = clean.copy()
        for i, f in enumerate(group):
            alt = alt_subjects_for(world, f, 1, rng)
            if alt:
                corrupt[i, f.subject_span[0]:f.subject_span[1]] = alt[0]
        bad = np.asarray(_top(model, jnp.asarray(corrupt)))
        good = np.asarray([f.answer_id for f in group])
        args = (jnp.asarray(good), jnp.asarray(bad))
        act = activation_patching(model, clean, corrupt, sites, logit_diff, metric_args=args)
        att = attribution_patching(model, clean, corrupt, sites, logit_diff, metric_args=args)
        for k in act.effects:
            act_all.append(np.asarray(act.effects[k]) - act.corrupt)
            att_all.append(np.asarray(att.effects[k]) - att.corrupt)
    a, b = np.concatenate(act_all), np.concatenate(att_all)
    r = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")
    return {"pearson_r": r, "n_cells": int(a.size), "sites": sites, "activation": a.tolist(), "attribution": b.tolist()}


# ----------------------------------------------------------------------------- summary & plots


def summarize(aie: dict, n_layers: int) -> dict:
    """Peak AIE (class, layer, value) per kind plus the ROME-paper comparisons."""
    out = {}
    for name, a in aie.items():
        best = (None, None, -np.inf)
        for cls, row in a["classes"].items():
            if row is None:
                continue
            l = int(np.argmax(row))
            if row[l] > best[2]:
                best = (cls, l, float(row[l]))
        out[name] = {"peak_class": best[0], "peak_layer": best[1], "peak_aie": best[2],
                     "p_clean": a["p_clean"], "p_corrupt": a["p_corrupt"]}
        for cls in ("last_subject", "last"):
            row = a["classes"].get(cls)
            if row is not None:
                out[name][f"{cls}_peak_layer"] = int(np.argmax(row))
                out[name][f"{cls}_peak_aie"] = float(np.max(row))
    return out


AIE_MEANING = ("AIE (average indirect effect): probability of the answer restored by patching one cell (a token "
               "x a window of layers) with its clean value, minus the corrupted run's; mean over facts")


def table(summary: dict, n_facts: int) -> str:
    """Per kind: the peak AIE (token class, layer) and the peaks at the last subject token and the last token."""
    rows = [f"{AIE_MEANING} ({n_facts} facts). Peak: the largest over token classes and layers; x@l: AIE x at layer l.",
            f"{'restored kind':<32} {'peak class':<17} {'layer':>5} {'AIE':>7} {'last-subj AIE@l':>16} "
            f"{'last AIE@l':>12}"]
    for name, s in summary.items():
        ls = f"{s.get('last_subject_peak_aie', float('nan')):.3f}@{s.get('last_subject_peak_layer', '-')}"
        lt = f"{s.get('last_peak_aie', float('nan')):.3f}@{s.get('last_peak_layer', '-')}"
        rows.append(f"{name:<32} {str(s['peak_class']):<17} {str(s['peak_layer']):>5} {s['peak_aie']:>7.3f} "
                    f"{ls:>16} {lt:>12}")
    return "\n".join(rows)


_CMAPS = {"resid_post": "Purples", "mlp_out": "Greens", "attn_out": "Reds", "mixer_out": "Greens",
          "mixer.ssm_out": "Blues", "mixer.gate": "Oranges"}


def _pretty(kind: str) -> str:
    return kind.replace("|freeze=", ", later ") + (" frozen" if "|freeze=" in kind else "")


def _layer_axis(ax, n_layers: int, window: int) -> None:
    ax.set_xticks(range(n_layers))
    ax.set_xlabel("layer" if window == 1 else f"layer (centre of a {window}-layer window)")


def plot_fact(world, fact, traces: dict, model_name: str, png: Path) -> None:
    """ROME-style heatmaps: tokens x layers, one panel per restored kind (subject tokens starred)."""
    plt = pyplot()
    names = list(traces)
    fig, axes = plt.subplots(1, len(names), figsize=(3.4 * len(names), 0.35 * len(fact.ids) + 2.0), squeeze=False)
    labels = [world.decode([t]) + ("*" if fact.subject_span[0] <= i < fact.subject_span[1] else "")
              for i, t in enumerate(fact.ids)]
    for i, (ax, name) in enumerate(zip(axes[0], names)):
        r = traces[name]
        im = ax.imshow(r.probs, cmap=_CMAPS.get(name.split("|")[0], "Purples"), aspect="auto",
                       vmin=min(r.p_corrupt, r.probs.min()), vmax=max(r.p_clean, r.probs.max()))
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        _layer_axis(ax, r.probs.shape[1], r.window)
        if i == 0:
            ax.set_ylabel("token restored (* subject)")
        ax.set_title(f"restore {_pretty(name)}\nclean {r.p_clean:.2f} / corrupted {r.p_corrupt:.2f}", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.05).set_label(f"p({fact.answer}) (probability)", fontsize=7)
    fig.suptitle(f"{model_name}: p(answer) with one cell restored\n{fact.text} -> {fact.answer}", fontsize=9)
    save_figure(fig, png)


def plot_aie(aie: dict, model_name: str, window: int, png: Path) -> None:
    plt = pyplot()
    names = list(aie)
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.2), squeeze=False)
    for i, (ax, name) in enumerate(zip(axes[0], names)):
        rows = [aie[name]["classes"][c] for c in TOKEN_CLASSES]
        width = len(next(r for r in rows if r is not None))
        grid = np.array([r if r is not None else [np.nan] * width for r in rows])
        im = ax.imshow(grid, cmap=_CMAPS.get(name.split("|")[0], "Purples"), aspect="auto")
        ax.set_yticks(range(len(TOKEN_CLASSES)), [c.replace("_", " ") for c in TOKEN_CLASSES], fontsize=7)
        _layer_axis(ax, width, 1 if name.startswith("resid_post") else window)
        if i == 0:
            ax.set_ylabel("token class")
        ax.set_title(f"restore {_pretty(name)}", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.05).set_label("AIE (probability)", fontsize=7)
    fig.suptitle(f"{model_name}: average indirect effect (restored p(answer) - corrupted p(answer))", fontsize=9)
    save_figure(fig, png)


def plot_knockout(curves: dict, title: str, window: int, png: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for name, c in curves.items():
        ax.plot(range(len(c)), 100 * np.asarray(c), marker="o", label=name.replace("_", " "))
    ax.axhline(0, color="gray", lw=0.5)
    _layer_axis(ax, max(len(c) for c in curves.values()), window)
    ax.set_ylabel("change in p(answer) (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, title="source tokens knocked out", title_fontsize=7)
    save_figure(fig, png)


# ----------------------------------------------------------------------------- main


def run(cfg: TraceExperimentConfig, out: Path) -> dict:
    t0 = time.time()
    model, world = load_world_model(cfg.model)
    n_layers = model.config.n_layers
    window = cfg.window or min(10, max(1, n_layers // 2))
    facts = _fact_order(select_facts(model, world, cfg))
    sigma = embedding_sigma(model, [world.encode(e.name) for e in world.entities])
    traces = run_traces(model, world, facts, cfg, sigma, window)
    aie = {name: average_indirect_effect(rs) for name, rs in traces.items()}
    summary = summarize(aie, n_layers)
    span = run_span_restoration(model, world, facts, cfg, sigma)
    knock = run_knockout(model, world, facts, window)
    attribution = run_attribution(model, world, facts, cfg)
    name = Path(str(cfg.model)).name
    for i, fact in enumerate(facts[: cfg.n_examples]):
        plot_fact(world, fact, {k: v[i] for k, v in traces.items() if "|" not in k}, name, out / f"fact_{i}.png")
    plot_aie(aie, name, window, out / "aie.png")
    what = "attention knockout" if model.family != "mamba" else "mean-ablation knockout (mixer.in_x)"
    plot_knockout(knock, f"{name}: change in p(answer) under {what}, window {window}", window, out / "knockout.png")
    results = {
        "experiment": "causal_trace", "model": str(cfg.model), "family": model.family, "n_layers": n_layers,
        "config": dataclasses.asdict(cfg), "window": window, "sigma": sigma, "n_facts": len(facts),
        "summary": summary, "aie": aie, "subject_span": span, "knockout": knock,
        "attribution_vs_activation": {k: v for k, v in attribution.items() if k in ("pearson_r", "n_cells", "sites")},
        "attribution_cells": {"activation": attribution["activation"], "attribution": attribution["attribution"]},
        "facts": [{"text": f.text, "answer": f.answer, "subject": f.subject, "ids": list(f.ids),
                   "traces": {k: v[i].to_dict() for k, v in traces.items()}} for i, f in enumerate(facts)],
        "seconds": time.time() - t0,
    }
    print(table(summary, len(facts)))
    print("whole subject span restored in one layer (block output), IE per layer: "
          + " ".join(f"{v:.3f}" for v in span["subject_span_ie"]))
    print(f"knockout ({what}): change of p(answer) in % per window centre: "
          + "; ".join(f"{k} " + " ".join(f"{100 * v:.0f}" for v in c) for k, c in knock.items()))
    print(f"attribution vs activation patching (logit difference per cell): Pearson r = "
          f"{attribution['pearson_r']:.3f} over {attribution['n_cells']} cells")
    return results


PRESETS = {"facts-gpt": TraceExperimentConfig, "facts-mamba": TraceExperimentConfig.mamba,
           "smoke": TraceExperimentConfig.smoke}


main = experiment_main("causal_trace", PRESETS, run, doc=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
