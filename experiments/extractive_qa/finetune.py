"""LoRA fine-tune of facts-gpt into facts-gpt-qa: answer from the passage when it states the asked
fact (counterfactual passages), from memory when it is silent (facts-gpt copies a passage object
there: memory-answer rate 0.17), keep plain fact recall.

    python -m jaxinterp.experiments.extractive_qa.finetune --out results/extractive_qa_finetune
    cp results/extractive_qa_finetune/model/* models/embedded/facts-gpt-qa/   # the card README.md stays

Trains adapters with ``jaxinterp.train.fit`` (resumable), merges them and writes the merged model
(``ji.save_pretrained``, tokenizer and ``world.json`` of the base) to ``<out>/model``. The training
passages use seeds disjoint from the experiment's evaluation passages.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxinterp as ji
from jaxinterp import lora
from jaxinterp.experiments.common import experiment_main
from jaxinterp.experiments.data.facts_world import load_world_model
from jaxinterp.experiments.extractive_qa.data import QAItem, counterfactual_items, silent_items
from jaxinterp.train import LoopConfig, fit, init_state, loss_step, make_train_step

TRAIN_SEED = 100_000  # evaluation passages use seeds < 10_000


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """Attributes:
      model: the base facts-world model.
      steps / batch / lr: AdamW steps, questions per step, peak learning rate (cosine decay).
      rank: LoRA rank on every projection of every layer.
      share_silent / share_plain: shares of silent-passage questions and plain fact prompts in a
        batch (the rest: counterfactual passages).
      seq_len: every batch is left-padded to this length (one compiled step).
    """

    model: str = "facts-gpt"
    steps: int = 400
    batch: int = 32
    lr: float = 3e-3
    rank: int = 8
    share_silent: float = 0.4
    share_plain: float = 0.2
    seq_len: int = 80
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1 or self.batch < 3 or self.rank < 1 or self.lr <= 0:
            raise ValueError("steps, rank >= 1, batch >= 3 and lr > 0 required")
        if not (0 <= self.share_silent and 0 <= self.share_plain and self.share_silent + self.share_plain < 1):
            raise ValueError("share_silent, share_plain >= 0 with sum < 1 required")

    @classmethod
    def default(cls, **kw) -> "FinetuneConfig":
        return cls(**kw)

    @classmethod
    def smoke(cls, **kw) -> "FinetuneConfig":
        return cls(**{"steps": 4, "batch": 8, **kw})


def _plain_items(world, n: int, rng) -> list[QAItem]:
    facts = world.facts
    out = []
    for i in rng.integers(len(facts), size=n):
        f = facts[int(i)]
        p = world.prompt(f.subject, f.relation, int(rng.integers(len(world.relation(f.relation).templates))))
        out.append(QAItem(p.ids, p.answer_id, p.answer_id, (), -1, "plain"))
    return out


def step_batch(world, cfg: FinetuneConfig, step: int) -> dict:
    """The questions of one step (a pure function of the step), left-padded to ``seq_len``."""
    n_sil, n_plain = round(cfg.batch * cfg.share_silent), round(cfg.batch * cfg.share_plain)
    seed = TRAIN_SEED + cfg.seed * 1_000_000 + step
    items = (counterfactual_items(world, cfg.batch - n_sil - n_plain, seed)
             + silent_items(world, n_sil, seed) + _plain_items(world, n_plain, np.random.default_rng(seed)))
    too_long = max(len(i.ids) for i in items)
    if too_long > cfg.seq_len:
        raise ValueError(f"a training question has {too_long} tokens > seq_len {cfg.seq_len}")
    pad = [cfg.seq_len - len(i.ids) for i in items]
    return {"tokens": np.asarray([[world.pad_id] * p + list(i.ids) for p, i in zip(pad, items)], np.int32),
            "mask": np.asarray([[False] * p + [True] * len(i.ids) for p, i in zip(pad, items)]),
            "answer": np.asarray([i.answer_id for i in items], np.int32)}


def _loss(trainable, frozen, batch, key):
    del key
    t = batch["tokens"].shape[1]
    logits = lora.run(lora.combine(trainable, frozen), batch["tokens"], attention_mask=batch["mask"],
                      logits_at=t - 1).logits  # [B, V]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, batch["answer"][:, None], axis=1).mean()
    acc = (logits.argmax(-1) == batch["answer"]).mean()
    return nll, {"acc": acc}


def run(cfg: FinetuneConfig, out: Path) -> dict:
    t0 = time.time()
    model, world = load_world_model(cfg.model)
    lm = lora.init(model, lora.LoraConfig(rank=cfg.rank, alpha=2.0 * cfg.rank), key=cfg.seed)
    trainable, frozen = lora.split(lm)
    sched = optax.warmup_cosine_decay_schedule(0.0, cfg.lr, max(1, cfg.steps // 10), cfg.steps, cfg.lr * 0.1)
    optimizer = optax.adamw(sched, weight_decay=0.0)
    step = make_train_step(loss_step(_loss, optimizer))
    state = init_state(trainable, optimizer, jax.random.key(cfg.seed))
    state, history = fit(step, state, lambda s: step_batch(world, cfg, s),
                         LoopConfig(steps=cfg.steps, save_every=max(1, cfg.steps // 4), log_every=10, quiet=True),
                         directory=out / "ckpt", frozen=frozen, run_config=dataclasses.asdict(cfg))
    merged = lora.merge(lora.combine(state["params"], frozen))
    source = Path(getattr(model, "source", cfg.model))
    path = ji.save_pretrained(merged, out / "model", tokenizer_dir=source)
    shutil.copy(source / "world.json", path / "world.json")
    last = history[-1] if history else {}
    return {"base": cfg.model, "steps": cfg.steps, "final_loss": float(last.get("loss", float("nan"))),
            "final_acc": float(last.get("acc", float("nan"))), "model_dir": str(path),
            "wall_s": round(time.time() - t0, 1)}


PRESETS = {"default": FinetuneConfig.default, "smoke": FinetuneConfig.smoke}
main = experiment_main("extractive_qa_finetune", PRESETS, run, doc=__doc__)

if __name__ == "__main__":
    raise SystemExit(main())
