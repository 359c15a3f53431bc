"""ROME layer-sweep experiment settings (frozen, keyword-only; ``--set key=value`` overrides)."""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True, kw_only=True)
class RomeExperimentConfig:
    """Attributes:
      model: any ``ji.load`` source trained on the facts world (``world.json`` next to it).
      layers: edited layers (None = every layer: the layer sweep).
      n_edits: CounterFact records edited (one at a time) per layer.
      target: edit target (a projection of ``jaxinterp.editing.rome.rome_targets(model)`` or its short name; None = the family's default: mlp.down / mixer.out_proj).
      n_contexts / context_lengths: sampled context prefixes per length (ROME: 10 of 5 and 10 of
        10 tokens); the bare prompt is always included.
      corpus_docs / corpus_len: documents from the world's corpus for the key covariance C.
      lr, steps, kl_weight, weight_decay, clamp: ROME's v* optimisation (paper defaults).
      insert_key: key sent exactly to v* (``jaxinterp.editing.rome.RomeConfig``): "bare" (reference repo) or "mean".
    """

    model: str = "facts-gpt"
    layers: Optional[tuple[int, ...]] = None
    n_edits: int = 16
    target: Optional[str] = None
    n_contexts: int = 5
    context_lengths: tuple[int, ...] = (5, 10)
    corpus_docs: int = 256
    corpus_len: int = 64
    lr: float = 0.5
    steps: int = 20
    kl_weight: float = 0.0625
    weight_decay: float = 0.5
    clamp: float = 4.0
    insert_key: str = "bare"
    seed: int = 0

    def __post_init__(self):
        if self.n_edits < 1 or self.corpus_docs < 1:
            raise ValueError("n_edits and corpus_docs must be >= 1")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(l) for l in self.layers))
        object.__setattr__(self, "context_lengths", tuple(self.context_lengths))

    @classmethod
    def mamba(cls, **kw) -> "RomeExperimentConfig":
        return cls(**{"model": "facts-mamba", **kw})

    @classmethod
    def smoke(cls, **kw) -> "RomeExperimentConfig":
        return cls(**{"n_edits": 2, "n_contexts": 1, "context_lengths": (3,), "corpus_docs": 8, "steps": 3, **kw})
