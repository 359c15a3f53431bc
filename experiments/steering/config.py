"""Settings of the steering experiment (frozen, keyword-only; ``--set key=value`` overrides)."""

from __future__ import annotations

import dataclasses

CONTRASTS = ("recall", "answer")
WHERE = ("all", "prompt", "generated")


@dataclasses.dataclass(frozen=True, kw_only=True)
class SteeringConfig:
    """Attributes:
      model: any ``ji.load`` source trained on the facts world (``world.json`` next to it).
      relation / target: steer the answers of ``relation`` toward the object ``target``.
      layers: the vector is read and added at ``blocks.{layer}.resid_post`` for each of these.
      scales: multiples of the raw mean-difference vector swept (0 = the unsteered model).
      contrasts: how the vector is built (``ji.steering.mean_difference`` at the last token):
        ``"recall"``: prompts of the relation whose subject has the target minus prompts whose
        subject has another object, read where the model predicts the answer;
        ``"answer"``: CAA's pairs, the prompt followed by the target minus the prompt followed by
        the subject's true object, read at that answer token.
      where: positions the vector is added at (``ji.Steer``); the first answer token is predicted
        at the prompt's last position, so ``"generated"`` cannot change it.
      vector_share: share of the entities whose prompts build the vector; the rest are evaluated.
      free_tokens: length of the free continuations of each evaluated subject's name (mention rate).
      n_examples: evaluated subjects (one prompt each) whose continuations, unsteered and steered, are
        kept as text in results.json.
    """

    model: str = "facts-gpt"
    relation: str = "color"
    target: str = "red"
    layers: tuple[int, ...] = (0, 1, 2, 3)
    scales: tuple[float, ...] = (0.0, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0)
    contrasts: tuple[str, ...] = CONTRASTS
    where: str = "all"
    vector_share: float = 0.5
    free_tokens: int = 12
    n_examples: int = 4
    seed: int = 0

    def __post_init__(self):
        bad = [c for c in self.contrasts if c not in CONTRASTS]
        if bad or not self.contrasts:
            raise ValueError(f"contrasts must be a non-empty list of {CONTRASTS}, got {list(self.contrasts)}")
        if self.where not in WHERE:
            raise ValueError(f"where must be one of {WHERE}, got {self.where!r}")
        if not self.layers or min(self.layers) < 0:
            raise ValueError(f"layers must be a non-empty list of layer indices, got {list(self.layers)}")
        if not self.scales or min(self.scales) < 0:
            raise ValueError(f"scales must be a non-empty list of numbers >= 0, got {list(self.scales)}")
        if not 0.0 < self.vector_share < 1.0:
            raise ValueError(f"vector_share must be in (0, 1), got {self.vector_share}")
        if self.free_tokens < 1 or self.n_examples < 0:
            raise ValueError("free_tokens must be >= 1 and n_examples >= 0")

    @classmethod
    def default(cls, **kw) -> "SteeringConfig":
        return cls(**kw)

    @classmethod
    def smoke(cls, **kw) -> "SteeringConfig":
        """Seconds-long check of the pipeline: one layer, three scales, one contrast."""
        return cls(**{**dict(layers=(2,), scales=(0.0, 1.0, 3.0), contrasts=("recall",), free_tokens=4,
                             n_examples=1), **kw})
