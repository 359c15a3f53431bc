"""Erase a facts-world domain with ELM, gradient ascent and RMU; measure innocence,
specificity, seamlessness and robustness against the original model.

    jaxinterp elm-erase                   # = python -m jaxinterp.experiments.elm_erase.main
    jaxinterp elm-erase --set steps=300 elm.eta=8 lora.rank=4 --out results/elm_erase_x

Writes ``results.json``, ``config.json``, ``results.md`` (the comparison tables), ``comparison.png``,
the ELM adapter (``elm_adapter/``, PEFT layout) and training checkpoints (``ckpt/``) to ``--out``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxinterp import lora, train
from jaxinterp.unlearning import elm
from jaxinterp.unlearning import baselines as ub
from jaxinterp.unlearning import metrics as um
from jaxinterp.experiments.data.facts_world import DOMAINS, FactsWorld, load_world_model
from jaxinterp.experiments.common import experiment_main, pyplot, save_figure
from jaxinterp.experiments.elm_erase.config import ExperimentConfig


# ----------------------------------------------------------------------------- data


def _ids(world, text, max_len=None):
    ids = [world.bos_id] + world.encode(text)
    return ids[:max_len] if max_len else ids


def object_ids(world: FactsWorld) -> list[int]:
    """Token ids of every relation's objects (the tokens that state a fact)."""
    return sorted({i for r in world.relations for i in world.object_ids(r.name)})


def opening_prompts(world: FactsWorld, cfg: ExperimentConfig) -> list[list[int]]:
    """Starts of held-out erased-domain documents: bos + text up to the end of its first fact
    sentence (the free-generation seamlessness prompts)."""
    objs, period = set(object_ids(world)), world.encode(".")[0]
    out = []
    for text in world.domain_documents(cfg.domain, cfg.gen_prompts, seed=cfg.seed + 777):
        ids = _ids(world, text)
        end = next(j for j in range(2, len(ids)) if ids[j] == period and ids[j - 1] in objs)
        out.append(ids[: end + 1])
    return out


def build_corpus(world: FactsWorld, cfg: ExperimentConfig) -> dict:
    kept = [d for d in DOMAINS if d != cfg.domain]
    erase = [_ids(world, t, cfg.erase_len) for t in world.domain_documents(cfg.domain, cfg.n_erase_docs, seed=cfg.seed)]
    retain_text = [t for d in kept for t in world.domain_documents(d, cfg.n_retain_docs // (len(kept) + 1), seed=cfg.seed)]
    retain_text += world.filler_text(cfg.n_retain_docs - len(retain_text), seed=cfg.seed)
    retain = [_ids(world, t, cfg.retain_len) for t in retain_text]
    erased_groups = [world.object_ids(r.name) for r in world.relations if r.domain == cfg.domain]
    return {"erase": erase, "retain": retain, "kept": kept, "object_ids": object_ids(world), "erased_groups": erased_groups,
            "expert": _ids(world, world.expert_prefix(cfg.domain)), "novice": _ids(world, world.novice_prefix(cfg.domain))}


def fluency_data(base, world, corpus, cfg: ExperimentConfig, key) -> tuple[list, list]:
    """(erase prefix + topic-switch filler sentence + novice-guided continuation, start index)."""
    rng = np.random.default_rng([cfg.seed, 7])
    prompts = []
    for i, doc in enumerate(corpus["erase"]):
        cut = int(rng.integers(8, max(9, len(doc) - cfg.fluency_new)))
        switch = world.encode(world.filler_text(1, seed=1000 + i, sentences=1)[0])
        prompts.append(doc[:cut] + switch)
    starts = [len(p) - len(world.encode(world.filler_text(1, seed=1000 + i, sentences=1)[0]))
              for i, p in enumerate(prompts)]
    e, n = corpus["expert"], corpus["novice"]
    fn = jax.jit(lambda t: base.run(t).logits)
    out = []
    for sl in range(0, len(prompts), 64):
        chunk = prompts[sl:sl + 64]
        lens = np.asarray([len(p) for p in chunk])
        L = int(lens.max()) + cfg.fluency_new
        buf, _ = elm.pad_batch(chunk, L, world.pad_id)
        ebuf, _ = elm.pad_batch([e + p[1:] for p in chunk], L + len(e), world.pad_id)
        nbuf, _ = elm.pad_batch([n + p[1:] for p in chunk], L + len(n), world.pad_id)
        new = elm.guided_generate(fn, jnp.asarray(buf), jnp.asarray(lens), cfg.fluency_new, jax.random.fold_in(key, sl),
                                  guidance=cfg.elm.guidance, expert=jnp.asarray(ebuf),
                                  expert_lens=jnp.asarray(lens + len(e) - 1), novice=jnp.asarray(nbuf),
                                  novice_lens=jnp.asarray(lens + len(n) - 1))
        out += [p + list(r) for p, r in zip(chunk, np.asarray(new))]
    return out, starts


def batch_fn(corpus, fluency, starts, world, cfg: ExperimentConfig):
    fl_len = max(len(f) for f in fluency)
    template_free = (corpus["object_ids"] if cfg.template_objects == "all"
                     else sorted(i for ids in corpus["erased_groups"] for i in ids))

    def batches(step: int) -> dict:
        rng = np.random.default_rng([cfg.seed, 11, step])
        ie = rng.choice(len(corpus["erase"]), cfg.batch_size, replace=False)
        ir = rng.choice(len(corpus["retain"]), cfg.batch_size, replace=False)
        return elm.make_elm_batch([corpus["erase"][i] for i in ie], corpus["expert"], corpus["novice"],
                                  [corpus["retain"][i] for i in ir], [fluency[i] for i in ie], [starts[i] for i in ie],
                                  erase_len=cfg.erase_len, retain_len=cfg.retain_len, fluency_len=fl_len,
                                  pad_id=world.pad_id, object_ids=template_free)

    return batches


# ----------------------------------------------------------------------------- methods


def run_method(name, base, batches, cfg: ExperimentConfig, out: Path, key):
    lm = lora.init(base, cfg.lora, key=jax.random.fold_in(key, 1))
    if name == "elm":
        loss_fn = lambda a, b, batch, k: elm.elm_loss(a, b, batch, k, cfg.elm)
        opt = optax.adamw(cfg.elm.lr, weight_decay=cfg.elm.weight_decay)
    elif name == "ga":
        gcfg = ub.GAConfig(retain_weight=cfg.elm.retain_weight)
        loss_fn = lambda a, b, batch, k: ub.ga_loss(a, b, batch, k, gcfg)
        opt = optax.adamw(cfg.ga_lr, weight_decay=cfg.elm.weight_decay)
    else:
        layer = cfg.rmu_layer if cfg.rmu_layer is not None else base.config.n_layers // 2
        rcfg = ub.RMUConfig(layer=layer, steer=cfg.rmu_steer, alpha=cfg.rmu_alpha)
        b0 = batches(0)
        control = ub.rmu_direction(base, jnp.asarray(b0["erase"]), jnp.asarray(b0["erase_valid"]), rcfg,
                                   jax.random.fold_in(key, 2))
        loss_fn = lambda a, b, batch, k: ub.rmu_loss(a, b, batch, k, rcfg, control)
        opt = optax.adamw(cfg.elm.lr, weight_decay=cfg.elm.weight_decay)
    t0 = time.perf_counter()
    state = train.init_state(lm.lora, opt, jax.random.fold_in(key, 3))
    loop = train.LoopConfig(steps=cfg.steps, save_every=max(1, cfg.steps // 3), desc=name)
    state, hist = train.fit(train.make_train_step(train.loss_step(loss_fn, opt)), state, batches, loop,
                            directory=out / "ckpt" / name, frozen=lm.base, run_config=_config_dict(cfg),
                            may_change=TRAINING_FREE_FIELDS)
    return lora.combine(state["params"], lm.base), hist, time.perf_counter() - t0


# a resume may change these (evaluation only, or other methods); any other change is refused
TRAINING_FREE_FIELDS = ("steps", "methods", "gen_prompts", "gen_new", "gen_new_open")


def _config_dict(cfg: ExperimentConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def evaluate(logits_fn, original_fn, world, corpus, cfg: ExperimentConfig, key) -> dict:
    pad = world.pad_id

    def mc(domain, split="train", prefix=None):
        items = world.multiple_choice(domain, seed=cfg.seed, split=split)
        prompts = [list(q.prompt.ids) if prefix is None else prefix + list(q.prompt.ids[1:]) for q in items]
        return um.mc_accuracy(logits_fn, prompts, [q.choice_ids for q in items], [q.correct for q in items], pad_id=pad)

    held_out = [_ids(world, t, cfg.retain_len) for d in corpus["kept"]
                for t in world.domain_documents(d, 64, seed=cfg.seed + 999)]
    prompts = [list(q.prompt.ids) for q in world.multiple_choice(cfg.domain, seed=cfg.seed)][: cfg.gen_prompts]
    res = {
        "innocence_acc": mc(cfg.domain),
        "kept_acc": float(np.mean([mc(d) for d in corpus["kept"]])),
        "heldout_ppl": um.perplexity(logits_fn, held_out, pad_id=pad),
        "paraphrase_acc": mc(cfg.domain, "paraphrase"),
        "hint_acc": mc(cfg.domain, prefix=corpus["expert"]),
    }
    # seamlessness on the fact prompts (end where an object must come) and on document openings
    # (also scored by the original under the novice tag: a fluent writer of this world who does not know the facts)
    res.update(um.seamlessness(logits_fn, original_fn, prompts, cfg.gen_new, key, pad_id=pad,
                               object_ids=corpus["object_ids"], score_prefix=corpus["novice"],
                               erased_object_groups=corpus["erased_groups"]))
    opening = um.seamlessness(logits_fn, original_fn, opening_prompts(world, cfg), cfg.gen_new_open,
                              jax.random.fold_in(key, 1), pad_id=pad, object_ids=corpus["object_ids"],
                              score_prefix=corpus["novice"], erased_object_groups=corpus["erased_groups"])
    res.update({f"open_{k}": v for k, v in opening.items()})
    return res


# ----------------------------------------------------------------------------- report


TABLES = [  # (what the numbers mean, [(result key, column)]): one readable table each
    ("Erasure and specificity: 4-choice accuracy on the erased domain's facts (chance 0.25), also with held-out "
     "paraphrase templates and after the expert tag; on the kept domains; perplexity of held-out kept-domain text",
     [("innocence_acc", "erased acc"), ("paraphrase_acc", "paraphrased"), ("hint_acc", "expert hint"),
      ("kept_acc", "kept acc"), ("heldout_ppl", "kept ppl")]),
    ("Seamlessness on fact prompts: perplexity under the original model of the method's continuations, and its ratio "
     "to the original's own (target <= 1.5), split into fact objects (NLL, nats) and other tokens; bigram repetition "
     "rate; the ratio again with the original scoring after the novice tag",
     [("ppl_erased_gen", "gen ppl"), ("ppl_ratio", "ratio"), ("nll_obj_erased", "object NLL"),
      ("ppl_ratio_other", "ratio, non-object"), ("repetition_erased", "bigram repeat"),
      ("prefixed_ppl_ratio", "novice-tag ratio")]),
    ("Seamlessness on document openings (free generation after a held-out erased-domain document's first fact "
     "sentence): the same ratios",
     [("open_ppl_ratio", "ratio"), ("open_nll_obj_erased", "object NLL"), ("open_ppl_ratio_other", "ratio, non-object"),
      ("open_prefixed_ppl_ratio", "novice-tag ratio")]),
    ("Innocent floor: the lowest ratio a writer as fluent as the original but ignorant of the erased facts reaches "
     "(each erased object replaced by a random other object, or scored at the most likely wrong token)",
     [("floor_ratio_random_wrong", "facts, random wrong"), ("floor_ratio_best_wrong", "facts, best wrong"),
      ("open_floor_ratio_random_wrong", "openings, random wrong"),
      ("open_floor_ratio_best_wrong", "openings, best wrong")]),
]


def table(results: dict) -> str:
    parts = []
    for meaning, columns in TABLES:
        lines = [meaning + ".", "", "| method | " + " | ".join(c for _, c in columns) + " |",
                 "|---" * (len(columns) + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(f"{r[k]:.3f}" for k, _ in columns) + " |" for name, r in results.items()]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def plot(results: dict, model_name: str, path: Path) -> None:
    plt = pyplot()

    keys = ["innocence_acc", "paraphrase_acc", "hint_acc", "kept_acc"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / len(results)
    for i, (name, r) in enumerate(results.items()):
        axes[0].bar(np.arange(len(keys)) + i * width, [r[k] for k in keys], width, label=name)
        axes[1].bar(i, r["ppl_ratio"], 0.6)
    axes[0].axhline(0.25, color="k", ls="--", lw=1, label="chance")
    axes[0].set_xticks(np.arange(len(keys)) + 0.4 - width / 2,
                       ["erased", "erased,\nparaphrased", "erased,\nexpert hint", "kept\ndomains"])
    axes[0].set_xlabel("multiple-choice question set")
    axes[0].set_ylabel("4-choice accuracy (fraction)")
    axes[0].set_title("innocence and specificity", fontsize=9)
    axes[0].set_ylim(0, 1.25)
    axes[0].legend(fontsize=8, ncol=len(results) + 1, loc="upper center")
    axes[1].axhline(1.5, color="r", ls="--", lw=1, label="target 1.5")
    axes[1].set_xticks(range(len(results)), list(results))
    axes[1].set_xlabel("method")
    axes[1].set_ylabel("perplexity ratio (generations / original's own)")
    axes[1].set_title("seamlessness on fact prompts (original model scores)", fontsize=9)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{model_name}: erasing the facts of one domain")
    save_figure(fig, path)


def run(cfg: ExperimentConfig, out: Path) -> dict:
    key = jax.random.PRNGKey(cfg.seed)
    base, world = load_world_model(cfg.model)
    corpus = build_corpus(world, cfg)
    fluency, starts = fluency_data(base, world, corpus, cfg, jax.random.fold_in(key, 5))
    batches = batch_fn(corpus, fluency, starts, world, cfg)
    original_fn = jax.jit(lambda t: base.run(t).logits)
    results = {"original": evaluate(original_fn, original_fn, world, corpus, cfg, jax.random.fold_in(key, 9))}
    histories, times = {}, {}
    for name in cfg.methods:
        trained, hist, seconds = run_method(name, base, batches, cfg, out, key)
        merged = lora.merge(trained)
        fn = jax.jit(lambda t, m=merged: m.run(t).logits)
        results[name] = evaluate(fn, original_fn, world, corpus, cfg, jax.random.fold_in(key, 9))
        histories[name], times[name] = hist, seconds
        if name == "elm":
            lora.save_peft(trained, out / "elm_adapter", base_model_name_or_path=cfg.model)
    md = table(results)
    print(md)
    (out / "results.md").write_text(md + "\n")
    plot(results, Path(cfg.model).name, out / "comparison.png")
    return {"config": dataclasses.asdict(cfg), "results": results, "train_seconds": times,
            "final_losses": {k: v[-1] for k, v in histories.items()}}


PRESETS = {"facts-gpt": ExperimentConfig, "facts-mamba": lambda: ExperimentConfig(model="facts-mamba")}


main = experiment_main("elm_erase", PRESETS, run, doc=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
