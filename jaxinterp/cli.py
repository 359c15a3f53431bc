"""The ``jaxinterp`` command line (the main job).

    jaxinterp                          # = jaxinterp run: the default experiment (causal tracing) on facts-gpt
    jaxinterp trace --mamba            # causal tracing of facts-mamba (alt-subject corruption)
    jaxinterp run --model facts-mamba --out results/mamba
    jaxinterp recall --model path/to/hf_dir --n 64
    jaxinterp models                   # the embedded models

Each subcommand is a ``Command`` (an ``add_arguments(parser)`` and a ``main(args) -> int``)
registered in ``COMMANDS``. ``jaxinterp run`` (also what a bare ``jaxinterp`` does) runs the
command named by ``DEFAULT_RUN`` with that command's defaults; adding an experiment is one
function pair plus one ``register`` call, and making it the default is one line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["Command", "COMMANDS", "DEFAULT_RUN", "register", "main"]


@dataclasses.dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    main: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}
DEFAULT_RUN = "trace"  # what `jaxinterp` / `jaxinterp run` runs


def register(name: str, command: Command) -> Command:
    COMMANDS[name] = command
    return command


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="facts-gpt",
                   help="any ji.load source: an embedded name, a local HF directory, or a hub id (default facts-gpt)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default results/<model name>)")


def _out_dir(args: argparse.Namespace) -> Path:
    out = args.out or Path("results") / Path(str(args.model)).name
    out.mkdir(parents=True, exist_ok=True)
    return out


# recall ------------------------------------------------------------------------------------------
def _recall_arguments(p: argparse.ArgumentParser) -> None:
    _model_args(p)
    p.add_argument("--n", type=int, default=64, help="prompts per split sampled from the world (default 64)")
    p.add_argument("--passages", type=int, default=32, help="in-context copy passages (default 32)")
    p.add_argument("--seed", type=int, default=0)


def _recall_main(args: argparse.Namespace) -> int:
    import jaxinterp as ji
    from jaxinterp.experiments.data.facts_world import FactsWorld
    from jaxinterp.experiments.train_lm.evaluate import evaluate_world

    model = ji.load(args.model)
    source = Path(getattr(model, "source", str(args.model)))
    if not (source / "world.json").exists():
        print(f"error: {args.model!r} has no world.json; fact recall needs a model trained on the facts world "
              f"(embedded: {ji.embedded_models()})", file=sys.stderr)
        return 2
    world = FactsWorld.from_dir(source)
    res = evaluate_world(model, world, n_prompts=args.n, n_passages=args.passages, seed=args.seed)
    out = _out_dir(args)
    res = {"model": str(args.model), "source": str(source), "experiment": "recall", **res}
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    _plot_recall(res, out / "recall.png")
    print(_recall_table(res))
    print(f"wrote {out / 'results.json'} and {out / 'recall.png'}")
    return 0


def _recall_table(res: dict) -> str:
    rows = [f"{'relation':<14} {'train':>7} {'paraphrase':>11}"]
    for rel, acc in res["per_relation"].items():
        fmt = lambda k: f"{acc[k]:.2f}" if k in acc else "-"
        rows.append(f"{rel:<14} {fmt('train'):>7} {fmt('paraphrase'):>11}")
    rows.append(f"{'ALL':<14} {res['train_acc']:>7.2f} {res['paraphrase_acc']:>11.2f}")
    rows.append(f"in-context copy accuracy: {res['copy_acc']:.2f} ({res['copy_n']} counterfactual passages)")
    return "\n".join(rows)


def _plot_recall(res: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rels = list(res["per_relation"])
    grid = np.array([[res["per_relation"][r].get(s, np.nan) for r in rels] for s in ("train", "paraphrase")])
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(rels)), 2.6))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(rels)), rels, rotation=60, ha="right")
    ax.set_yticks([0, 1], ["train", "paraphrase"])
    ax.set_title(f"{res['model']}: first-token recall (copy {res['copy_acc']:.2f})")
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


# models -------------------------------------------------------------------------------------------
def _models_main(args: argparse.Namespace) -> int:
    import jaxinterp as ji

    for name in ji.embedded_models():
        print(name)
    return 0


# trace --------------------------------------------------------------------------------------------
def _trace_arguments(p: argparse.ArgumentParser) -> None:
    from jaxinterp.experiments.causal_trace.main import add_arguments

    add_arguments(p)


def _trace_main(args: argparse.Namespace) -> int:
    from jaxinterp.experiments.causal_trace.main import config_from_args, run

    run(config_from_args(args))
    return 0


register("recall", Command("fact-recall accuracy of a facts-world model (train / paraphrase / in-context)",
                           _recall_arguments, _recall_main))
register("trace", Command("causal tracing (ROME) of known facts: AIE tables, heatmaps, knockout, attribution",
                          _trace_arguments, _trace_main))
register("models", Command("list the embedded models", lambda p: None, _models_main))


# entry point --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxinterp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help=f"the default experiment (currently: {DEFAULT_RUN})")
    COMMANDS[DEFAULT_RUN].add_arguments(run)
    for name, cmd in COMMANDS.items():
        cmd.add_arguments(sub.add_parser(name, help=cmd.help))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["run", *argv]
    args = build_parser().parse_args(argv)
    name = DEFAULT_RUN if args.command == "run" else args.command
    return COMMANDS[name].main(args)


if __name__ == "__main__":
    sys.exit(main())
