"""ROME on a facts-world model: a layer sweep of single edits scored on a synthetic CounterFact.

    jaxinterp rome                                                    # facts-gpt, every layer, 16 edits
    jaxinterp rome --preset facts-mamba --set target=in_proj_z
    jaxinterp rome --model DIR --set n_edits=4 layers=1,2 --out results/rome_x

(``jaxinterp rome`` = ``python -m jaxinterp.experiments.rome.main``.) Writes ``results.json``
(every score of every edit), ``config.json`` and ``layer_sweep.png`` (efficacy, paraphrase,
neighbourhood and their harmonic mean per edited layer, unedited model dashed).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from jaxinterp.experiments.common import experiment_main, pyplot, save_figure
from jaxinterp.experiments.data.facts_world import PAD, load_world_model
from jaxinterp.experiments.rome.config import RomeExperimentConfig
from jaxinterp.editing.rome import (EditRequest, RomeConfig, counterfact_scores, edit, key_covariances, sample_contexts,
                            target_logprobs)

METRICS = ("efficacy", "paraphrase", "neighborhood", "score")


def corpus_batches(world, cfg: RomeExperimentConfig, batch: int = 16):
    """World documents as ``[batch, corpus_len]`` token arrays (PAD-filled)."""
    pad = world.tokenizer.token_to_id(PAD)
    docs = world.documents(cfg.corpus_docs, seed=cfg.seed + 7)
    rows = np.full((len(docs), cfg.corpus_len), pad, np.int64)
    for i, d in enumerate(docs):
        ids = [world.bos_id] + world.encode(d)
        rows[i, : min(len(ids), cfg.corpus_len)] = ids[: cfg.corpus_len]
    return [rows[i:i + batch] for i in range(0, len(rows), batch)], pad


def make_contexts(model, world, cfg: RomeExperimentConfig) -> list[tuple[int, ...]]:
    """``(bos,)`` plus sampled prefixes ``bos + tokens + "."`` (ROME's context templates)."""
    dot = world.encode(".")
    out = [(world.bos_id,)]
    for i, length in enumerate(cfg.context_lengths):
        out += sample_contexts(model, [world.bos_id], cfg.n_contexts, length, seed=cfg.seed + i, suffix=dot)
    return out


def request_of(record) -> EditRequest:
    """Rewrite prompt = the record's first prompt without its bos (contexts supply it)."""
    p = record.prompts[0]
    return EditRequest(prompts=(tuple(p.ids[1:]),), subject_last=(p.subject_span[1] - 2,),
                       target_new=(record.target_new_id,))


def eval_record(record, prompts: str = "rewrite") -> dict:
    """The record in ``counterfact_scores``' layout.

    ``prompts="rewrite"``: efficacy on the rewrite prompt alone (the edited prompt, as CounterFact's
    efficacy score is defined); ``"templates"``: on the subject's other training templates instead,
    reported separately as ``templates`` (a generalisation score the paper does not have).
    """
    ids = lambda ps: [list(p.ids) for p in ps]  # noqa: E731
    if prompts not in ("rewrite", "templates"):
        raise ValueError(f"prompts must be 'rewrite' or 'templates', got {prompts!r}")
    rewrite = record.prompts[:1] if prompts == "rewrite" else record.prompts[1:]
    return {"prompts": ids(rewrite), "paraphrase_prompts": ids(record.paraphrase_prompts),
            "neighborhood_prompts": ids(record.neighborhood_prompts),
            "target_true": [record.target_true_id], "target_new": [record.target_new_id]}


def record_scores(model, record) -> dict:
    """ES / PS / NS / Score as the paper defines them, plus ``templates``: % of the subject's other
    training-template prompts with P(new) > P(true)."""
    scores = counterfact_scores(model, [eval_record(record)])
    other = eval_record(record, "templates")
    if other["prompts"]:
        lp = target_logprobs(model, other["prompts"], [other["target_true"], other["target_new"]])
        scores["templates"] = 100.0 * float((lp[:, 1] > lp[:, 0]).mean())
    else:
        scores["templates"] = float("nan")
    return scores


def layer_means(edits: Sequence[dict]) -> dict:
    """ES / PS / NS averaged over edits; ``score`` = their harmonic mean (the paper's Score);
    ``edit_score_mean`` = the mean of the per-edit harmonic means."""
    out = {m: float(np.nanmean([e[m] for e in edits])) for m in METRICS[:3] + ("templates",)}
    vals = [out[m] for m in METRICS[:3]]
    out["score"] = float(3.0 / sum(1.0 / max(v, 1e-9) for v in vals)) if all(np.isfinite(vals)) else float("nan")
    out["edit_score_mean"] = float(np.nanmean([e["score"] for e in edits]))
    return out


def rome_config(cfg: RomeExperimentConfig) -> RomeConfig:
    """The library's edit settings from the experiment's."""
    return RomeConfig(target=cfg.target, lr=cfg.lr, steps=cfg.steps, kl_weight=cfg.kl_weight,
                      weight_decay=cfg.weight_decay, clamp=cfg.clamp, insert_key=cfg.insert_key)


def sweep(model, world, records, cfg: RomeExperimentConfig) -> dict:
    layers = cfg.layers if cfg.layers is not None else tuple(range(model.config.n_layers))
    batches, pad = corpus_batches(world, cfg)
    covs = key_covariances(model, layers, batches, target=cfg.target, pad_id=pad)
    contexts = make_contexts(model, world, cfg)
    rc = rome_config(cfg)
    per_layer = {}
    for layer in tqdm(layers, desc="layers"):
        edits = []
        for rec in tqdm(records, desc=f"edits @ layer {layer}", leave=False):
            res = edit(model, request_of(rec), layer, covs[layer], contexts=contexts, config=rc)
            scores = record_scores(res.model, rec)
            edits.append({"subject": rec.subject, "relation": rec.relation, "target_true": rec.target_true,
                          "target_new": rec.target_new, "losses": list(res.losses),
                          "nll_losses": list(res.nll_losses), **scores})
        per_layer[layer] = {"mean": layer_means(edits), "edits": edits}
    return per_layer


SCORES_MEANING = ("% of prompts where the edit wins: efficacy = P(new) > P(true) on the rewrite prompt, paraphrase "
                  "= on paraphrases, neighborhood = P(true) > P(new) on other subjects' prompts (the edit left them "
                  "alone), score = harmonic mean of the three, templates = the subject's other training templates")


def plot(per_layer: dict, baseline: dict, title: str, png: Path) -> None:
    plt = pyplot()

    layers = sorted(per_layer)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    labels = ("efficacy: rewrite prompt, P(new) > P(true)", "paraphrase: P(new) > P(true)",
              "neighborhood: other subjects, P(true) > P(new)", "score: harmonic mean")
    for m, c, label in zip(METRICS, ("tab:blue", "tab:orange", "tab:green", "black"), labels):
        ax.plot(layers, [per_layer[l]["mean"][m] for l in layers], marker="o", color=c, label=label)
        ax.axhline(baseline[m], color=c, ls="--", lw=0.8)
    ax.set_xticks(layers)
    ax.set_xlabel("edited layer")
    ax.set_ylabel("% of prompts")
    ax.set_ylim(-2, 102)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    save_figure(fig, png)


def run(cfg: RomeExperimentConfig, out: Path) -> dict:
    t0 = time.time()
    model, world = load_world_model(cfg.model)
    records = world.counterfact(cfg.n_edits, seed=cfg.seed)
    baseline = layer_means([record_scores(model, r) for r in records])
    per_layer = sweep(model, world, records, cfg)
    best = max(per_layer, key=lambda l: per_layer[l]["mean"]["score"])
    target = cfg.target or ("mlp" if model.family == "gpt2" else "out_proj")
    plot(per_layer, baseline, f"{Path(str(cfg.model)).name}: CounterFact scores of ROME edits on {target} "
         f"(dashed: unedited)", out / "layer_sweep.png")
    results = {"experiment": "rome", "model": str(cfg.model), "family": model.family, "target": target,
               "config": dataclasses.asdict(cfg), "unedited": baseline, "best_layer": best,
               "per_layer": {str(l): v for l, v in per_layer.items()}, "seconds": time.time() - t0}
    shown = METRICS + ("templates",)
    print(f"{SCORES_MEANING}; mean over {len(records)} edits per layer, one edit at a time.")
    print(f"{'layer':>5} " + " ".join(f"{m:>12}" for m in shown))
    print(f"{'none':>5} " + " ".join(f"{baseline[m]:>12.1f}" for m in shown))
    for l in sorted(per_layer):
        print(f"{l:>5} " + " ".join(f"{per_layer[l]['mean'][m]:>12.1f}" for m in shown))
    return results


PRESETS = {"facts-gpt": RomeExperimentConfig, "facts-mamba": RomeExperimentConfig.mamba,
           "smoke": RomeExperimentConfig.smoke}


main = experiment_main("rome", PRESETS, run, doc=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
