"""Does a ROME edit carry across phrasings? Per-prompt success split by the words before the subject.

For each edit (paper settings, one layer), every other training-template and paraphrase prompt of
the record is scored (P(new) > P(true)) and put in one of two groups: prompts whose ``frame``
tokens just before the subject equal the rewrite prompt's, and the rest. Prints one JSON object
with each group's success rate and count, plus every prompt's outcome.

    python -m jaxinterp.experiments.rome.frames --mamba --layer 0 --n-edits 8
    python -m jaxinterp.experiments.rome.frames --layer 1            # facts-gpt
"""

from __future__ import annotations

import argparse
import json
from typing import Sequence

import numpy as np

from jaxinterp.experiments.causal_trace.main import load_world_model
from jaxinterp.experiments.rome.config import RomeExperimentConfig
from jaxinterp.experiments.rome.main import corpus_batches, make_contexts, request_of, rome_config
from jaxinterp.editing.rome import edit, key_covariances, target_logprobs


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


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="any ji.load source of a facts-world model (default facts-gpt)")
    p.add_argument("--mamba", action="store_true", help="facts-mamba (out_proj by default)")
    p.add_argument("--target", default=None, help="edit target (jaxinterp.editing.rome.rome_targets(model))")
    p.add_argument("--layer", type=int, default=0)
    p.add_argument("--n-edits", type=int, default=8)
    p.add_argument("--frame-tokens", type=int, default=2, help="tokens before the subject that define the frame")
    args = p.parse_args(argv)
    make = RomeExperimentConfig.mamba if args.mamba else RomeExperimentConfig.gpt
    kw = {"n_edits": args.n_edits, "target": args.target}
    if args.model:
        kw["model"] = args.model
    res = frame_split(make(**kw), args.layer, args.frame_tokens)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
