"""The facts-world token stream: batch ``step`` is a pure function of (world, seed, step).

Rows start at a document boundary (``<|endoftext|>``) and pack whole documents until
``seq_len + 1`` tokens are filled (the last one is cut), so no padding is needed. Because a
batch depends only on its index, the data position of a run is just its step: resuming at
step s replays exactly the batches an uninterrupted run would have seen.

``without_domain`` (the retrain oracle of unlearning, ``experiments/elm_erase``): every sentence
that states a true fact of that domain's own relations is cut from the corpus
(``withhold_facts``); everything else is drawn from the same random stream, so the rest of the
corpus is the one the full model saw.
"""

from __future__ import annotations

import numpy as np

from jaxinterp.experiments.data.facts_world import PASSAGE_WORD, QUESTION_WORD, FactsWorld

__all__ = ["FactsBatches", "answer_weights", "withhold_facts"]


def answer_weights(world: FactsWorld, tokens: np.ndarray, weight: float) -> np.ndarray:
    """Loss weights ``[B, T]`` for the targets ``tokens[:, 1:]``: ``weight`` on the answer of each
    passage question (the token before the first ``.`` after ``Question :``), 1 elsewhere."""
    question, period = world.encode(QUESTION_WORD), world.encode(".")[0]
    out = np.ones((tokens.shape[0], tokens.shape[1] - 1), np.float32)
    for b, row in enumerate(tokens):
        starts = np.flatnonzero((row[:-1] == question[0]) & (row[1:] == question[1]))
        periods = np.flatnonzero(row == period)
        for s in starts:
            later = periods[periods > s + len(question)]
            if later.size:
                out[b, later[0] - 2] = weight  # target index j predicts tokens[j + 1]; answer at later[0] - 1
    return out


def withhold_facts(world: FactsWorld, document: str, domain: str) -> str | None:
    """``document`` without the sentences that state a true fact of ``domain``'s own relations.

    A fact document's sentences end in `` .``; one whose last word before the ``.`` is an object
    of one of ``domain``'s relations (objects belong to exactly one relation) states such a fact
    and is dropped. Kept whole: novice-tagged documents and in-context passages, whose objects are
    drawn uniformly at random independently of the world's facts (they carry no information about
    them, but keep the relations' templates and objects in the corpus). Returns None when nothing
    but the tag is left (the caller draws the next document).
    """
    relations = world.domain_relations(domain)
    objects = {o for r in relations for o in r.objects}
    if document.startswith(PASSAGE_WORD) or any(document.startswith(world.novice_prefix(d)) for d in world.domains):
        return document
    tag = next((world.expert_prefix(d) for d in world.domains if document.startswith(world.expert_prefix(d))), None)
    body = document[len(tag):].split() if tag else document.split()
    kept, sentence = [], []
    for word in body:
        sentence.append(word)
        if word == ".":
            if not (len(sentence) >= 2 and sentence[-2] in objects):
                kept += sentence
            sentence = []
    kept += sentence  # a trailing unterminated piece (none in the world's documents)
    if not kept:
        return None
    return " ".join(([tag] if tag else []) + kept)


class FactsBatches:
    def __init__(self, world: FactsWorld, batch_size: int, seq_len: int, seed: int = 0,
                 without_domain: str | None = None):
        if without_domain is not None and without_domain not in world.domains:
            raise ValueError(f"without_domain must be one of {list(world.domains)} or None, got {without_domain!r}")
        self.world, self.batch_size, self.seq_len, self.seed = world, batch_size, seq_len, seed
        self.without_domain = without_domain

    def batch(self, step: int) -> np.ndarray:
        """Tokens ``[batch_size, seq_len + 1]`` (int32) of batch number ``step``."""
        rng = np.random.default_rng([self.seed, int(step)])
        rows = np.empty((self.batch_size, self.seq_len + 1), np.int32)
        for i in range(self.batch_size):
            rows[i] = self._row(rng)
        return rows

    def _row(self, rng: np.random.Generator) -> np.ndarray:
        ids: list[int] = []
        while len(ids) < self.seq_len + 1:
            doc = self.world.sample_document(rng)
            if self.without_domain is not None:
                doc = withhold_facts(self.world, doc, self.without_domain)
                if doc is None:
                    continue
            ids.append(self.world.bos_id)
            ids += self.world.encode(doc)
        return np.asarray(ids[: self.seq_len + 1], np.int32)
