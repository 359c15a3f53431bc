"""Settings of the token-erasure experiment (frozen, keyword-only; ``--set key=value`` overrides)."""

from __future__ import annotations

import dataclasses

from jaxinterp.readout.erasure import OFFSETS


@dataclasses.dataclass(frozen=True, kw_only=True)
class ErasureConfig:
    """Attributes:
      model: any ``ji.load`` source with a tokenizer (facts-gpt by default; a Llama/Gemma directory works).
      world: where the facts world's ``world.json`` is read (an embedded model name or a directory); its
        documents are the corpus, its entity names (and words the model's tokenizer splits) the ground truth.
      train_docs / eval_docs: documents the probes train on / the readout is scored on (disjoint seeds).
      seq_len: documents are cut to this many tokens (at a unit boundary).
      layers: hidden layers probed (0 = embeddings .. n_layers); empty = all.
      offsets: probe target offsets (the token at t + i).
      early / late: the layers whose probe probabilities the erasure score compares (paper: 1 and 9 of 32);
        late = -1: the last probed layer.
      max_span: longest span the segmentation scores.
      min_count: a read-out entry must occur this many times in the eval documents.
      steps / batch_size / lr: Adam on the stacked probes (the one training loop, resumable in <out>/probes).
    """

    model: str = "facts-gpt"
    world: str = "facts-gpt"
    train_docs: int = 600
    eval_docs: int = 200
    seq_len: int = 96
    layers: tuple[int, ...] = ()
    offsets: tuple[int, ...] = OFFSETS
    early: int = 1
    late: int = -1
    max_span: int = 6
    min_count: int = 2
    steps: int = 600
    batch_size: int = 1024
    lr: float = 1e-2
    seed: int = 0

    def __post_init__(self):
        for name in ("train_docs", "eval_docs", "steps", "batch_size", "min_count"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len < 4:
            raise ValueError(f"seq_len must be >= 4, got {self.seq_len}")
        if not 2 <= self.max_span <= self.seq_len:
            raise ValueError(f"max_span must be in [2, seq_len={self.seq_len}], got {self.max_span}")
        missing = [i for i in (0, -1, -2) if i not in self.offsets]
        if missing:
            raise ValueError(f"offsets must include 0, -1 and -2 (the erasure score reads them), missing {missing}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")

    @classmethod
    def default(cls, **kw) -> "ErasureConfig":
        return cls(**kw)

    @classmethod
    def smoke(cls, **kw) -> "ErasureConfig":
        """Seconds-long check of the pipeline."""
        return cls(**{**dict(train_docs=40, eval_docs=20, seq_len=48, steps=20, batch_size=256), **kw})
