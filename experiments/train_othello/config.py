"""Configuration of the othello-gpt training run (frozen, keyword-only, with presets)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainOthelloConfig:
    """Model shape, data and optimiser settings for a GPT-2-style Othello move predictor.

    The model reads the first ``n_moves - 1`` moves of a full-length random game and
    predicts each next move (context = ``n_moves - 1``, as in Othello-GPT).
    """

    board_size: int = 6
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    d_mlp: int = 256
    n_train_games: int = 50_000
    n_eval_games: int = 2_000
    batch_size: int = 64
    steps: int = 3_000
    lr: float = 2e-3
    warmup_steps: int = 200
    weight_decay: float = 0.01
    seed: int = 0
    probe_layer: int = -1  # resid_post of this layer for the linear probe; -1: the middle layer
    probe_steps: int = 500

    def __post_init__(self):
        for name in ("d_model", "n_layers", "n_heads", "d_mlp", "n_train_games", "n_eval_games", "batch_size",
                     "steps", "probe_steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainOthelloConfig.{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if not -1 <= self.probe_layer < self.n_layers:
            raise ValueError(f"probe_layer must be -1 or in [0, {self.n_layers}), got {self.probe_layer}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps must lie in [0, steps={self.steps}), got {self.warmup_steps}")
        if not 0 < self.lr < 1:
            raise ValueError(f"lr must lie in (0, 1), got {self.lr}")

    @property
    def layer_for_probe(self) -> int:
        return self.n_layers // 2 if self.probe_layer == -1 else self.probe_layer

    @classmethod
    def small(cls, **kw) -> "TrainOthelloConfig":
        """The first shipped 6x6 model (d 64; about 30 minutes on the shared 2-core CPU).

        Superseded by ``medium`` and then ``long``.
        """
        return cls(**kw)

    @classmethod
    def medium(cls, **kw) -> "TrainOthelloConfig":
        """The second shipped model: d 128, MLP 512, 5,000 steps on 150,000 games (~12 min on an idle 2-core CPU)."""
        defaults = dict(d_model=128, d_mlp=512, n_train_games=150_000, steps=5_000)
        return cls(**{**defaults, **kw})

    @classmethod
    def long(cls, **kw) -> "TrainOthelloConfig":
        """The shipped 6x6 model: ``medium``'s shape, 4x the steps (20,000) on 400,000 games.

        About 50 minutes on an idle 2-core CPU (0.145 s per step).
        """
        return cls.medium(**{"n_train_games": 400_000, "steps": 20_000, **kw})

    @classmethod
    def tiny(cls, **kw) -> "TrainOthelloConfig":
        """Seconds-long smoke test."""
        defaults = dict(d_model=32, n_layers=2, n_heads=2, d_mlp=64, n_train_games=512, n_eval_games=64,
                        batch_size=32, steps=20, warmup_steps=5, probe_steps=20)
        return cls(**{**defaults, **kw})

    @classmethod
    def standard8(cls, **kw) -> "TrainOthelloConfig":
        """8x8 board, 8 layers, d 512 (the paper's shape; needs an accelerator)."""
        defaults = dict(board_size=8, d_model=512, n_layers=8, n_heads=8, d_mlp=2048, n_train_games=2_000_000,
                        steps=100_000, batch_size=512, lr=3e-4)
        return cls(**{**defaults, **kw})
