"""Fact-recall accuracy of a facts-world model: training templates, held-out paraphrases and
in-context copying, overall and per relation.

    jaxinterp recall                                   # facts-gpt
    jaxinterp recall --model path/to/hf_dir --set n_prompts=256

(``jaxinterp recall`` = ``python -m jaxinterp.experiments.recall.main``.) Writes ``results.json``,
``config.json`` and ``recall.png`` to ``--out``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from jaxinterp.experiments.causal_trace.main import load_world_model
from jaxinterp.experiments.common import preset_shortcut, run_experiment
from jaxinterp.experiments.train_lm.evaluate import evaluate_world

MEANING = "accuracy: share of prompts whose argmax next token is the answer's first token"


@dataclasses.dataclass(frozen=True, kw_only=True)
class RecallConfig:
    """``n_prompts`` per split sampled from the world (None: every prompt); ``n_passages`` in-context passages."""

    model: str = "facts-gpt"
    n_prompts: Optional[int] = 64
    n_passages: int = 32
    seed: int = 0

    def __post_init__(self):
        if (self.n_prompts is not None and self.n_prompts < 1) or self.n_passages < 1:
            raise ValueError(f"n_prompts and n_passages must be >= 1, got {self.n_prompts}, {self.n_passages}")


def table(res: dict) -> str:
    rows = [f"{MEANING} (first-token argmax)", f"{'relation':<14} {'train':>7} {'paraphrase':>11}"]
    for rel, acc in res["per_relation"].items():
        fmt = lambda k: f"{acc[k]:.2f}" if k in acc else "-"  # noqa: E731
        rows.append(f"{rel:<14} {fmt('train'):>7} {fmt('paraphrase'):>11}")
    rows.append(f"{'ALL':<14} {res['train_acc']:>7.2f} {res['paraphrase_acc']:>11.2f}")
    rows.append(f"in-context copy accuracy: {res['copy_acc']:.2f} ({res['copy_n']} counterfactual passages)")
    return "\n".join(rows)


def plot(res: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rels = list(res["per_relation"])
    grid = np.array([[res["per_relation"][r].get(s, np.nan) for r in rels] for s in ("train", "paraphrase")])
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(rels)), 3.0))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(rels)), rels, rotation=60, ha="right")
    ax.set_yticks([0, 1], ["train templates", "paraphrases"])
    ax.set_xlabel("relation")
    ax.set_ylabel("prompt set")
    ax.set_title(f"{Path(res['model']).name}: first-token recall accuracy (in-context copy {res['copy_acc']:.2f}; "
                 f"blank: no prompt)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03).set_label("accuracy (fraction)")
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)


def run(cfg: RecallConfig, out: Path) -> dict:
    model, world = load_world_model(cfg.model)
    res = evaluate_world(model, world, n_prompts=cfg.n_prompts, n_passages=cfg.n_passages, seed=cfg.seed)
    res = {"model": cfg.model, "source": str(getattr(model, "source", cfg.model)), "experiment": "recall", **res}
    plot(res, out / "recall.png")
    print(table(res))
    return res


PRESETS = {"facts-gpt": RecallConfig, "facts-mamba": lambda: RecallConfig(model="facts-mamba")}


def main(argv=None, prog=None) -> int:
    return run_experiment("recall", PRESETS, lambda cfg, out, args: run(cfg, out), argv=argv, prog=prog, doc=__doc__,
                          add_arguments=preset_shortcut("--mamba", "facts-mamba"))


if __name__ == "__main__":
    raise SystemExit(main())
