"""Configuration of the SAE board-game experiment (frozen, keyword-only, with presets)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, kw_only=True)
class BoardgameConfig:
    """SAEs of every family on one residual-stream site of othello-gpt and of its random-init twin.

    Grids: ``l1_coeffs`` (relu, panneal and gated share them), ``topk_ks`` (topk and
    batchtopk), ``jumprelu_coeffs``.
    """

    model: str = "othello-gpt"
    layer: int = 2  # blocks.{layer}.resid_post (the middle of a 4-layer model)
    random_seed: int = 1  # seed of the random-init control
    expansion: int = 4
    n_train_games: int = 3000
    n_test_games: int = 500
    n_label_games: int = 1000  # training games used to label latents for board reconstruction
    n_ce_games: int = 200
    steps: int = 800
    batch_size: int = 512
    lr: float = 1e-3
    l1_coeffs: tuple[float, ...] = (0.2, 0.6, 2.0)
    topk_ks: tuple[int, ...] = (6, 16, 40)
    jumprelu_coeffs: tuple[float, ...] = (0.05, 0.2, 0.8)
    jumprelu_init_threshold: float = 0.05  # initial JumpReLU threshold (normalised units)
    jumprelu_bandwidth: float = 0.05  # straight-through kernel width
    p_end: float = 0.2
    anneal_frac: float = 0.2  # p-annealing starts after this fraction of the steps
    families: tuple[str, ...] = ("relu", "panneal", "topk", "batchtopk", "jumprelu", "gated")
    seed: int = 0

    def __post_init__(self):
        for name in ("expansion", "n_train_games", "n_test_games", "n_label_games", "n_ce_games", "steps",
                     "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"BoardgameConfig.{name} must be positive, got {getattr(self, name)}")
        if self.n_label_games > self.n_train_games:
            raise ValueError(f"n_label_games ({self.n_label_games}) must be <= n_train_games ({self.n_train_games})")
        if self.jumprelu_init_threshold <= 0 or self.jumprelu_bandwidth <= 0:
            raise ValueError(f"jumprelu_init_threshold and jumprelu_bandwidth must be positive, got "
                             f"{self.jumprelu_init_threshold} and {self.jumprelu_bandwidth}")
        if not 0 <= self.anneal_frac < 1:
            raise ValueError(f"anneal_frac must lie in [0, 1), got {self.anneal_frac}")
        from jaxinterp.sae import FAMILIES

        bad = sorted(set(self.families) - set(FAMILIES))
        if bad:
            raise ValueError(f"unknown families {bad}; choose from {sorted(FAMILIES)}")

    @classmethod
    def scaled(cls, **kw) -> "BoardgameConfig":
        """TopK at 16x on ~7x the default's activations (3,000 steps x 1,024 from 20,000 games).

        The budget at which the trained model's SAEs beat the random-init control on board
        reconstruction at every k (about 26 minutes on an idle 2-core CPU).
        """
        defaults = dict(families=("topk",), expansion=16, steps=3000, batch_size=1024, n_train_games=20000)
        return cls(**{**defaults, **kw})

    @classmethod
    def long(cls, **kw) -> "BoardgameConfig":
        """The penalised families (ReLU-L1, p-annealing, Gated, JumpReLU) at 4x, trained 8,000 steps
        x 1,024 on 20,000 games (20x the default's tokens); TopK-style SAEs are ``scaled``'s.

        L1-penalised SAEs need the length: at the default budget their codes on the trained model
        stay dense (L0 28-190) and below the random-init control on board reconstruction. Families
        train independently on the same batches, so ``--set families=relu,panneal`` reproduces
        those rows of the full run.
        """
        defaults = dict(families=("relu", "panneal", "gated", "jumprelu"), steps=8000, batch_size=1024,
                        n_train_games=20000, l1_coeffs=(0.6, 2.0, 3.5))
        return cls(**{**defaults, **kw})

    @classmethod
    def smoke(cls, **kw) -> "BoardgameConfig":
        """Seconds-long check of the pipeline."""
        defaults = dict(n_train_games=64, n_test_games=32, n_label_games=32, n_ce_games=8, steps=20, batch_size=128,
                        l1_coeffs=(1.0,), topk_ks=(8,), jumprelu_coeffs=(0.1,))
        return cls(**{**defaults, **kw})
