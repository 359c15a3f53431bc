"""The ``jaxinterp`` command: a table of user commands, each an experiment's ``main`` found by module name.

    jaxinterp                          # = jaxinterp trace: causal tracing of facts-gpt (the default run)
    jaxinterp trace --preset facts-mamba
    jaxinterp recall --model path/to/hf_dir
    jaxinterp <command> --help         # presets, --set KEY=VALUE, --list-config, --out, --debug

jaxinterp itself never imports the experiments: ``COMMANDS`` names their modules, loaded with
importlib when a command runs. Adding a command is one line.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from typing import Sequence

__all__ = ["COMMANDS", "DEFAULT", "main"]

COMMANDS: dict[str, tuple[str | None, str]] = {  # name -> (module with main(argv, prog), one-line help)
    "trace": ("jaxinterp.experiments.causal_trace.main",
              "causal tracing (ROME) of known facts: where a model recalls them"),
    "recall": ("jaxinterp.experiments.recall.main", "fact-recall accuracy of a facts-world model"),
    "rome": ("jaxinterp.experiments.rome.main", "ROME fact edits at every layer, scored on a synthetic CounterFact"),
    "sae-boardgame": ("jaxinterp.experiments.sae_boardgame.main",
                      "SAEs of six families on othello-gpt vs a random-init control, board-game metrics"),
    "elm-erase": ("jaxinterp.experiments.elm_erase.main", "erase a domain's facts with ELM, gradient ascent and RMU"),
    "train-lm": ("jaxinterp.experiments.train_lm.main", "train a model on the facts world (resumable, HF export)"),
    "train-othello": ("jaxinterp.experiments.train_othello.main", "train othello-gpt on random legal games"),
    "models": (None, "list the embedded models"),
}
DEFAULT = "trace"  # what a bare `jaxinterp` (or `jaxinterp --flag ...`) runs


def _help() -> str:
    lines = ["usage: jaxinterp [COMMAND] [options]   (no command: trace)", "", "commands:"]
    lines += [f"  {name:<15} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "jaxinterp COMMAND --help shows a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(_help())
        return 0
    if not argv or argv[0].startswith("-"):
        argv = [DEFAULT, *argv]
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=2)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        print(f"jaxinterp: error: unknown command {name!r}{hint} (commands: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    module = COMMANDS[name][0]
    if module is None:  # models
        from jaxinterp.loading import embedded_models

        print("\n".join(embedded_models()))
        return 0
    return importlib.import_module(module).main(rest, prog=f"jaxinterp {name}")


if __name__ == "__main__":
    sys.exit(main())
