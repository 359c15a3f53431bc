"""Reproduce the shipped facts-world models: train, evaluate on every prompt, write the model card.

    python -m jaxinterp.experiments.train_lm.make_embedded facts-gpt facts-mamba
    python -m jaxinterp.experiments.train_lm.make_embedded facts-gpt --from-run results/train_lm/facts-gpt

Each model is trained with ``train_lm.main --preset <name>`` (resumable; output under
``results/train_lm/<name>``), after the stages of its curriculum (``config.CURRICULA``; each
under ``results/train_lm/<name>-<stage>``, each fine-tuning the previous export), then its
export is copied to ``models/embedded/<name>/`` with a README.md model card (held-out
paraphrase and in-context copy accuracy, per relation).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from jaxinterp.experiments.data.facts_world import FactsWorld
from jaxinterp.experiments.train_lm import main as train_main
from jaxinterp.experiments.train_lm.config import CURRICULA

EMBEDDED = Path(__file__).resolve().parents[2] / "models" / "embedded"
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
         "world.json")


def _origin(cfg: dict) -> str:
    src = cfg["train"].get("init_from")
    if src is None:
        return "trained from\nscratch"
    return f"fine-tuned from `{src}` (weights\nloaded with `ji.load`, fresh optimizer)"


def _mix(cfg: dict) -> str:
    w = cfg["data"]["world"]
    mix = (f"corpus mix p_passage={w['p_passage']}, passage_questions={w['passage_questions']}, "
           f"p_tagged={w['p_tagged']}")
    without = cfg["data"].get("without_domain")
    if without:
        mix += (f"; every sentence stating a true fact of the {without} domain's own relations cut from the corpus, "
                f"`data.without_domain={without}`")
    return mix


def _decay(cfg: dict) -> str:
    frac = cfg["optim"]["end_lr_frac"]
    return "then constant" if frac == 1.0 else f"cosine to\n{frac} x lr"


def model_card(name: str, results: dict, command: str, notes: str = "") -> str:
    ev, cfg = results["eval"], results["config"]
    rows = "\n".join(f"| {rel} | {acc.get('train', float('nan')):.3f} | {acc.get('paraphrase', float('nan')):.3f} |"
                     for rel, acc in ev["per_relation"].items())
    args = ", ".join(f"{k}={v}" for k, v in cfg["model"]["args"].items())
    return f"""# {name}

A {cfg['model']['family']} model ({args}; {results['num_params']:,} parameters, float32)
{_origin(cfg)} on the synthetic facts world (`jaxinterp.experiments.data.facts_world`, config in
`world.json`: rebuild it with `FactsWorld.from_dir(<this dir>)`). Word-level tokenizer in
`tokenizer.json`; prompts are fed as `<|endoftext|>` + text. Loads with `ji.load("{name}")` and
with `transformers` (`AutoModelForCausalLM.from_pretrained(<this dir>)`).

## Accuracy (first-token argmax, every fact of the world)

The facts are arbitrary, so "held-out" means held-out *templates*: the paraphrase templates
never occur in the training corpus.

| metric | accuracy | n |
|---|---|---|
| training-template fact prompts | {ev['train_acc']:.3f} | {ev['train_n']} |
| held-out paraphrase prompts | {ev['paraphrase_acc']:.3f} | {ev['paraphrase_n']} |
| in-context copy (counterfactual passages) | {ev['copy_acc']:.3f} | {ev['copy_n']} |

Per relation:

| relation | train templates | paraphrases |
|---|---|---|
{rows}

## Training

{cfg['train']['steps']} steps of batch {cfg['data']['batch_size']} x {cfg['data']['seq_len']} tokens
({_mix(cfg)}), AdamW (lr {cfg['optim']['lr']}, warmup {cfg['optim']['warmup_steps']}, {_decay(cfg)},
weight decay {cfg['optim']['weight_decay']}, clip {cfg['optim']['clip_norm']}),
{results['train_seconds']:.0f} s on a shared 2-core CPU. Reproduce with

    {command}
""" + (f"\n{notes.strip()}\n" if notes.strip() else "")


def ship(name: str, run_dir: Path, command: str, notes: str = "") -> Path:
    results = json.loads((run_dir / "results.json").read_text())
    world = FactsWorld.from_dir(run_dir / "export")
    if results["eval"]["train_n"] != len(world.fact_prompts("train")):
        raise ValueError(f"{run_dir}/results.json holds a sampled evaluation; the card needs every prompt")
    dest = EMBEDDED / name
    dest.mkdir(parents=True, exist_ok=True)
    for f in FILES:
        shutil.copy(run_dir / "export" / f, dest / f)
    (dest / "README.md").write_text(model_card(name, results, command, notes))
    return dest


def _stage_argvs(name: str, run_dir: Path) -> list[list[str]]:
    """``train_lm.main`` argument lists: the curriculum's stages, then the preset itself."""
    argvs, source = [], None
    for stage, overrides in CURRICULA.get(name, []):
        out = run_dir.parent / f"{name}-{stage}"
        argvs.append(["--preset", name, *[a for o in overrides for a in ("--set", o)],
                      *(["--init-from", str(source)] if source else []), "--out", str(out)])
        source = out / "export"
    argvs.append(["--preset", name, *(["--init-from", str(source)] if source else []), "--out", str(run_dir)])
    return argvs


def _commands(name: str, run_dir: Path) -> str:
    lines = ["python -m jaxinterp.experiments.train_lm.main " + " ".join(argv) for argv in _stage_argvs(name, run_dir)]
    return ("\n    ".join(lines) + "\n    # or, every stage and the shipping in one go:\n"
            f"    python -m jaxinterp.experiments.train_lm.make_embedded {name}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="+", choices=["facts-gpt", "facts-gpt-oracle", "facts-mamba"])
    p.add_argument("--from-run", type=Path, default=None, help="ship an existing run dir instead of training")
    p.add_argument("--command", default=None, help="the reproducing command(s) for the card (default: the preset's)")
    p.add_argument("--notes", type=Path, default=None, 
                   help="markdown file appended to the card (e.g. training history)")
    args = p.parse_args(argv)
    for name in args.names:
        run_dir = args.from_run or Path("results") / "train_lm" / name
        command = args.command or _commands(name, Path("results") / "train_lm" / name)
        if args.from_run is None:
            for argv in _stage_argvs(name, run_dir):
                if train_main.main(argv):
                    raise SystemExit(f"training failed: train_lm.main {' '.join(argv)}")
        notes = args.notes.read_text() if args.notes else ""
        print(f"shipped {ship(name, run_dir, command, notes)}")


if __name__ == "__main__":
    main(sys.argv[1:])
