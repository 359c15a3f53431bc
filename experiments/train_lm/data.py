"""The facts-world token stream: batch ``step`` is a pure function of (world, seed, step).

Rows start at a document boundary (``<|endoftext|>``) and pack whole documents until
``seq_len + 1`` tokens are filled (the last one is cut), so no padding is needed. Because a
batch depends only on its index, the data position of a run is just its step: resuming at
step s replays exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import numpy as np

from jaxinterp.experiments.data.facts_world import FactsWorld

__all__ = ["FactsBatches"]


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
