"""Settings of the DAS experiment (frozen, keyword-only; ``--set key=value`` overrides)."""

from __future__ import annotations

import dataclasses

POSITIONS = ("subject_last", "subject", "final")
MEDIATORS = ("full", "das", "random", "neuron", "neurons_k", "sae_feature")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DASExperimentConfig:
    """Attributes:
      model: any ``ji.load`` source trained on the facts world (``world.json`` next to it).
      relation: the causal variable is this attribute of the subject (``lives_in``: its city); base and
        source are prompts of this relation about subjects with different values (and names of the same
        token length, so the subject spans line up); the counterfactual label is the source's value.
      layers / site: the mediators live at ``blocks.{layer}.{site}``.
      positions: ``subject_last`` (the last subject token), ``subject`` (every subject token, paired in
        order) or ``final`` (the prompt's last token, where the answer is read).
      k: dimension of the DAS subspace, of the random subspace and of the best-k-neurons baseline.
      steps / batch_size / lr: DAS training (``jaxinterp.train.fit``; checkpoints under the output dir).
      train_share: share of the entities whose pairs train (DAS, neuron and feature selection); pairs
        of the others are the held-out test pairs.
      n_train_pairs / n_test_pairs: pairs drawn from each split.
      n_candidates: neurons and SAE latents preselected by how well they separate the variable's values
        (between-value / total variance on training sources), then ranked by training IIA.
      sae_width / sae_k / sae_steps: the TopK SAE trained per layer on the site's activations at every
        token of every fact prompt of the world.
    """

    model: str = "facts-gpt"
    relation: str = "lives_in"
    layers: tuple[int, ...] = (0, 1, 2, 3)
    site: str = "resid_post"
    positions: tuple[str, ...] = POSITIONS
    k: int = 8
    steps: int = 150
    batch_size: int = 64
    lr: float = 1e-2
    train_share: float = 0.5
    n_train_pairs: int = 512
    n_test_pairs: int = 256
    n_candidates: int = 16
    sae_width: int = 512
    sae_k: int = 16
    sae_steps: int = 400
    seed: int = 0

    def __post_init__(self):
        bad = [p for p in self.positions if p not in POSITIONS]
        if bad or not self.positions:
            raise ValueError(f"positions must be a non-empty list of {POSITIONS}, got {list(self.positions)}")
        if not self.layers or min(self.layers) < 0:
            raise ValueError(f"layers must be a non-empty list of layer indices, got {list(self.layers)}")
        if not 0.0 < self.train_share < 1.0:
            raise ValueError(f"train_share must be in (0, 1), got {self.train_share}")
        for name in ("k", "steps", "batch_size", "n_train_pairs", "n_test_pairs", "n_candidates", "sae_width",
                     "sae_k", "sae_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sae_k > self.sae_width:
            raise ValueError(f"sae_k ({self.sae_k}) must be <= sae_width ({self.sae_width})")

    @classmethod
    def default(cls, **kw) -> "DASExperimentConfig":
        return cls(**kw)

    @classmethod
    def smoke(cls, **kw) -> "DASExperimentConfig":
        """Seconds-long check of the pipeline: one layer, two positions, short training."""
        return cls(**{**dict(layers=(1,), positions=("subject_last", "final"), steps=20, n_train_pairs=64,
                             n_test_pairs=64, n_candidates=4, sae_width=128, sae_steps=30), **kw})
