"""The SHIFT classification data: an entity's domain (intended) vs the text's lead-in phrase (spurious).

Every text is ``"<lead-in> <shared-relation template with the entity's name>"`` (``"It is said that Cor
rin lives in"``); the shared relations' templates say nothing about the domain, so only the model's
knowledge of the entity tells it. Entities are split disjointly into train / judge / test. The training
split pairs lead ``i`` with domain ``i`` only (perfectly correlated); the oracle, judge and test splits
have both leads for every entity and template (all four cells of the 2x2, equal sizes). Texts are
right-padded with token 0 (causal model: padding never changes real positions) and read through
``weights`` ``[N, T]`` = 1/length on real positions (the mean over positions).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxinterp.experiments.data.facts_world import SHARED, FactsWorld

__all__ = ["Split", "make_splits", "group_counts", "SPLITS"]

SPLITS = ("train", "oracle", "judge", "test")


@dataclasses.dataclass(frozen=True)
class Split:
    """``tokens`` ``[N, T]``, ``weights`` ``[N, T]``, ``y`` (domain index) and ``s`` (lead index) ``[N]``."""

    tokens: np.ndarray
    weights: np.ndarray
    y: np.ndarray
    s: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


def group_counts(split: Split) -> np.ndarray:
    """``[2, 2]``: the number of rows with domain ``i`` and lead ``j``."""
    counts = np.zeros((2, 2), int)
    np.add.at(counts, (split.y, split.s), 1)
    return counts


def _split_entities(world: FactsWorld, domains, n_judge: int, n_test: int, seed: int) -> dict:
    rng = np.random.default_rng([seed, 20])
    parts = {"train": [], "judge": [], "test": []}
    for d, domain in enumerate(domains):
        ents = [e for e in world.entities if e.domain == domain]
        if len(ents) < n_judge + n_test + 2:
            raise ValueError(f"domain {domain!r} has {len(ents)} entities; need n_judge + n_test + 2")
        ents = [ents[i] for i in rng.permutation(len(ents))]
        parts["test"] += [(e, d) for e in ents[:n_test]]
        parts["judge"] += [(e, d) for e in ents[n_test:n_test + n_judge]]
        parts["train"] += [(e, d) for e in ents[n_test + n_judge:]]
    return parts


def _rows(world: FactsWorld, ents, leads, templates: int, correlated: bool) -> list:
    rels = [r for r in world.relations if r.domain == SHARED]
    rows = []
    for e, d in ents:
        for rel in rels:
            for t in rel.templates[:templates]:
                for li, lead in enumerate(leads):
                    if correlated and li != d:
                        continue
                    rows.append((world.encode(f"{lead} {t.format(e.name)}"), d, li))
    return rows


def _pack(rows: list, length: int) -> Split:
    tokens = np.zeros((len(rows), length), np.int32)
    weights = np.zeros((len(rows), length), np.float32)
    for i, (ids, _, _) in enumerate(rows):
        tokens[i, :len(ids)] = ids
        weights[i, :len(ids)] = 1.0 / len(ids)
    return Split(tokens, weights, np.array([r[1] for r in rows], np.int32), np.array([r[2] for r in rows], np.int32))


def make_splits(world: FactsWorld, domains, leads, *, templates: int, n_judge: int, n_test: int,
                seed: int = 0) -> dict[str, Split]:
    """``{"train", "oracle", "judge", "test"}`` splits, all padded to one length."""
    bad = sorted(set(domains) - {e.domain for e in world.entities})
    if bad:
        raise ValueError(f"unknown domains {bad}; choose from {sorted({e.domain for e in world.entities})}")
    ents = _split_entities(world, domains, n_judge, n_test, seed)
    rows = {"train": _rows(world, ents["train"], leads, templates, True),
            "oracle": _rows(world, ents["train"], leads, templates, False),
            "judge": _rows(world, ents["judge"], leads, templates, False),
            "test": _rows(world, ents["test"], leads, templates, False)}
    length = max(len(r[0]) for rs in rows.values() for r in rs)
    return {k: _pack(v, length) for k, v in rows.items()}
