"""Experiment configuration (frozen, keyword-only) with dotted command-line overrides."""

from __future__ import annotations

import dataclasses

from jaxinterp.unlearning.elm import ElmConfig
from jaxinterp.lora import LoraConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExperimentConfig:
    """Everything one run needs; ``--set elm.eta=8 lora.rank=8 steps=200`` overrides fields.

    Attributes:
      model: embedded name or HF directory of a facts-world model (``world.json`` beside it).
      domain: the domain to erase (the facts world's hazardous one by default).
      methods: which unlearning methods to run (the original model is always measured).
      steps, batch_size: the shared budget of every method.
      erase_len, retain_len: token lengths of erase / retain text.
      n_erase_docs, n_retain_docs: training documents.
      fluency_new: tokens of each guided fluency continuation.
      rmu_layer: RMU's steered layer (None: the middle layer).
      gen_prompts, gen_new: seamlessness prompts and continuation length (fact prompts: the
        multiple-choice questions, ending where the object must come).
      gen_new_open: continuation length on the document-opening prompts (the first fact
        sentence of held-out erased-domain documents, then free generation).
      template_objects: which fact objects ELM's template term leaves free (it keeps the
        frozen model's predictions everywhere else on erase text): ``"erased"``, only the
        objects of the erased domain's own relations (the shared facts of its entities, e.g.
        where they live, are kept), or ``"all"``, every relation's objects.
    """

    model: str = "facts-gpt"
    domain: str = "pathogens"
    methods: tuple[str, ...] = ("elm", "ga", "rmu")
    seed: int = 0
    steps: int = 150
    batch_size: int = 8
    erase_len: int = 48
    retain_len: int = 48
    n_erase_docs: int = 256
    n_retain_docs: int = 256
    fluency_new: int = 16
    rmu_layer: int | None = None
    rmu_steer: float = 4.0
    rmu_alpha: float = 10.0
    ga_lr: float = 2e-4
    gen_prompts: int = 48
    gen_new: int = 12
    gen_new_open: int = 24
    template_objects: str = "erased"
    lora: LoraConfig = LoraConfig(rank=8, alpha=16.0, dropout=0.05)
    # template_weight=40: retain on erase text with the erased objects' positions masked; retain_soft:
    # retain / template against the frozen distribution, not its argmax (README: seamlessness)
    elm: ElmConfig = ElmConfig.tiny(eta=4.0, lr=2e-3, template_weight=40.0, retain_soft=True)

    def __post_init__(self):
        unknown = sorted(set(self.methods) - {"elm", "ga", "rmu"})
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose from ['elm', 'ga', 'rmu']")
        if self.template_objects not in ("erased", "all"):
            raise ValueError(f"template_objects must be 'erased' or 'all', got {self.template_objects!r}")
        if self.steps <= 0 or self.batch_size <= 0:
            raise ValueError("steps and batch_size must be positive")


def _parse(value: str, current):
    if isinstance(current, bool):
        return value.lower() in ("1", "true", "yes")
    if isinstance(current, tuple):
        items = [v for v in value.split(",") if v]
        return tuple(type(current[0])(v) if current else v for v in items)
    if current is None and "," in value:
        return tuple(int(v) for v in value.split(",") if v)
    if current is None:
        for cast in (int, float):
            try:
                return cast(value)
            except ValueError:
                pass
        return None if value.lower() == "none" else value
    return type(current)(value)


def override(cfg, assignments: list[str]):
    """Apply ``a.b=value`` assignments to nested frozen dataclasses."""
    for item in assignments:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like field=value or section.field=value")
        key, value = item.split("=", 1)
        cfg = _assign(cfg, key.split("."), value)
    return cfg


def _assign(obj, keys, value):
    names = [f.name for f in dataclasses.fields(obj)]
    if keys[0] not in names:
        raise ValueError(f"{type(obj).__name__} has no field {keys[0]!r}; fields: {names}")
    current = getattr(obj, keys[0])
    new = _assign(current, keys[1:], value) if len(keys) > 1 else _parse(value, current)
    return dataclasses.replace(obj, **{keys[0]: new})
