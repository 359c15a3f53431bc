"""Configuration of the SAE feature-dashboard run (frozen, keyword-only, with presets)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, kw_only=True)
class SAEDashboardConfig:
    """An SAE on one site of a facts-world model (trained here unless ``sae`` names one) and its dashboard.

    Token rows are facts-world documents packed into ``seq_len`` tokens (``FactsBatches``);
    the SAE trains on ``train_rows`` rows and the dashboard reads ``rows`` other rows.
    """

    model: str = "facts-gpt"
    site: str = "blocks.2.resid_post"
    sae: str | None = None  # an SAE directory / file for ji.sae.load; None: train a TopK SAE
    rows: int = 256
    seq_len: int = 64
    train_rows: int = 2048
    expansion: int = 4
    k: int = 16
    steps: int = 1500
    batch_size: int = 1024
    lr: float = 1e-3
    n_features: int = 48
    top_contexts: int = 8
    seed: int = 0

    def __post_init__(self):
        for name in ("rows", "seq_len", "train_rows", "expansion", "k", "steps", "batch_size", "n_features",
                     "top_contexts"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SAEDashboardConfig.{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")

    @classmethod
    def default(cls, **kw) -> "SAEDashboardConfig":
        return cls(**kw)

    @classmethod
    def smoke(cls, **kw) -> "SAEDashboardConfig":
        """Seconds-long check of the pipeline."""
        return cls(**{**dict(rows=32, train_rows=64, steps=20, batch_size=256, n_features=8), **kw})
