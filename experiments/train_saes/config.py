"""Configuration of the SAEs-for-every-layer run (frozen, keyword-only, with presets)."""

from __future__ import annotations

import dataclasses
from typing import Optional

SITE_KINDS = ("attn_out", "mlp_out", "mixer_out", "resid_post")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainSAEsConfig:
    """TopK SAEs (``expansion x d_model`` latents, ``k`` active) at every site of ``site_kinds`` of every layer
    (or at ``sites``), all trained from one stream of activations harvested on the fly
    (``jaxinterp.sae.harvest_grid``): each step runs the model once on ``rows`` packed facts-world rows
    of ``seq_len`` tokens and takes one step of every SAE on ``rows * seq_len`` shuffled tokens."""

    model: str = "facts-gpt"
    sites: Optional[tuple[str, ...]] = None  # None: every blocks.*.<kind> site of the model for kind in site_kinds
    site_kinds: tuple[str, ...] = SITE_KINDS
    expansion: int = 4
    k: int = 16
    steps: int = 700
    rows: int = 16
    seq_len: int = 64
    lr: float = 2e-3
    buffer_factor: int = 8
    eval_rows: int = 128
    save_every: int = 100
    seed: int = 0

    def __post_init__(self):
        for name in ("expansion", "k", "steps", "rows", "seq_len", "buffer_factor", "eval_rows", "save_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainSAEsConfig.{name} must be positive, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        bad = sorted(set(self.site_kinds) - set(SITE_KINDS))
        if bad:
            raise ValueError(f"unknown site kinds {bad}; choose from {list(SITE_KINDS)}")

    @classmethod
    def facts_gpt(cls, **kw) -> "TrainSAEsConfig":
        """attn_out, mlp_out and resid_post of every layer of facts-gpt (12 SAEs)."""
        return cls(**kw)

    @classmethod
    def facts_mamba(cls, **kw) -> "TrainSAEsConfig":
        """mixer_out and resid_post of every layer of facts-mamba (4 SAEs)."""
        return cls(**{"model": "facts-mamba", **kw})

    @classmethod
    def smoke(cls, **kw) -> "TrainSAEsConfig":
        """Seconds: two sites, a few steps."""
        return cls(**{**dict(sites=("blocks.1.mlp_out", "blocks.1.resid_post"), steps=12, rows=4, seq_len=32,
                             buffer_factor=2, eval_rows=8, save_every=5), **kw})
