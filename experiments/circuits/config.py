"""Configuration of the feature-vs-neuron circuit run (frozen, keyword-only, with presets)."""

from __future__ import annotations

import dataclasses

from jaxinterp.circuits import METHODS

TASK_NAMES = ("recall", "copy")


@dataclasses.dataclass(frozen=True, kw_only=True)
class CircuitsConfig:
    """Sparse feature circuits (SAE features + errors at every attn_out / mlp_out / resid_post) and neuron
    circuits (attn_out and resid_post dimensions, MLP neurons at mlp.post) of each task.

    Node effects (``method``, ``steps``) on ``n_train`` pairs; faithfulness / completeness curves (the
    top-n nodes kept, the rest mean-ablated to their per-position means over the discovery pairs) on
    ``n_test`` held-out pairs; the feature circuit's graph with ``node_threshold`` / ``edge_threshold``
    (in logit-difference units) and at most ``max_nodes_per_site`` nodes per site.
    """

    model: str = "facts-gpt"
    saes: str = "results/train_saes/facts-gpt"  # a train-saes output directory (trained there on first use)
    tasks: tuple[str, ...] = TASK_NAMES
    n_train: int = 64
    n_test: int = 64
    method: str = "ig"
    steps: int = 10
    counts: tuple[int, ...] = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
    neuron_kinds: tuple[str, ...] = ("attn_out", "mlp.post", "resid_post")
    node_threshold: float = 0.1
    edge_threshold: float = 0.01
    max_nodes_per_site: int = 6
    check_nodes: int = 8  # the top nodes whose estimated effect is compared with exact patching
    seed: int = 0

    def __post_init__(self):
        bad = sorted(set(self.tasks) - set(TASK_NAMES))
        if bad or not self.tasks:
            raise ValueError(f"unknown tasks {bad}; choose from {list(TASK_NAMES)}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {self.method!r}")
        for name in ("n_train", "n_test", "steps", "max_nodes_per_site"):
            if getattr(self, name) <= 0:
                raise ValueError(f"CircuitsConfig.{name} must be positive, got {getattr(self, name)}")
        if self.node_threshold < 0 or self.edge_threshold < 0 or self.check_nodes < 0:
            raise ValueError("node_threshold, edge_threshold and check_nodes must be >= 0")

    @classmethod
    def default(cls, **kw) -> "CircuitsConfig":
        return cls(**kw)

    @classmethod
    def smoke(cls, **kw) -> "CircuitsConfig":
        """Seconds (given SAEs): one task, few pairs, two IG steps."""
        return cls(**{**dict(tasks=("recall",), n_train=8, n_test=8, steps=2, counts=(0, 10, 100), check_nodes=2),
                      **kw})
