"""Facts-world evaluation: first-token argmax accuracy on fact prompts (training templates and
held-out paraphrases, per relation) and in-context copying. Its command, ``jaxinterp recall``:

    jaxinterp recall                                      # facts-gpt, 64 prompts per split, 32 passages
    jaxinterp recall --model path/to/hf_dir --set n_prompts=none n_passages=256     # every prompt

(= ``python -m jaxinterp.experiments.train_lm.evaluate``) writes ``results.json``, ``config.json``
and ``recall.png`` to ``--out`` (default ``results/recall/<preset>/``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.experiments.common import experiment_main, pyplot, save_figure
from jaxinterp.experiments.data.facts_world import FactsWorld, load_world_model
from jaxinterp.model import Model, run

__all__ = ["argmax_correct", "evaluate_world", "RecallConfig", "main"]


@jax.jit
def _last_argmax(model: Model, tokens: jax.Array, last: jax.Array) -> jax.Array:
    logits = run(model, tokens).logits                       # [B, T, V]
    picked = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]  # [B, V]
    return jnp.argmax(picked, axis=-1)


def argmax_correct(model: Model, items: Sequence, pad_id: int, batch_size: int = 256) -> np.ndarray:
    """Per item (anything with ``.ids`` and ``.answer_id``): is the argmax after the prompt the answer?

    Prompts are right-padded to a common length (causal models ignore what follows), in
    fixed-size batches so one compiled program serves every call of the same length bucket.
    """
    if not items:
        return np.zeros(0, bool)
    width = -(-max(len(it.ids) for it in items) // 16) * 16
    out = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        tokens = np.full((batch_size, width), pad_id, np.int32)
        last = np.zeros(batch_size, np.int32)
        for i, it in enumerate(chunk):
            tokens[i, : len(it.ids)] = it.ids
            last[i] = len(it.ids) - 1
        pred = np.asarray(_last_argmax(model, jnp.asarray(tokens), jnp.asarray(last)))[: len(chunk)]
        out.append(pred == np.array([it.answer_id for it in chunk]))
    return np.concatenate(out)


def _sample(items: list, n: int | None, seed: int) -> list:
    if n is None or n >= len(items):
        return items
    idx = np.random.default_rng(seed).choice(len(items), size=n, replace=False)
    return [items[i] for i in sorted(idx)]


def evaluate_world(model: Model, world: FactsWorld, n_prompts: int | None = None, n_passages: int = 256,
                   seed: int = 0) -> dict:
    """Accuracy on train-template facts, held-out paraphrase templates (overall and per
    relation) and counterfactual in-context passages. ``n_prompts=None`` uses every prompt."""
    results: dict = {"per_relation": {}}
    for split in ("train", "paraphrase"):
        items = _sample(world.fact_prompts(split), n_prompts, seed)
        ok = argmax_correct(model, items, world.pad_id)
        results[f"{split}_acc"] = float(ok.mean())
        results[f"{split}_n"] = len(items)
        for rel in world.relations:
            mask = np.array([it.relation == rel.name for it in items])
            if mask.any():
                results["per_relation"].setdefault(rel.name, {})[split] = float(ok[mask].mean())
    passages = world.context_passages(n_passages, seed=1000 + seed, counterfactual=True)
    results["copy_acc"] = float(argmax_correct(model, passages, world.pad_id).mean())
    results["copy_n"] = len(passages)
    return results


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
    rows = ["accuracy: share of prompts whose argmax next token is the answer's first token",
            f"{'relation':<14} {'train':>7} {'paraphrase':>11}"]
    for rel, acc in res["per_relation"].items():
        fmt = lambda k: f"{acc[k]:.2f}" if k in acc else "-"  # noqa: E731
        rows.append(f"{rel:<14} {fmt('train'):>7} {fmt('paraphrase'):>11}")
    rows.append(f"{'ALL':<14} {res['train_acc']:>7.2f} {res['paraphrase_acc']:>11.2f}")
    rows.append(f"in-context copy accuracy: {res['copy_acc']:.2f} ({res['copy_n']} counterfactual passages)")
    return "\n".join(rows)


def plot(res: dict, png: Path) -> None:
    plt = pyplot()
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
    save_figure(fig, png)


def recall(cfg: RecallConfig, out: Path) -> dict:
    model, world = load_world_model(cfg.model)
    res = evaluate_world(model, world, n_prompts=cfg.n_prompts, n_passages=cfg.n_passages, seed=cfg.seed)
    res = {"model": cfg.model, "source": str(getattr(model, "source", cfg.model)), "experiment": "recall", **res}
    plot(res, out / "recall.png")
    print(table(res))
    return res


PRESETS = {"facts-gpt": RecallConfig, "facts-mamba": lambda: RecallConfig(model="facts-mamba")}
main = experiment_main("recall", PRESETS, recall, doc=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
