"""The facts-world token stream: batch ``step`` is a pure function of (world, seed, step).

Rows start at a document boundary (``<|endoftext|>``) and pack whole documents until
``seq_len + 1`` tokens are filled (the last one is cut), so no padding is needed. Because a
batch depends only on its index, the data position of a run is just its step: resuming at
step s replays exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import numpy as np

from jaxinterp.experiments.data.facts_world import QUESTION_WORD, FactsWorld

__all__ = ["FactsBatches", "answer_weights"]


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


class FactsBatches:
    def __init__(self, world: FactsWorld, batch_size: int, seq_len: int, seed: int = 0):
        self.world, self.batch_size, self.seq_len, self.seed = world, batch_size, seq_len, seed

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
            ids.append(self.world.bos_id)
            ids += self.world.encode(self.world.sample_document(rng))
        return np.asarray(ids[: self.seq_len + 1], np.int32)
