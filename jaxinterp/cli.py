"""The ``jaxinterp`` command: a table of user commands, each an experiment module's ``main(argv, prog)``,
imported by name when it runs (so jaxinterp never imports the experiments). ``jaxinterp`` alone runs
``trace`` (causal tracing of facts-gpt); ``jaxinterp COMMAND --help`` shows a command's options.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from typing import Sequence

__all__ = ["COMMANDS", "DEFAULT", "main"]

COMMANDS = {  # name -> (module, one-line help); module None: `models`
    "trace": ("jaxinterp.experiments.causal_trace.main", "causal tracing (ROME): where a model recalls known facts"),
    "recall": ("jaxinterp.experiments.train_lm.evaluate", "fact-recall accuracy of a facts-world model"),
    "rome": ("jaxinterp.experiments.rome.main", "ROME fact edits at every layer, scored on a synthetic CounterFact"),
    "sae-boardgame": ("jaxinterp.experiments.sae_boardgame.main", "SAEs of six families on othello-gpt vs a "
                      "random-init control, board-game metrics"),
    "sae-dashboard": ("jaxinterp.experiments.sae_dashboard.main", "an SAE on facts-gpt and its feature dashboard"),
    "train-saes": ("jaxinterp.experiments.train_saes.main", "SAEs for every layer of the embedded facts-world models, "
                   "trained from one harvest"),
    "circuits": ("jaxinterp.experiments.circuits.main", "sparse feature circuits vs neuron circuits for two "
                 "facts-world behaviours"),
    "behaviours": ("jaxinterp.experiments.behaviours.main", "unsupervised behaviours: contexts clustered by loss "
                   "gradients, a feature circuit per cluster, an HTML index"),
    "shift": ("jaxinterp.experiments.shift.main", "SHIFT: ablate SAE features a judge calls spurious to fix a "
              "facts-gpt domain classifier (six rows)"),
    "steer": ("jaxinterp.experiments.steering.main", "steering vectors on facts-gpt: attribute change vs recall "
              "drop over scales"),
    "extractive-qa": ("jaxinterp.experiments.extractive_qa.main", "extractive-QA circuits (context vs memory), "
                      "ATTNATTRIB attribution and steering toward the context"),
    "lens": ("jaxinterp.experiments.lens.main", "logit lens vs tuned lens (KL-to-final per layer) on facts-gpt"),
    "lre": ("jaxinterp.experiments.lre.main", "linear relational embeddings per relation and layer: the "
            "facts-world transformer vs state-space model"),
    "token-erasure": ("jaxinterp.experiments.token_erasure.main", "token-erasure probes and the implicit-vocabulary "
                      "readout on facts-gpt vs frequent n-grams"),
    "das": ("jaxinterp.experiments.das.main", "learned subspace mediators (DAS) vs neurons, SAE latents, full "
            "patching: IIA per layer"),
    "elm-erase": ("jaxinterp.experiments.elm_erase.main", "erase a domain's facts with ELM, gradient ascent and RMU"),
    "train-lm": ("jaxinterp.experiments.train_lm.main", "train a model on the facts world (resumable, HF export)"),
    "train-othello": ("jaxinterp.experiments.train_othello.main", "train othello-gpt on random legal games"),
    "serve": ("jaxinterp.remote.server", "serve a model over HTTP: runs with captures and interventions sent as data"),
    "models": (None, "list the embedded models"),
}
DEFAULT = "trace"  # what a bare `jaxinterp` (or `jaxinterp --flag ...`) runs


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print("usage: jaxinterp [COMMAND] [options]   (no command: trace)\n\ncommands:\n"
              + "".join(f"  {name:<15} {text}\n" for name, (_, text) in COMMANDS.items())
              + "\njaxinterp COMMAND --help shows a command's options.")
        return 0
    name, rest = (argv[0], argv[1:]) if argv and not argv[0].startswith("-") else (DEFAULT, argv)
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=2)
        print(f"jaxinterp: error: unknown command {name!r}" + (f"; did you mean {' or '.join(close)}?" if close else "")
              + f" (commands: {', '.join(COMMANDS)})", file=sys.stderr)
        return 2
    if COMMANDS[name][0] is None:
        from jaxinterp.loading import embedded_models

        print("\n".join(embedded_models()))
        return 0
    return importlib.import_module(COMMANDS[name][0]).main(rest, prog=f"jaxinterp {name}")


if __name__ == "__main__":
    sys.exit(main())
