"""Does a ROME edit carry across phrasings? Per-prompt success split by the words before the subject.

For each edit (paper settings, one layer), every other training-template and paraphrase prompt of
the record is scored (P(new) > P(true)) and put in one of two groups: prompts whose ``frame``
tokens just before the subject equal the rewrite prompt's, and the rest. Writes one JSON object
with each group's success rate and count, plus every prompt's outcome (``results.json``).

    python -m jaxinterp.experiments.rome.frames --preset facts-mamba --set layer=0
    python -m jaxinterp.experiments.rome.frames --set layer=1            # facts-gpt
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from jaxinterp.experiments.common import experiment_main
from jaxinterp.experiments.data.facts_world import load_world_model
from jaxinterp.experiments.rome.config import RomeExperimentConfig
from jaxinterp.experiments.rome.main import corpus_batches, make_contexts, request_of, rome_config
from jaxinterp.editing.rome import edit, key_covariances, target_logprobs


@dataclasses.dataclass(frozen=True, kw_only=True)
class FramesConfig(RomeExperimentConfig):
    """The ROME settings plus the edited ``layer`` and ``frame_tokens`` (tokens before the subject)."""

    n_edits: int = 8
    layer: int = 0
    frame_tokens: int = 2


def frame(prompt, n: int) -> tuple[int, ...]:
    """The ``n`` tokens before the subject (fewer at the start of the prompt)."""
    start = prompt.subject_span[0]
    return tuple(prompt.ids[max(0, start - n):start])


def frame_split(cfg: RomeExperimentConfig, layer: int, n_frame: int = 2) -> dict:
    model, world = load_world_model(cfg.model)
    if not 0 <= layer < model.config.n_layers:
        raise ValueError(f"layer must lie in [0, {model.config.n_layers}), got {layer}")
    records = world.counterfact(cfg.n_edits, seed=cfg.seed)
    batches, pad = corpus_batches(world, cfg)
    cov = key_covariances(model, [layer], batches, target=cfg.target, pad_id=pad)[layer]
    contexts = make_contexts(model, world, cfg)
    rc = rome_config(cfg)
    rows = []
    for rec in records:
        edited = edit(model, request_of(rec), layer, cov, contexts=contexts, config=rc).model
        rewrite = rec.prompts[0]
        prompts = [("template", p) for p in rec.prompts[1:]] + [("paraphrase", p) for p in rec.paraphrase_prompts]
        lp = target_logprobs(edited, [list(p.ids) for _, p in prompts], [[rec.target_true_id], [rec.target_new_id]])
        for (kind, p), (true, new) in zip(prompts, lp):
            rows.append({"subject": rec.subject, "kind": kind, "prompt": world.decode(p.ids[1:]),
                         "same_frame": frame(p, n_frame) == frame(rewrite, n_frame), "success": bool(new > true)})

    def group(same: bool) -> dict:
        hits = [r["success"] for r in rows if r["same_frame"] == same]
        return {"success": float(np.mean(hits)) if hits else float("nan"), "n": len(hits)}

    return {"model": str(cfg.model), "layer": layer, "target": cfg.target, "frame_tokens": n_frame,
            "same_frame": group(True), "other_frame": group(False), "prompts": rows}


def run(cfg: FramesConfig, out: Path) -> dict:
    res = frame_split(cfg, cfg.layer, cfg.frame_tokens)
    print(f"success = % of a record's other prompts where the edited model prefers the new object (P(new) > "
          f"P(true)); frame = the {cfg.frame_tokens} tokens before the subject")
    for group in ("same_frame", "other_frame"):
        print(f"{group.replace('_', ' ')}: success {100 * res[group]['success']:.1f}% of {res[group]['n']} prompts")
    return res


PRESETS = {"facts-gpt": FramesConfig, "facts-mamba": lambda: FramesConfig(model="facts-mamba")}


main = experiment_main("rome_frames", PRESETS, run, doc=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
