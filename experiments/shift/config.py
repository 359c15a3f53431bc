"""Configuration of the SHIFT run (frozen, keyword-only, with presets)."""

from __future__ import annotations

import dataclasses

from jaxinterp.circuits import METHODS

SITE_KINDS = ("attn_out", "mlp_out", "resid_post")
ABLATIONS = ("mean", "zero")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShiftConfig:
    """SHIFT (Marks et al. 2024) on facts-gpt: classify an entity's domain (``domains[0]`` vs ``domains[1]``)
    from ``"<lead-in> <template with the entity>"`` where the lead-in phrase (``leads[0]`` / ``leads[1]``) is
    the spurious attribute: in training lead ``i`` always comes with domain ``i``.

    Entities are split (disjoint) into train / judge / test (``n_judge`` and ``n_test`` per domain, the rest
    train); every text of the shared relations' ``templates`` (their first ``templates`` train templates).
    The head reads the mean over positions of ``layer``'s resid_post; node effects (``method``, ``steps``,
    zero patch) of the SAE features at the ``site_kinds`` of layers <= ``layer`` on the head's signed logit;
    the ``top`` features by |effect| go to the judge; those it calls spurious are ``ablation``-ablated
    (set to their mean over the training set's positions, or zero); ``random_seeds`` draws of random features.
    """

    model: str = "facts-gpt"
    saes: str = "results/train_saes/facts-gpt"  # a train-saes output directory (trained there on first use)
    domains: tuple[str, ...] = ("astronomy", "cuisine")
    leads: tuple[str, ...] = ("Everyone knows that", "It is said that")
    templates: int = 4
    n_judge: int = 4
    n_test: int = 4
    layer: int = 2
    site_kinds: tuple[str, ...] = ("resid_post",)
    ablation: str = "mean"
    method: str = "ig"
    steps: int = 10
    top: int = 100
    head_steps: int = 300
    head_l2: float = 1e-2
    random_seeds: int = 3
    seed: int = 0

    def __post_init__(self):
        if len(self.domains) != 2 or len(set(self.domains)) != 2:
            raise ValueError(f"domains must be two different domains, got {list(self.domains)}")
        if len(self.leads) != 2 or len(set(self.leads)) != 2:
            raise ValueError(f"leads must be two different phrases, got {list(self.leads)}")
        bad = sorted(set(self.site_kinds) - set(SITE_KINDS))
        if bad or not self.site_kinds:
            raise ValueError(f"unknown site_kinds {bad}; choose from {list(SITE_KINDS)}")
        if self.ablation not in ABLATIONS:
            raise ValueError(f"ablation must be one of {list(ABLATIONS)}, got {self.ablation!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {self.method!r}")
        for name in ("templates", "n_judge", "n_test", "steps", "top", "head_steps", "random_seeds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ShiftConfig.{name} must be positive, got {getattr(self, name)}")
        if self.layer < 0 or self.head_l2 < 0:
            raise ValueError(f"layer and head_l2 must be >= 0, got {self.layer}, {self.head_l2}")

    @classmethod
    def default(cls, **kw) -> "ShiftConfig":
        return cls(**kw)

    @classmethod
    def smoke(cls, **kw) -> "ShiftConfig":
        """Seconds (given SAEs): one template per relation, two IG steps, few features."""
        return cls(**{**dict(templates=1, n_judge=2, n_test=2, steps=2, top=10, head_steps=50, random_seeds=1),
                      **kw})
