"""Configuration of the logit-lens vs tuned-lens run (frozen, keyword-only, with presets)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, kw_only=True)
class LensConfig:
    """Logit and tuned lens on every layer of a facts-world model.

    The tuned lens trains on ``train_rows`` packed facts-world rows of ``seq_len`` tokens
    (``steps`` Adam steps over batches of ``batch_rows``, a checkpoint every ``save_every`` steps in
    ``<out>/ckpt``: a killed run re-run with the same command resumes there); KL-to-final is measured
    on ``rows`` other rows, over every position but the documents' BOS tokens.
    """

    model: str = "facts-gpt"
    rows: int = 256
    train_rows: int = 1024
    seq_len: int = 64
    batch_rows: int = 64
    steps: int = 300
    lr: float = 1e-3
    save_every: int = 50
    seed: int = 0

    def __post_init__(self):
        for name in ("rows", "train_rows", "seq_len", "batch_rows", "steps", "save_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"LensConfig.{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")

    @classmethod
    def default(cls, **kw) -> "LensConfig":
        return cls(**kw)

    @classmethod
    def smoke(cls, **kw) -> "LensConfig":
        """Seconds-long check of the pipeline."""
        return cls(**{**dict(rows=16, train_rows=32, batch_rows=16, steps=10), **kw})

    @classmethod
    def tiny(cls, **kw) -> "LensConfig":
        """The end-to-end test's run: short rows, enough steps for the tuned lens to beat the logit lens."""
        return cls(**{**dict(rows=16, train_rows=32, seq_len=32, batch_rows=16, steps=40, lr=3e-3, save_every=20),
                      **kw})
