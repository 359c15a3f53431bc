"""Experiment configuration (frozen, keyword-only; ``--set elm.eta=8 lora.rank=8`` overrides nested fields)."""

from __future__ import annotations

import dataclasses

from jaxinterp.unlearning.elm import ElmConfig
from jaxinterp.lora import LoraConfig


# elm_rmu: ELM plus RMU's representation term on erase text (a deeper-erasure variant, issue 25)
# elm_adv: ELM whose erase term is also applied after a simulated relearning step
METHODS = ("elm", "ga", "rmu", "elm_rmu", "elm_adv")


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
      oracle: the retrain oracle (a ``ji.load`` source: facts-gpt's recipe on the corpus without
        the domain's facts), measured like the methods and scoring every model's continuations;
        None skips the oracle row and the oracle-scored fluency.
      seamless: measure the original-scored seamlessness ratios and innocent floors.
      measure_original: measure the original model (its row).
      robustness: run the relearning attacks, few-shot prompts and probes (``robustness.py``).
      relearn_steps: fine-tuning step counts k after which held-out erased facts are measured.
      relearn_lr, relearn_batch, relearn_len: the attacks' Adam learning rate and batches
        (rows of true fact sentences, ``relearn_len`` tokens).
      unrelated_domain: the domain of the unrelated relearning attack.
      rmu_weight: weight of the RMU representation term added to ELM by the ``elm_rmu`` method
        (at ``rmu_layer``, steer ``rmu_steer``).
      adv_lr, adv_weight: step size of the simulated relearning step of ``elm_adv`` and the
        weight of its erase term after that step.
      oracle_fluency: measure the oracle-scored fluency of every model (needs ``oracle``).
      gcg_iters, gcg_candidates, gcg_len, gcg_top_k: budget of the GCG-style adversarial token
        search (``unlearning.attacks``; 0 iterations: off): ``gcg_len`` tokens placed after the
        bos of every question, searched on the attack half's questions to maximise the true
        answer's log-prob, held-out accuracy measured with them.
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
    oracle: str | None = "facts-gpt-oracle"
    robustness: bool = True
    seamless: bool = True
    measure_original: bool = True
    relearn_steps: tuple[int, ...] = (1, 3, 10)
    relearn_lr: float = 1e-3
    relearn_batch: int = 8
    relearn_len: int = 48
    unrelated_domain: str = "astronomy"
    rmu_weight: float = 1.0
    adv_lr: float = 3e-3
    adv_weight: float = 1.0
    oracle_fluency: bool = True
    gcg_iters: int = 32
    gcg_candidates: int = 64
    gcg_len: int = 5
    gcg_top_k: int = 32
    lora: LoraConfig = LoraConfig(rank=8, alpha=16.0, dropout=0.05)
    # template_weight=40: retain on erase text with the erased objects' positions masked; retain_soft:
    # retain / template against the frozen distribution, not its argmax (README: seamlessness)
    elm: ElmConfig = ElmConfig.tiny(eta=4.0, lr=2e-3, template_weight=40.0, retain_soft=True)

    def __post_init__(self):
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
        if self.unrelated_domain == self.domain:
            raise ValueError(f"unrelated_domain must differ from the erased domain {self.domain!r}")
        if not self.relearn_steps or min(self.relearn_steps) < 1 or self.relearn_lr <= 0:
            raise ValueError(f"relearn_steps must be >= 1 and relearn_lr > 0, got {self.relearn_steps}, {self.relearn_lr}")
        if self.template_objects not in ("erased", "all"):
            raise ValueError(f"template_objects must be 'erased' or 'all', got {self.template_objects!r}")
        if self.gcg_iters < 0 or min(self.gcg_candidates, self.gcg_len, self.gcg_top_k) < 1:
            raise ValueError("gcg_iters must be >= 0 and gcg_candidates, gcg_len, gcg_top_k >= 1")
        if self.steps <= 0 or self.batch_size <= 0:
            raise ValueError("steps and batch_size must be positive")

