"""Causal-tracing experiment settings (frozen, keyword-only; ``--set key=value`` overrides)."""

from __future__ import annotations

import dataclasses
from typing import Optional

CORRUPTIONS = ("noise", "alt")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TraceExperimentConfig:
    """Attributes:
      model: any ``ji.load`` source trained on the facts world (``world.json`` next to it).
      n_facts: known facts traced (the model's argmax must be the true object, as ROME).
      max_lengths: prompts are grouped by token length (one compiled program per length and
        kind); only the most common lengths are kept.
      n_samples / noise_multiplier: corrupted rows and noise scale (ROME: 10, 3 sigma).
      corruption: ``"noise"`` (ROME) or ``"alt"`` (another subject of the same length, the
        Mamba paper's default).
      window: layers restored per module cell; None = min(10, max(1, L // 2)) (ROME's 10 on
        a 48-layer model would cover all layers of a small one).
      known_only: skip facts the model gets wrong (False only for smoke tests on random models).
      n_examples: per-fact heatmaps drawn.
      n_attribution: facts used for the attribution-vs-activation patching correlation.
      engine / position_buckets: see ``jaxinterp.patching.TraceConfig``.
    """

    model: str = "facts-gpt"
    n_facts: int = 24
    max_lengths: int = 2
    n_samples: int = 10
    noise_multiplier: float = 3.0
    corruption: str = "noise"
    window: Optional[int] = None
    known_only: bool = True
    n_examples: int = 2
    n_attribution: int = 8
    engine: str = "auto"
    position_buckets: int = 1
    seed: int = 0

    def __post_init__(self):
        if self.corruption not in CORRUPTIONS:
            raise ValueError(f"corruption must be one of {CORRUPTIONS}, got {self.corruption!r}")
        for name in ("n_facts", "max_lengths", "n_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be >= 1 or None, got {self.window}")

    @classmethod
    def mamba(cls, **kw) -> "TraceExperimentConfig":
        """facts-mamba with the Mamba paper's alternative-subject corruption."""
        return cls(**{"model": "facts-mamba", "corruption": "alt", **kw})

    @classmethod
    def smoke(cls, **kw) -> "TraceExperimentConfig":
        return cls(**{"n_facts": 3, "max_lengths": 1, "n_samples": 2, "known_only": False, "n_examples": 1,
                      "n_attribution": 2, **kw})
