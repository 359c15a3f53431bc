"""Facts-world behaviours as (clean, patch) prompt pairs of one length, and the logit-difference metric.

* ``recall``: ``"<subject> lives in"`` -> the subject's city; the patch prompt has another subject of
  the same name length under the same template whose answer differs (which subject the prompt
  names decides the answer: the model's stored facts).
* ``copy``: a two-sentence counterfactual passage, then a question about one sentence; the patch
  passage differs only in that sentence's object token (the answer must be copied from the context).

Every pair keeps its positions aligned (same length, same template), so per-position means are
meaningful; only pairs the model answers correctly on both sides are kept.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxinterp.experiments.data.facts_world import FactsWorld

__all__ = ["Task", "logit_diff", "recall_task", "copy_task", "TASKS"]


@dataclasses.dataclass(frozen=True)
class Task:
    """``clean``/``patch`` ``[N, T]`` token ids; ``good``/``bad`` ``[N]``: the clean / patch answers."""

    name: str
    clean: np.ndarray
    patch: np.ndarray
    good: np.ndarray
    bad: np.ndarray
    description: str

    def take(self, idx) -> "Task":
        return dataclasses.replace(self, clean=self.clean[idx], patch=self.patch[idx], good=self.good[idx],
                                   bad=self.bad[idx])

    def split(self, n_train: int) -> tuple["Task", "Task"]:
        n = len(self.clean)
        if n < n_train + 8:
            raise ValueError(f"task {self.name!r} has {n} pairs; need {n_train} for discovery and >= 8 held out")
        return self.take(np.arange(n_train)), self.take(np.arange(n_train, n))


def logit_diff(logits, good, bad):
    """Mean over rows of ``logit[good] - logit[bad]`` (``logits [B, V]`` at the last position)."""
    rows = jnp.arange(logits.shape[0])
    return jnp.mean(logits[rows, good] - logits[rows, bad])


def _most_common_length(items: list, key) -> list:
    lengths = np.array([len(key(x)) for x in items])
    values, counts = np.unique(lengths, return_counts=True)
    best = values[np.argmax(counts)]
    return [x for x, n in zip(items, lengths) if n == best]


def _correct(model, clean, patch, good, bad) -> np.ndarray:
    """Rows the model answers right on both sides (argmax = good on clean, = bad on patch)."""
    fwd = jax.jit(lambda m, t: jnp.argmax(m.run(t, logits_at=-1).logits, -1))
    a = np.concatenate([np.asarray(fwd(model, jnp.asarray(clean[i:i + 256]))) for i in range(0, len(clean), 256)])
    b = np.concatenate([np.asarray(fwd(model, jnp.asarray(patch[i:i + 256]))) for i in range(0, len(patch), 256)])
    return (a == good) & (b == bad)


def _finish(name, model, rows, description, n, seed) -> Task:
    clean, patch, good, bad = (np.array([r[i] for r in rows]) for i in range(4))
    ok = _correct(model, clean, patch, good, bad)
    idx = np.flatnonzero(ok)
    idx = np.random.default_rng(seed).permutation(idx)[:n]
    return Task(name, clean[idx].astype(np.int32), patch[idx].astype(np.int32), good[idx].astype(np.int32),
                bad[idx].astype(np.int32), description)


def recall_task(model, world: FactsWorld, n: int, seed: int = 0) -> Task:
    """Fact recall with a counterfactual subject (train templates of every relation)."""
    prompts = _most_common_length(world.fact_prompts("train"), key=lambda p: p.ids)
    groups: dict = {}
    for p in prompts:
        groups.setdefault((p.relation, p.template, p.subject_span), []).append(p)
    rng = np.random.default_rng([seed, 1])
    rows = []
    for p in prompts:
        others = [q for q in groups[(p.relation, p.template, p.subject_span)] if q.answer_id != p.answer_id]
        if others:
            q = others[rng.integers(len(others))]
            rows.append((p.ids, q.ids, p.answer_id, q.answer_id))
    return _finish("recall", model, rows, "fact recall: which subject the prompt names decides the answer "
                   "(patch: another subject, same template and name length)", n, seed)


def copy_task(model, world: FactsWorld, n: int, seed: int = 0) -> Task:
    """In-context copy: two-sentence counterfactual passages; the patch changes the answer sentence's object."""
    short = FactsWorld(dataclasses.replace(world.config, passage_sentences=(2, 2)))
    passages = _most_common_length(short.context_passages(8 * n, seed=seed), key=lambda c: c.ids)
    rng = np.random.default_rng([seed, 2])
    rows = []
    for c in passages:
        objs = short.object_ids(c.relation)
        options = [o for o in objs if o != c.answer_id and o not in c.ids]
        if options:
            b = int(options[rng.integers(len(options))])
            patch = list(c.ids)
            patch[c.answer_position] = b
            rows.append((c.ids, tuple(patch), c.answer_id, b))
    return _finish("copy", model, rows, "in-context copy: the answer is the object of the passage sentence the "
                   "question repeats (patch: that object replaced)", n, seed)


TASKS = {"recall": recall_task, "copy": copy_task}
