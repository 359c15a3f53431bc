"""Configuration of the LRE comparison run (frozen, keyword-only, with presets)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, kw_only=True)
class LREConfig:
    """Linear relational embeddings of every relation at every layer, for each model in ``models``.

    Per relation, the LRE is estimated from the first ``n`` subjects (seeded order) under train
    template ``template``; faithfulness and causality are measured on the other subjects. ``beta``
    and ``rank`` are chosen per model and layer from ``betas`` / ``ranks`` by the mean score on the
    ``n`` estimation subjects (never on the held-out ones). ``relations`` empty = every relation.
    """

    models: tuple[str, ...] = ("facts-gpt", "facts-mamba")
    relations: tuple[str, ...] = ()
    n: int = 8
    template: int = 0
    betas: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    ranks: tuple[int, ...] = (4, 8, 16, 32, 64)
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "models", tuple(self.models))
        object.__setattr__(self, "relations", tuple(self.relations))
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        object.__setattr__(self, "ranks", tuple(int(r) for r in self.ranks))
        if not self.models:
            raise ValueError("LREConfig.models must name at least one model")
        if self.n < 2:
            raise ValueError(f"LREConfig.n must be >= 2 (examples averaged), got {self.n}")
        if self.template < 0:
            raise ValueError(f"LREConfig.template must be >= 0, got {self.template}")
        if not self.betas or min(self.betas) <= 0:
            raise ValueError(f"LREConfig.betas must be positive numbers, got {self.betas}")
        if not self.ranks or min(self.ranks) < 1:
            raise ValueError(f"LREConfig.ranks must be positive ints, got {self.ranks}")

    @classmethod
    def default(cls, **kw) -> "LREConfig":
        return cls(**kw)

    @classmethod
    def smoke(cls, **kw) -> "LREConfig":
        """Seconds-long check of the pipeline: two relations, few choices."""
        return cls(**{**dict(relations=("lives_in", "planet"), betas=(1.0, 2.0), ranks=(8, 32)), **kw})
