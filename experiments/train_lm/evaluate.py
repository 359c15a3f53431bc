"""Facts-world evaluation: first-token argmax accuracy on fact prompts and in-context copying."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.experiments.data.facts_world import FactsWorld
from jaxinterp.model import Model, run

__all__ = ["argmax_correct", "evaluate_world"]


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
