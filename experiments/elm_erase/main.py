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
from jaxinterp.unlearning import attacks as ua
from jaxinterp.unlearning import elm
from jaxinterp.unlearning import baselines as ub
from jaxinterp.unlearning import metrics as um
from jaxinterp.experiments.data.facts_world import DOMAINS, FactsWorld, load_world_model
from jaxinterp.experiments.common import UsageError, experiment_main, pyplot, save_figure
from jaxinterp.experiments.elm_erase import robustness as rb
from jaxinterp.experiments.elm_erase.config import ExperimentConfig


# one compiled forward per (config, shape), shared by every model of the run (a jit per model
# closure would recompile for each model and each relearning step count)
FORWARD = jax.jit(lambda model, tokens: model.run(tokens).logits)


def logits_fn(model):
    return lambda tokens: FORWARD(model, tokens)


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
    elif name == "elm_adv":
        loss_fn = lambda a, b, batch, k: _elm_adv_loss(a, b, batch, k, cfg)
        opt = optax.adamw(cfg.elm.lr, weight_decay=cfg.elm.weight_decay)
    elif name == "ga":
        gcfg = ub.GAConfig(retain_weight=cfg.elm.retain_weight)
        loss_fn = lambda a, b, batch, k: ub.ga_loss(a, b, batch, k, gcfg)
        opt = optax.adamw(cfg.ga_lr, weight_decay=cfg.elm.weight_decay)
    else:
        layer = cfg.rmu_layer if cfg.rmu_layer is not None else base.config.n_layers // 2
        rcfg = ub.RMUConfig(layer=layer, steer=cfg.rmu_steer, alpha=cfg.rmu_alpha if name == "rmu" else 0.0)
        b0 = batches(0)
        control = ub.rmu_direction(base, jnp.asarray(b0["erase"]), jnp.asarray(b0["erase_valid"]), rcfg,
                                   jax.random.fold_in(key, 2))
        if name == "rmu":
            loss_fn = lambda a, b, batch, k: ub.rmu_loss(a, b, batch, k, rcfg, control)
        else:  # elm_rmu: ELM's loss plus RMU's erase term (its retain is ELM's)
            loss_fn = lambda a, b, batch, k: _elm_rmu_loss(a, b, batch, k, cfg, rcfg, control)
        opt = optax.adamw(cfg.elm.lr, weight_decay=cfg.elm.weight_decay)
    t0 = time.perf_counter()
    state = train.init_state(lm.lora, opt, jax.random.fold_in(key, 3))
    loop = train.LoopConfig(steps=cfg.steps, save_every=max(1, cfg.steps // 3), desc=name)
    state, hist = train.fit(train.make_train_step(train.loss_step(loss_fn, opt)), state, batches, loop,
                            directory=out / "ckpt" / name, frozen=lm.base, run_config=_config_dict(cfg),
                            may_change=TRAINING_FREE_FIELDS)
    return lora.combine(state["params"], lm.base), hist, time.perf_counter() - t0


def _elm_rmu_loss(adapters, base, batch, key, cfg: ExperimentConfig, rcfg: ub.RMUConfig, control):
    k1, k2 = jax.random.split(key)
    total, terms = elm.elm_loss(adapters, base, batch, k1, cfg.elm)
    _, rmu_terms = ub.rmu_loss(adapters, base, batch, k2, rcfg, control)
    return total + cfg.rmu_weight * rmu_terms["erase"], {**terms, "rmu": rmu_terms["erase"]}


def _elm_adv_loss(adapters, base, batch, key, cfg: ExperimentConfig):
    """ELM plus its erase term after a simulated relearning step (first order).

    The step: every weight of the adapted model moves by ``-adv_lr * g / (|g| + mean|g|)``
    (an Adam-like normalised step; ``g`` = gradient of the NLL of the erase text, which states
    the true facts), treated as a constant; the erase term is the soft cross-entropy to ELM's
    target at the moved weights, so the adapters learn an erasure that one relearning step does
    not undo. ``adv_weight`` weighs it.
    """
    total, terms = elm.elm_loss(adapters, base, batch, key, cfg.elm)
    student = lora.effective_model(lora.combine(adapters, base))
    tokens, valid = batch["erase"], batch["erase_valid"]

    def nll(params):
        return elm.next_token_nll(student.replace(params=params).run(tokens).logits, tokens, valid)

    grads = jax.grad(nll)(jax.lax.stop_gradient(student.params))
    step = jax.tree_util.tree_map(lambda g: -cfg.adv_lr * g / (jnp.abs(g) + jnp.mean(jnp.abs(g)) + 1e-12), grads)
    moved = student.replace(params=jax.tree_util.tree_map(lambda p, d: p + jax.lax.stop_gradient(d),
                                                          student.params, step))
    target = elm.elm_targets(base, batch, cfg.elm)
    adv = elm.soft_cross_entropy(moved.run(tokens).logits, target, valid)
    return total + cfg.adv_weight * adv, {**terms, "adv": adv}


# a resume may change these (evaluation only, or other methods); any other change is refused
TRAINING_FREE_FIELDS = ("steps", "methods", "gen_prompts", "gen_new", "gen_new_open", "oracle", "robustness",
                        "seamless", "measure_original",
                        "relearn_steps", "relearn_lr", "relearn_batch", "relearn_len", "unrelated_domain",
                        "oracle_fluency", "gcg_iters", "gcg_candidates", "gcg_len", "gcg_top_k")


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
    if not cfg.seamless:
        return res
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


def evaluate_robustness(model, oracle_fn, world, corpus, cfg: ExperimentConfig, key) -> dict:
    """Relearning curves, few-shot and probe accuracy on the held-out erased entities, and the
    oracle-scored fluency of the model's continuations (``robustness.py``)."""
    attack, heldout = rb.split_entities(world, cfg.domain, cfg.seed)
    items = rb.heldout_mc(world, cfg.domain, heldout, cfg.seed)
    res: dict = gcg_attack(model, world, cfg, attack, items) if cfg.gcg_iters else {}
    if oracle_fn is not None and cfg.oracle_fluency:
        prompts = {"facts": [list(q.prompt.ids) for q in world.multiple_choice(cfg.domain, seed=cfg.seed)][: cfg.gen_prompts],
                   "open": opening_prompts(world, cfg)}
        res.update(rb.oracle_fluency(model, oracle_fn, world, _grammar(world), prompts,
                                     {"facts": cfg.gen_new, "open": cfg.gen_new_open}, jax.random.fold_in(key, 21)))
    if not cfg.robustness:
        return res
    relations = [r.name for r in world.domain_relations(cfg.domain)]
    unrelated = [e.name for e in world.entities if e.domain == cfg.unrelated_domain]
    batches = {"other": rb.relearn_batches(world, attack, relations, cfg.relearn_batch, cfg.relearn_len, cfg.seed),
               "unrelated": rb.relearn_batches(world, unrelated, [r.name for r in world.domain_relations(
                   cfg.unrelated_domain)], cfg.relearn_batch, cfg.relearn_len, cfg.seed)}
    curves = rb.relearning(model, world, items, batches, cfg.relearn_steps, _relearn_optimizer(cfg.relearn_lr),
                           logits_fn, cfg.seed)
    for name, curve in curves.items():
        res.update({f"relearn_{name}_{k}": v for k, v in curve.items()})
    res["heldout_acc"] = curves["other"][0]
    res["few_shot_acc"] = rb.mc_acc(logits_fn(model), world, items,
                                    rb.few_shot_prefixes(world, items, attack, seed=cfg.seed))
    probe = rb.probe_accuracy(model, world, cfg.domain, attack, heldout)
    res.update({f"probe_layer{i}": v for i, v in enumerate(probe)})
    res["probe_best"] = max(probe)
    return res


def gcg_attack(model, world, cfg: ExperimentConfig, attack, items) -> dict:
    """GCG-style search for ``gcg_len`` tokens after the bos of the attack half's questions that maximise the
    true answer's log-prob; held-out accuracy with them (``gcg_acc``), the training objective and the tokens."""
    train_q = rb.heldout_mc(world, cfg.domain, attack, cfg.seed)
    gcfg = ua.GCGConfig(suffix_len=cfg.gcg_len, iterations=cfg.gcg_iters, candidates=cfg.gcg_candidates,
                        top_k=cfg.gcg_top_k, seed=cfg.seed)
    found = ua.gcg_suffix(model, [list(q.prompt.ids) for q in train_q], [q.choice_ids[q.correct] for q in train_q],
                          gcfg, init=[world.encode(".")[0]] * cfg.gcg_len, pad_id=world.pad_id)
    prompts = [ua.with_suffix(q.prompt.ids, found.suffix) for q in items]
    acc = um.mc_accuracy(logits_fn(model), prompts, [q.choice_ids for q in items], [q.correct for q in items],
                         pad_id=world.pad_id)
    return {"gcg_acc": acc, "gcg_train_logp": found.objective, "gcg_train_logp_start": found.history[0],
            "gcg_suffix": world.decode(found.suffix)}


_GRAMMARS: dict = {}
_OPTIMIZERS: dict = {}


def _grammar(world):
    return _GRAMMARS.setdefault(id(world), rb.Grammar(world))


def _relearn_optimizer(lr: float):
    # one optimizer object per lr: relearning_attack compiles its step once per optimizer
    return _OPTIMIZERS.setdefault(lr, optax.adam(lr))


def load_oracle(source: str, world):
    """The oracle model, refused if it was trained on another facts world."""
    oracle, oracle_world = load_world_model(source)
    if oracle_world.facts != world.facts:
        raise UsageError(f"oracle {source!r} was trained on another facts world than the model; "
                         f"pass --set oracle=<a retrain of this model's world> or oracle=none")
    return oracle


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
    ("Robustness on the held-out half of the erased domain's entities (4-choice accuracy, chance 0.25): as is, after "
     "k steps of full fine-tuning on true facts of the OTHER half (relearn other k) or of an unrelated domain "
     "(relearn unrelated k), with 3 true facts as few-shot context, with GCG-searched adversarial tokens after the bos "
     "(searched on the other half); and the best layer's accuracy of a linear probe "
     "for the erased object on the residual stream (trained on the other half, chance 0.125)",
     [("heldout_acc", "held-out acc"), ("relearn_other_1", "other 1"), ("relearn_other_3", "other 3"),
      ("relearn_other_10", "other 10"), ("relearn_unrelated_1", "unrelated 1"), ("relearn_unrelated_3", "unrelated 3"),
      ("relearn_unrelated_10", "unrelated 10"), ("few_shot_acc", "few-shot"), ("gcg_acc", "GCG tokens"),
      ("probe_best", "probe (best layer)")]),
    ("Seamlessness judged by the retrain oracle: its per-token NLL (nats) of the model's continuations of erased-domain "
     "prompts (lower = as fluent as a model that never knew), and the share of continuations that are well-formed "
     "facts-world sentences (grammar of the world's templates)",
     [("oracle_nll_facts", "oracle NLL, fact prompts"), ("oracle_nll_open", "oracle NLL, openings"),
      ("well_formed_facts", "well-formed, fact prompts"), ("well_formed_open", "well-formed, openings")]),
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
        rows = {name: r for name, r in results.items() if any(k in r for k, _ in columns)}
        if not rows:
            continue
        lines += [f"| {name} | " + " | ".join(f"{r[k]:.3f}" if k in r else "-" for k, _ in columns) + " |"
                  for name, r in rows.items()]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def plot(results: dict, model_name: str, path: Path) -> None:
    plt = pyplot()

    keys = ["innocence_acc", "paraphrase_acc", "hint_acc", "kept_acc"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / len(results)
    for i, (name, r) in enumerate(results.items()):
        axes[0].bar(np.arange(len(keys)) + i * width, [r[k] for k in keys], width, label=name)
        axes[1].bar(i, r.get("ppl_ratio", np.nan), 0.6)
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
    original_fn = logits_fn(base)
    oracle = load_oracle(cfg.oracle, world) if cfg.oracle else None
    oracle_fn = logits_fn(oracle) if oracle is not None else None
    eval_seconds: dict = {}

    def measure(name, model):
        t0 = time.perf_counter()
        row = evaluate(logits_fn(model), original_fn, world, corpus, cfg, jax.random.fold_in(key, 9))
        row.update(evaluate_robustness(model, oracle_fn, world, corpus, cfg, jax.random.fold_in(key, 9)))
        eval_seconds[name] = time.perf_counter() - t0
        print(f"{name}: measured in {eval_seconds[name]:.0f} s", flush=True)
        return row

    results = {"original": measure("original", base)} if cfg.measure_original else {}
    histories, times = {}, {}
    for name in cfg.methods:
        trained, hist, seconds = run_method(name, base, batches, cfg, out, key)
        merged = lora.merge(trained)
        results[name] = measure(name, merged)
        histories[name], times[name] = hist, seconds
        if name == "elm":
            lora.save_peft(trained, out / "elm_adapter", base_model_name_or_path=cfg.model)
    if oracle is not None:
        results["oracle"] = measure("oracle", oracle)
    md = table(results)
    print(md)
    (out / "results.md").write_text(md + "\n")
    plot(results, Path(cfg.model).name, out / "comparison.png")
    # the step counts and batch sizes that actually ran (the training histories), not only the config's
    steps_run = {k: int(v[-1]["step"]) if v else 0 for k, v in histories.items()}
    return {"config": dataclasses.asdict(cfg), "results": results, "train_seconds": times,
            "eval_seconds": eval_seconds, "steps_run": steps_run,
            "batch_size_run": {k: cfg.batch_size for k in histories},
            "relearn_steps_run": list(cfg.relearn_steps) if cfg.robustness else [],
            "final_losses": {k: v[-1] for k, v in histories.items()}}


PRESETS = {"facts-gpt": ExperimentConfig, "facts-mamba": lambda: ExperimentConfig(model="facts-mamba")}


main = experiment_main("elm_erase", PRESETS, run, doc=__doc__)


if __name__ == "__main__":
    raise SystemExit(main())
