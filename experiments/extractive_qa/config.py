"""Settings of the extractive-QA experiment (frozen, keyword-only; ``--set key=value`` overrides)."""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExtractiveQAConfig:
    """Attributes:
      model: a ``ji.load`` source; with no ``data``, a facts-world model (``world.json`` beside it).
      data: a SQuAD-format JSON file (``{"data": [{"paragraphs": [{"context", "qas": [{"id", "question",
        "answers": [{"text", "answer_start"}]}]}]}]}``) used instead of facts-world passages (no memory
        circuit then: the file does not say what the model knows).
      n_circuit: questions of each kind (counterfactual, silent) whose mediation sweeps select the circuits.
      n_eval: held-out questions of each kind for the rates, the attribution table and steering.
      circuit_threshold: a component is in a circuit when its normalised effect (share of the total
        effect of the corruption) is at least this.
      attn_heads: ATTNATTRIB heads: the top context-circuit heads by effect (also the random baseline's count).
      random_draws: draws of random head sets for the random-heads baseline.
      strengths: steering strengths (added to the selected heads' attention scores toward the attributed
        sentence; 0 = unsteered).
      chunk: components per batch of the compiled sweep.
    """

    model: str = "facts-gpt-qa"
    data: Optional[str] = None
    n_circuit: int = 96
    n_eval: int = 128
    circuit_threshold: float = 0.05
    attn_heads: int = 2
    random_draws: int = 20
    strengths: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
    chunk: int = 8
    seed: int = 0

    def __post_init__(self):
        if self.n_circuit < 1 or self.n_eval < 1:
            raise ValueError(f"n_circuit and n_eval must be >= 1, got {self.n_circuit}, {self.n_eval}")
        if not 0.0 < self.circuit_threshold < 1.0:
            raise ValueError(f"circuit_threshold must be in (0, 1), got {self.circuit_threshold}")
        if self.attn_heads < 1 or self.random_draws < 1 or self.chunk < 1:
            raise ValueError("attn_heads, random_draws and chunk must be >= 1")
        if not self.strengths or min(self.strengths) < 0:
            raise ValueError(f"strengths must be a non-empty list of numbers >= 0, got {list(self.strengths)}")
        object.__setattr__(self, "strengths", tuple(float(s) for s in self.strengths))

    @classmethod
    def default(cls, **kw) -> "ExtractiveQAConfig":
        return cls(**kw)

    @classmethod
    def smoke(cls, **kw) -> "ExtractiveQAConfig":
        """Seconds: few questions, two strengths."""
        return cls(**{**dict(n_circuit=8, n_eval=8, random_draws=2, strengths=(0.0, 2.0)), **kw})
