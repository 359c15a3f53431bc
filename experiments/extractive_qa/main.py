"""Extractive-QA circuits, ATTNATTRIB and steering toward the context (issue 22).

    jaxinterp extractive-qa                                   # facts-gpt-qa, facts-world passages
    jaxinterp extractive-qa --set data=squad.json --model DIR # SQuAD-format JSON, any causal LM
    jaxinterp extractive-qa --preset smoke --out /tmp/qa      # seconds

(``jaxinterp extractive-qa`` = ``python -m jaxinterp.experiments.extractive_qa.main``.) Measures how
often the model answers from the passage (counterfactual passages) and from memory (passages silent
on the asked fact); finds the context circuit (corrupt the passage's answer token) and the memory
circuit (corrupt the question's subject) per head and MLP by causal mediation; attributes the answer
to a passage sentence with the attention of the top context-circuit heads (ATTNATTRIB) against four
baselines; steers the selected heads toward the attributed sentence. Writes ``results.json``,
``config.json``, ``circuits.png``, ``attribution.png`` and ``steering.png``.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import numpy as np

import jaxinterp as ji
from jaxinterp.circuits import qa
from jaxinterp.experiments.common import UsageError, experiment_main, pyplot, save_figure
from jaxinterp.experiments.data.facts_world import load_world_model
from jaxinterp.experiments.extractive_qa.config import ExtractiveQAConfig
from jaxinterp.experiments.extractive_qa.data import (Batch, batch, counterfactual_items, load_squad, read_squad,
                                                    silent_items)

METHODS = ("attnattrib", "all_heads", "random_heads", "input_x_gradient", "leave_one_out")


# ----------------------------------------------------------------------------- data


def _load(cfg: ExtractiveQAConfig):
    """``(model, {split: {kind: Batch}})``; kinds ``counterfactual`` and ``silent`` (facts world) or ``data``."""
    if cfg.data is None:
        model, world = load_world_model(cfg.model)
        sets = {split: {"counterfactual": batch(counterfactual_items(world, n, seed), world.pad_id),
                        "silent": batch(silent_items(world, n, seed), world.pad_id)}
                for split, n, seed in (("circuit", cfg.n_circuit, 1 + 10 * cfg.seed),
                                       ("eval", cfg.n_eval, 2 + 10 * cfg.seed))}
        return model, sets
    records = read_squad(cfg.data)  # checked before the model loads
    model = ji.load(cfg.model)
    tok = model.tokenizer
    if tok is None:
        raise UsageError(f"--data needs a model with a tokenizer; {cfg.model!r} has none")
    pad = tok.pad_id if tok.pad_id is not None else 0
    items = load_squad(cfg.data, lambda s: tok.encode(s, add_bos=False), tok.bos_id, cfg.n_circuit + cfg.n_eval,
                       records)
    if len(items) < 2:
        raise UsageError(f"--data {cfg.data}: need at least 2 questions, got {len(items)}")
    cut = max(1, min(cfg.n_circuit, len(items) // 2))
    return model, {"circuit": {"data": batch(items[:cut], pad)}, "eval": {"data": batch(items[cut:], pad)}}


def _last_logits(model, b: Batch):
    return ji.run(model, b.tokens, attention_mask=b.mask, logits_at=b.tokens.shape[1] - 1).logits


def answer_rates(model, sets: dict) -> dict:
    """Per kind: share of greedy answers equal to the passage's answer and to the model's memory."""
    out = {}
    for kind, b in sets.items():
        pred = np.asarray(_last_logits(model, b).argmax(-1))
        row = {"n": int(len(pred)), "answer_rate": float(np.mean(pred == b.answer))}
        if (b.memory >= 0).all():
            row["memory_rate"] = float(np.mean(pred == b.memory))
        out[kind] = row
    return out


# ----------------------------------------------------------------------------- circuits


def circuits(model, sets: dict, cfg: ExtractiveQAConfig) -> dict:
    """Mediation sweeps: the context circuit (counterfactual/data passages, context corrupted) and the
    memory circuit (silent passages, question corrupted); components over the threshold, overlap."""
    kind = "counterfactual" if "counterfactual" in sets else "data"
    runs = {"context": (sets[kind], sets[kind].corrupt_context)}
    if "silent" in sets:
        runs["memory"] = (sets["silent"], sets["silent"].corrupt_question)
    out = {}
    for name, (b, bad) in runs.items():
        if bad is None:
            raise UsageError(f"no {name} corruption for every question (an answer token not found in its sentence)")
        t0 = time.time()
        res = qa.mediation_sweep(model, b.tokens, bad, b.answer, attention_mask=b.mask, chunk=cfg.chunk)
        norm = res.normalized()
        out[name] = {"effects": {n: round(float(v), 4) for n, v in zip(res.names, norm)},
                     "total_effect": float(res.total.mean()), "clean_logit": float(res.clean.mean()),
                     "members": [n for n, v in zip(res.names, norm) if v >= cfg.circuit_threshold],
                     "heads": res.heads(model.config.n_layers, model.config.n_heads).tolist(),
                     "sweep_s": round(time.time() - t0, 2), "n": int(len(b.answer))}
    if "memory" in out:
        a, m = set(out["context"]["members"]), set(out["memory"]["members"])
        out["overlap"] = {"both": sorted(a & m), "context_only": sorted(a - m), "memory_only": sorted(m - a),
                          "jaccard": len(a & m) / max(1, len(a | m))}
    return out


def selected_heads(circuit: dict, n_layers: int, n_heads: int, k: int) -> np.ndarray:
    """``[L, H]`` 0/1 weights of the ``k`` heads with the largest context effect."""
    heads = np.asarray(circuit["heads"])
    w = np.zeros((n_layers, n_heads), np.float32)
    for i in np.argsort(-heads.reshape(-1), kind="stable")[:k]:
        w[i // n_heads, i % n_heads] = 1.0
    return w


# ----------------------------------------------------------------------------- attribution


def _n_valid(b: Batch) -> np.ndarray:
    """``[B, N]``: sentence j exists in row b."""
    return np.stack([(b.sentence_ids == j).any(axis=1) for j in range(b.n_sentences)], axis=1)


def _top1(scores, b: Batch) -> np.ndarray:
    return np.argmax(np.where(_n_valid(b), np.asarray(scores), -np.inf), axis=1)


def _timed(fn, *args):
    """``(result, seconds)`` of a second call (the first compiles)."""
    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - t0


def _heads_scores(model, b: Batch, weights):
    _, attn = qa.head_attention(model, b.tokens, b.mask, weights)
    return qa.aggregate_sentences(attn, b.sentence_ids, b.n_sentences)


def attribution(model, b: Batch, heads: np.ndarray, cfg: ExtractiveQAConfig) -> dict:
    """Top-1 sentence accuracy vs the gold sentence and wall time per example of every method."""
    n_layers, n_heads = heads.shape
    rng = np.random.default_rng(cfg.seed)
    k = int(heads.sum())
    scores = {}
    scores["attnattrib"], t_attn = _timed(_heads_scores, model, b, heads)
    scores["all_heads"], t_all = _timed(_heads_scores, model, b, np.ones_like(heads))
    ixg, t_ixg = _timed(qa.input_x_gradient, model, b.tokens, b.mask, b.answer)
    scores["input_x_gradient"] = qa.aggregate_sentences(ixg, b.sentence_ids, b.n_sentences)
    scores["leave_one_out"], t_loo = _timed(qa.leave_one_out, model, b.tokens, b.mask, b.sentence_ids, b.answer,
                                            b.n_sentences)
    rows = {m: {"accuracy": float(np.mean(_top1(s, b) == b.gold))} for m, s in scores.items()}
    draws = []
    for _ in range(cfg.random_draws):
        w = np.zeros(n_layers * n_heads, np.float32)
        w[rng.choice(n_layers * n_heads, size=k, replace=False)] = 1.0
        draws.append(float(np.mean(_top1(_heads_scores(model, b, w.reshape(n_layers, n_heads)), b) == b.gold)))
    rows["random_heads"] = {"accuracy": float(np.mean(draws)), "accuracy_std": float(np.std(draws)),
                            "draws": len(draws)}
    n = len(b.answer)
    for m, t in (("attnattrib", t_attn), ("all_heads", t_all), ("random_heads", t_attn),
                 ("input_x_gradient", t_ixg), ("leave_one_out", t_loo)):
        rows[m]["ms_per_example"] = round(1000 * t / n, 3)
    rows["chance"] = {"accuracy": float(np.mean(1.0 / _n_valid(b).sum(axis=1)))}
    return {"n": n, "heads": [f"L{i // n_heads}H{i % n_heads}" for i in np.flatnonzero(heads.reshape(-1))],
            "methods": {m: rows[m] for m in (*METHODS, "chance")},
            "attributed": _top1(scores["attnattrib"], b)}


# ----------------------------------------------------------------------------- steering


def steering(model, sets: dict, heads: np.ndarray, cfg: ExtractiveQAConfig) -> list[dict]:
    """Per strength: context-faithful share on counterfactual (or data) passages, memory recall on
    silent passages; the attention of the selected heads goes toward ATTNATTRIB's sentence."""
    rows = []
    keys = {}
    for kind, b in sets.items():
        top = _top1(_heads_scores(model, b, heads), b)
        keys[kind] = b.sentence_ids == top[:, None]  # [B, T]
    for s in cfg.strengths:
        row = {"strength": s}
        for kind, b in sets.items():
            pred = np.asarray(qa.steered_logits(model, b.tokens, b.mask, heads > 0, keys[kind], s).argmax(-1))
            if kind == "silent":
                row["memory_recall"] = float(np.mean(pred == b.memory))
            else:
                row["context_faithful"] = float(np.mean(pred == b.answer))
                if (b.memory >= 0).all():
                    row["memory_answers"] = float(np.mean(pred == b.memory))
        rows.append(row)
        print("steering " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    return rows


# ----------------------------------------------------------------------------- plots


def plot(results: dict, out: Path) -> None:
    plt = pyplot()
    circ = {k: v for k, v in results["circuits"].items() if k != "overlap"}
    fig, axes = plt.subplots(1, len(circ), figsize=(4.8 * len(circ), 3.8), squeeze=False)
    for ax, (name, c) in zip(axes[0], circ.items()):
        heads = np.asarray(c["heads"])
        mlp = np.asarray([c["effects"][f"L{l} MLP"] for l in range(heads.shape[0])])[:, None]
        grid = np.concatenate([heads, mlp], axis=1)
        lim = max(1e-6, float(np.abs(grid).max()))
        im = ax.imshow(grid, cmap="RdBu_r", vmin=-lim, vmax=lim)
        ax.set_xticks(range(grid.shape[1]), [f"H{h}" for h in range(heads.shape[1])] + ["MLP"])
        ax.set_yticks(range(grid.shape[0]), [f"L{l}" for l in range(grid.shape[0])])
        for (i, j), v in np.ndenumerate(grid):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
        ax.set_title(f"{name} circuit: share of the corruption's effect", fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8)
    save_figure(fig, out / "circuits.png")

    methods = results["attribution"]["methods"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    names = list(METHODS)
    a1.bar(names, [methods[m]["accuracy"] for m in names], color="tab:blue")
    a1.axhline(methods["chance"]["accuracy"], color="grey", ls=":", label="chance")
    a1.set_ylabel("top-1 sentence accuracy")
    a1.set_ylim(0, 1.02)
    a1.legend(fontsize=8)
    a2.bar(names, [methods[m]["ms_per_example"] for m in names], color="tab:orange")
    a2.set_ylabel("ms per example")
    a2.set_yscale("log")
    for ax in (a1, a2):
        ax.tick_params(axis="x", rotation=30, labelsize=8)
    save_figure(fig, out / "attribution.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    rows = results["steering"]
    labels = {"context_faithful": "context-faithful answers (counterfactual passages)",
              "memory_answers": "memory answers (counterfactual passages)",
              "memory_recall": "memory recall (silent passages)"}
    for key, label in labels.items():
        if key in rows[0]:
            ax.plot([r["strength"] for r in rows], [r[key] for r in rows], "o-", label=label)
    ax.set_xlabel("steering strength (added to the selected heads' scores)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"steering heads {', '.join(results['attribution']['heads'])} toward the attributed sentence",
                 fontsize=9)
    save_figure(fig, out / "steering.png")


# ----------------------------------------------------------------------------- run


def run(cfg: ExtractiveQAConfig, out: Path) -> dict:
    t0 = time.time()
    model, sets = _load(cfg)
    if not ji.get_family(model.family).attention:
        raise UsageError(f"extractive-qa needs attention heads; {cfg.model!r} is a {model.family} model")
    n_layers, n_heads = model.config.n_layers, model.config.n_heads
    if cfg.attn_heads > n_layers * n_heads:
        raise UsageError(f"attn_heads must be <= {n_layers * n_heads} (the model's heads), got {cfg.attn_heads}")
    rates = {split: answer_rates(model, s) for split, s in sets.items()}
    print("answer rates " + str(rates["eval"]), flush=True)
    circ = circuits(model, sets["circuit"], cfg)
    print("circuits: " + "; ".join(f"{k} {v['members']}" for k, v in circ.items() if k != "overlap"), flush=True)
    heads = selected_heads(circ["context"], n_layers, n_heads, cfg.attn_heads)
    main_kind = "counterfactual" if "counterfactual" in sets["eval"] else "data"
    attr = attribution(model, sets["eval"][main_kind], heads, cfg)
    attr.pop("attributed")
    print("attribution " + ", ".join(f"{m} {v['accuracy']:.3f}" for m, v in attr["methods"].items()), flush=True)
    results = {
        "model": cfg.model, "data": cfg.data or "facts-world",
        "answer_rates": rates,
        "circuits": circ,
        "attribution": attr,
        "steering": steering(model, sets["eval"], heads, cfg),
        "metrics": {
            "answer_rate": "share of greedy first answer tokens equal to the passage's answer (silent passages: "
                           "the true fact)",
            "memory_rate": "share equal to the world's true object (the parametric answer)",
            "circuit effects": "answer-logit drop when one component (a head's attn.z or an MLP's output, every "
                               "position) reads the corrupted input, over the drop when everything does",
            "accuracy": "top-1 attributed sentence == the sentence holding the answer",
            "ms_per_example": "wall time of the batched method (after compilation) / questions; ATTNATTRIB's is the "
                              "forward pass that also yields the answer logits",
            "context_faithful": "share of answers equal to the passage's answer under steering",
            "memory_recall": "share of silent-passage answers equal to the true fact under steering",
        },
    }
    plot(results, out)
    results["wall_s"] = round(time.time() - t0, 1)
    return results


PRESETS = {"default": ExtractiveQAConfig.default, "smoke": ExtractiveQAConfig.smoke}
main = experiment_main("extractive_qa", PRESETS, run, doc=__doc__)

if __name__ == "__main__":
    raise SystemExit(main())
