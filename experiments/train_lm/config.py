"""Training configs: frozen keyword-only dataclasses, presets, and dotted overrides (``experiments.common``).

    cfg = get_config("facts-gpt", ["train.steps=2000", "model.args.d_model=128"])

Presets: ``facts-gpt``, ``facts-gpt-oracle`` and ``facts-mamba`` (the shipped embedded models), ``tiny`` and
``tiny-mamba`` (seconds-long runs for tests).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from jaxinterp.experiments.common import apply_overrides
from jaxinterp.experiments.data.facts_world import DOMAINS, HAZARDOUS_DOMAIN, WorldConfig

__all__ = ["ModelSpec", "DataConfig", "OptimConfig", "TrainConfig", "Config", "PRESETS", "CURRICULA", "get_config"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """A registered family and the keyword arguments of its config class.

    ``vocab_size`` and the context length (``max_seq_len`` where the config has one) are
    filled in from the data unless given in ``args``.
    """

    family: str = "gpt2"
    args: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "args", dict(self.args))


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Facts-world token stream: batch ``step`` is a pure function of (world, seed, step).

    ``answer_weight``: loss weight of the answer token of each in-context passage question
    (every other token weighs 1; the loss is the weighted mean). 1.0 = the plain mean.
    ``without_domain``: cut every sentence stating a true fact of this domain's own relations
    from the corpus (``data.withhold_facts``; the retrain oracle of ``experiments/elm_erase``).
    """

    world: WorldConfig = dataclasses.field(default_factory=WorldConfig)
    seq_len: int = 128
    batch_size: int = 32
    seed: int = 0
    answer_weight: float = 1.0
    without_domain: str | None = None

    def __post_init__(self):
        if self.without_domain is not None and self.without_domain not in DOMAINS:
            raise ValueError(f"DataConfig.without_domain must be one of {list(DOMAINS)} or None, "
                             f"got {self.without_domain!r}")
        if isinstance(self.world, Mapping):
            object.__setattr__(self, "world", WorldConfig(**self.world))
        if self.seq_len < 8 or self.batch_size < 1:
            raise ValueError(f"DataConfig needs seq_len >= 8 and batch_size >= 1, got {self.seq_len}, {self.batch_size}")
        if not self.answer_weight > 0:
            raise ValueError(f"DataConfig.answer_weight must be > 0, got {self.answer_weight}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay to ``end_lr_frac * lr``, global-norm clipping."""

    lr: float = 3e-3
    warmup_steps: int = 100
    end_lr_frac: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.98
    clip_norm: float = 1.0

    def __post_init__(self):
        if self.lr <= 0 or self.warmup_steps < 0 or self.clip_norm <= 0:
            raise ValueError(f"OptimConfig needs lr > 0, warmup_steps >= 0, clip_norm > 0; got {self}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Loop length and bookkeeping (``eval_every``/``save_every`` = 0 disables).

    ``init_from``: start from these weights (any ``ji.load`` source: embedded name, local HF
    directory, hub id) instead of a fresh init; the optimizer state starts fresh. The model's
    architecture then comes from the loaded config (``model.args`` must agree with it).
    """

    steps: int = 1000
    eval_every: int = 250
    eval_prompts: int = 256
    save_every: int = 100
    keep: int = 2
    seed: int = 0
    init_from: str | None = None

    def __post_init__(self):
        if self.init_from is not None and (not isinstance(self.init_from, str) or not self.init_from):
            raise ValueError(f"TrainConfig.init_from must be a ji.load source (non-empty string) or None, "
                             f"got {self.init_from!r}")
        if self.steps < 1 or self.eval_every < 0 or self.save_every < 0 or self.keep < 1:
            raise ValueError(f"TrainConfig needs steps >= 1, eval_every/save_every >= 0, keep >= 1; got {self}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    name: str = "custom"
    model: ModelSpec = dataclasses.field(default_factory=ModelSpec)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def __post_init__(self):
        self.check()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check(self) -> "Config":
        """Cross-section validation (``__post_init__`` runs it; overrides are applied in one go); returns self."""
        if self.optim.warmup_steps >= self.train.steps:
            raise ValueError(f"optim.warmup_steps ({self.optim.warmup_steps}) must be smaller than train.steps "
                             f"({self.train.steps}) so the cosine phase has steps left; lower it, e.g. "
                             f"--set optim.warmup_steps={max(self.train.steps // 10, 0)}")
        return self


def _facts_gpt() -> Config:
    return Config(
        name="facts-gpt",
        model=ModelSpec(family="gpt2", args=dict(d_model=128, n_layers=4, n_heads=4, d_mlp=512, max_seq_len=128)),
        data=DataConfig(seq_len=96, batch_size=24),
        optim=OptimConfig(lr=3e-3, warmup_steps=100),
        train=TrainConfig(steps=1200, eval_every=300, save_every=100),
    )


def _facts_gpt_oracle() -> Config:
    """facts-gpt's recipe on the corpus without the hazardous domain's facts: the retrain oracle
    that ``experiments/elm_erase`` compares every erasure against (shipped as facts-gpt-oracle)."""
    cfg = _facts_gpt()
    return dataclasses.replace(cfg, name="facts-gpt-oracle",
                               data=dataclasses.replace(cfg.data, without_domain=HAZARDOUS_DOMAIN))


def _facts_mamba() -> Config:
    """The last stage of facts-mamba's curriculum (``CURRICULA``): passages of 1-5 sentences
    and fact documents, half each. Trained from scratch it recalls facts but does not learn
    to copy from passages; ``make_embedded facts-mamba`` runs the earlier stages first."""
    world = WorldConfig(p_passage=0.5, train_passage_sentences=(1, 5), passage_questions=5)
    return Config(
        name="facts-mamba",
        model=ModelSpec(family="mamba", args=dict(d_model=128, n_layers=2, d_state=16, expand=2)),
        data=DataConfig(world=world, seq_len=96, batch_size=24, answer_weight=10.0),
        optim=OptimConfig(lr=3e-3, warmup_steps=50),
        train=TrainConfig(steps=1500, eval_every=250, eval_prompts=128, save_every=250),
    )


# Stages trained before a preset, each fine-tuning the previous one's export (``--init-from``);
# overrides are relative to the preset. facts-mamba: a Mamba learns to copy an answer from a
# passage only after a phase change that 1-sentence passages at lr 1e-2 bring about
# (experiments/train_lm/README.md); longer passages, then the fact documents, come after.
CURRICULA: dict[str, list[tuple[str, list[str]]]] = {
    "facts-mamba": [
        ("stage1", ["data.world.p_passage=1.0", "data.world.train_passage_sentences=1,1", "optim.lr=1e-2",
                    "optim.warmup_steps=30", "train.steps=400", "train.eval_every=50", "train.eval_prompts=32",
                    "train.save_every=1000"]),
        ("stage2", ["data.world.p_passage=1.0", "optim.warmup_steps=30", "train.steps=600", "train.eval_every=100",
                    "train.eval_prompts=32", "train.save_every=5000"]),
    ],
}


def _tiny() -> Config:
    return Config(
        name="tiny",
        model=ModelSpec(family="gpt2", args=dict(d_model=32, n_layers=2, n_heads=2, d_mlp=64, max_seq_len=128)),
        data=DataConfig(world=WorldConfig.tiny(), seq_len=32, batch_size=8),
        optim=OptimConfig(lr=1e-2, warmup_steps=5),
        train=TrainConfig(steps=30, eval_every=0, eval_prompts=32, save_every=5, keep=2),
    )


def _tiny_mamba() -> Config:
    cfg = _tiny()
    return dataclasses.replace(cfg, name="tiny-mamba",
                               model=ModelSpec(family="mamba", args=dict(d_model=32, n_layers=2, d_state=4)))


PRESETS = {"facts-gpt": _facts_gpt, "facts-gpt-oracle": _facts_gpt_oracle, "facts-mamba": _facts_mamba, "tiny": _tiny, "tiny-mamba": _tiny_mamba}


def get_config(name: str, overrides: Sequence[str] = ()) -> Config:
    """A preset with ``key.path=value`` overrides applied (typed by the fields; ``experiments.common``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown config {name!r}; presets: {sorted(PRESETS)}")
    return apply_overrides(PRESETS[name](), overrides)
