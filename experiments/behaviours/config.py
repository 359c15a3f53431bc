"""Configuration of the unsupervised-behaviours run (frozen, keyword-only, with presets)."""

from __future__ import annotations

import dataclasses

from jaxinterp.circuits import METHODS


@dataclasses.dataclass(frozen=True, kw_only=True)
class BehavioursConfig:
    """``n_contexts`` windows of ``context_len`` tokens cut at random points of facts-world documents
    (the target: the token that follows; the first of ``pool`` windows whose loss is below ``max_loss``), clustered into ``k`` clusters by count sketches (``sketch_dim``)
    of the gradient of the next-token loss; per cluster, node effects (``method``, ``steps``) of its first
    ``circuit_contexts`` contexts on the mean log-probability of the true next token, SAE features zero-
    patched, and the circuit graph (``node_threshold`` / ``edge_threshold`` in nats, at most
    ``max_nodes_per_site`` nodes per site)."""

    model: str = "facts-gpt"
    saes: str = "results/train_saes/facts-gpt"  # a train-saes output directory (trained there on first use)
    n_contexts: int = 512
    pool: int = 2048  # candidate contexts, of which the first n_contexts with loss < max_loss are kept
    max_loss: float = float("inf")  # nats; Michaud et al. cluster only tokens the model predicts well
    context_len: int = 16
    k: int = 8
    sketch_dim: int = 4096
    method: str = "ig"
    steps: int = 10
    circuit_contexts: int = 32
    node_threshold: float = 0.05
    edge_threshold: float = 0.01
    max_nodes_per_site: int = 4
    examples: int = 24  # contexts shown per cluster page
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {self.method!r}")
        for name in ("n_contexts", "context_len", "k", "sketch_dim", "steps", "circuit_contexts",
                     "max_nodes_per_site", "examples"):
            if getattr(self, name) <= 0:
                raise ValueError(f"BehavioursConfig.{name} must be positive, got {getattr(self, name)}")
        if self.pool < self.n_contexts or not self.max_loss > 0:
            raise ValueError(f"pool ({self.pool}) must be >= n_contexts ({self.n_contexts}) and max_loss > 0")
        if self.k > self.n_contexts:
            raise ValueError(f"k ({self.k}) must not exceed n_contexts ({self.n_contexts})")
        if self.node_threshold < 0 or self.edge_threshold < 0:
            raise ValueError("node_threshold and edge_threshold must be >= 0")

    @classmethod
    def default(cls, **kw) -> "BehavioursConfig":
        return cls(**kw)

    @classmethod
    def smoke(cls, **kw) -> "BehavioursConfig":
        """Seconds (given SAEs): few contexts, three clusters, two IG steps."""
        return cls(**{**dict(n_contexts=48, pool=96, k=3, sketch_dim=512, steps=2, circuit_contexts=8, examples=6), **kw})
