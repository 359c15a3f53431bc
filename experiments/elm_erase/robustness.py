"""Robustness and oracle-scored fluency of an erased facts-world model (issue 25).

* The erased domain's entities are split in two halves (``split_entities``): the **attack**
  half supplies relearning data and probe training prompts, the **held-out** half is what is
  measured (4-choice questions on its domain facts, chance 0.25).
* Relearning (``relearning``): ``unlearning.metrics.relearning_attack`` fine-tunes every weight
  for k steps on (a) true fact sentences about the attack entities (``other``) or (b) about
  an unrelated domain's entities (``unrelated``); held-out accuracy after each k.
* Few-shot prompts: three true facts of attack entities with the same relation, then the question.
* Probe (``probe_accuracy``): a ridge probe on the residual stream (last prompt position, each
  layer) trained on the attack entities' erased facts, tested on the held-out entities' (chance 1/8).
* Fluency (``oracle_fluency``): continuations of erased-domain prompts scored by the retrain
  oracle (per-token NLL) and checked against the world's sentence grammar (``Grammar``).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import numpy as np

from jaxinterp.unlearning import metrics as um
from jaxinterp.unlearning.elm import pad_batch
from jaxinterp.experiments.data.facts_world import (BOS, FILLER_ADJS, FILLER_SUBJECTS, FILLER_TIMES, FILLER_VERBS,
                                                    LEAD_INS, PASSAGE_WORD, QUESTION_WORD, FactsWorld)

__all__ = ["split_entities", "fact_rows", "relearn_batches", "heldout_mc", "few_shot_mc", "probe_accuracy",
           "Grammar", "oracle_fluency", "relearning"]


def split_entities(world: FactsWorld, domain: str, seed: int = 0) -> tuple[list[str], list[str]]:
    """(attack, held-out): the domain's entities shuffled with ``seed`` and cut in half."""
    names = [e.name for e in world.entities if e.domain == domain]
    order = np.random.default_rng([seed, 25]).permutation(len(names))
    half = len(names) // 2
    return [names[i] for i in order[:half]], [names[i] for i in order[half:]]


def _fact_sentence(world: FactsWorld, subject: str, relation: str, template: int) -> str:
    rel = world.relation(relation)
    return rel.templates[template].format(subject) + f" {world.entity(subject).attributes[relation]} ."


def fact_rows(world: FactsWorld, subjects: Sequence[str], relations: Sequence[str], n_rows: int, length: int,
              rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n_rows`` rows of bos + random true fact sentences (train templates) about ``subjects`` and
    ``relations`` they have, cut at ``length`` tokens: (tokens [n, length] int32, valid [n, length])."""
    pairs = [(s, r) for s in subjects for r in relations if r in world.entity(s).attributes]
    rows = []
    for _ in range(n_rows):
        ids = [world.bos_id]
        while len(ids) < length:
            s, r = pairs[rng.integers(len(pairs))]
            ids += world.encode(_fact_sentence(world, s, r, int(rng.integers(len(world.relation(r).templates)))))
        rows.append(ids[:length])
    tokens = np.asarray(rows, np.int32)
    return tokens, np.ones_like(tokens, bool)


def relearn_batches(world: FactsWorld, subjects: Sequence[str], relations: Sequence[str], batch_size: int,
                    length: int, seed: int) -> Callable[[int], dict]:
    """``batches(step)`` for ``relearning_attack``: a pure function of (seed, step)."""
    def batches(step: int) -> dict:
        tokens, valid = fact_rows(world, subjects, relations, batch_size, length, np.random.default_rng([seed, 31, step]))
        return {"tokens": tokens, "valid": valid}
    return batches


def heldout_mc(world: FactsWorld, domain: str, subjects: Sequence[str], seed: int = 0):
    """The domain's 4-choice questions whose subject is in ``subjects``."""
    keep = set(subjects)
    return [q for q in world.multiple_choice(domain, seed=seed) if q.prompt.subject in keep]


def mc_acc(logits_fn, world: FactsWorld, items, prefixes: Sequence[Sequence[int]] | None = None) -> float:
    """4-choice accuracy; ``prefixes[i]`` (bos + context) replaces the bos of question i."""
    prompts = [list(q.prompt.ids) if prefixes is None else list(pre) + list(q.prompt.ids[1:])
               for q, pre in zip(items, prefixes or [None] * len(items))]
    return um.mc_accuracy(logits_fn, prompts, [q.choice_ids for q in items], [q.correct for q in items],
                          pad_id=world.pad_id)


def few_shot_prefixes(world: FactsWorld, items, attack: Sequence[str], shots: int = 3, seed: int = 0):
    """bos + ``shots`` true facts (same relation, attack entities, train template 0) per question."""
    rng = np.random.default_rng([seed, 41])
    out = []
    for q in items:
        subs = [attack[i] for i in rng.permutation(len(attack))[:shots]]
        text = " ".join(_fact_sentence(world, s, q.prompt.relation, 0) for s in subs)
        out.append([world.bos_id] + world.encode(text))
    return out


def relearning(model, world: FactsWorld, items, batches: dict[str, Callable], steps: Sequence[int], optimizer,
               logits_fn: Callable, seed: int = 0) -> dict[str, dict[int, float]]:
    """``{attack name: {k: held-out accuracy after k steps}}`` (k = 0 included); ``logits_fn(model)``
    -> the model's ``tokens -> logits`` function."""
    def evaluate(m):
        return mc_acc(logits_fn(m), world, items)
    return {name: um.relearning_attack(model, b, (0, *steps), evaluate, optimizer=optimizer, seed=seed)
            for name, b in batches.items()}


# ----------------------------------------------------------------------------- probe


def _probe_set(world: FactsWorld, subjects: Sequence[str], domain: str):
    prompts, labels, groups = [], [], []
    objects = [o for r in world.domain_relations(domain) for o in r.objects]
    for s in subjects:
        for r in world.domain_relations(domain):
            for t in range(len(r.templates)):
                p = world.prompt(s, r.name, t)
                prompts.append(list(p.ids))
                labels.append(objects.index(p.answer))
                groups.append([objects.index(o) for o in r.objects])
    return prompts, np.asarray(labels), np.asarray(groups)


@jax.jit
def _resid(model, tokens):
    sites = [f"blocks.{i}.resid_post" for i in range(model.config.n_layers)]
    cache = model.run(tokens, capture=sites).cache
    return jax.numpy.stack([cache[s] for s in sites])                      # [L, N, T, D]


def _last_resid(model, world: FactsWorld, prompts) -> np.ndarray:
    """``[L, N, D]``: resid_post of every layer at each prompt's last token."""
    tokens, valid = pad_batch(prompts, pad_id=world.pad_id)
    last = valid.sum(1) - 1
    return np.asarray(_resid(model, tokens))[:, np.arange(len(prompts)), last]


def probe_accuracy(model, world: FactsWorld, domain: str, attack: Sequence[str], heldout: Sequence[str],
                   l2: float = 1e-2) -> list[float]:
    """Per layer: held-out-entity accuracy of a ridge probe for the erased object (argmax over the
    question relation's 8 objects; chance 1/8), trained on the attack entities' prompts."""
    tr_p, tr_y, _ = _probe_set(world, attack, domain)
    te_p, te_y, te_groups = _probe_set(world, heldout, domain)
    n_classes = sum(len(r.objects) for r in world.domain_relations(domain))
    feats_tr, feats_te = _last_resid(model, world, tr_p), _last_resid(model, world, te_p)
    out = []
    for layer in range(len(feats_tr)):
        scores = um.ridge_probe(feats_tr[layer], tr_y, feats_te[layer], n_classes, l2=l2)
        pick = np.take_along_axis(scores, te_groups, 1).argmax(1)
        out.append(float((te_groups[np.arange(len(te_y)), pick] == te_y).mean()))
    return out


# ----------------------------------------------------------------------------- grammar


class Grammar:
    """The facts world's sentence grammar: a fact sentence is a template (train or paraphrase) of
    a relation with the name of an entity that has it and any object of that relation, then ``.``;
    a filler sentence is [lead-in] subject verb adjective time ``.``. A sentence may start with a
    document tag, ``Passage :`` or ``Question :``; ``<|endoftext|>`` separates documents.

    ``well_formed(words)``: every complete sentence parses and the unfinished tail is a prefix
    of a sentence that parses.
    """

    def __init__(self, world: FactsWorld):
        alt = lambda xs: [tuple(x.split()) for x in xs]
        self.patterns: list[list[list[tuple[str, ...]]]] = []
        for r in world.relations:
            names = [tuple(e.name.split()) for e in world.entities if r.name in e.attributes]
            for t in (*r.templates, *r.paraphrases):
                before, after = (tuple(x.split()) for x in t.split("{}"))
                self.patterns.append([[before], names, [after], alt(r.objects), [(".",)]])
        filler = [alt(FILLER_SUBJECTS), alt(FILLER_VERBS), alt(FILLER_ADJS), alt(FILLER_TIMES), [(".",)]]
        self.patterns += [filler, [alt(LEAD_INS)] + filler]
        tags = [world.expert_prefix(d) for d in world.domains] + [world.novice_prefix(d) for d in world.domains]
        self.openers = [()] + alt([*tags, PASSAGE_WORD, QUESTION_WORD])

    @staticmethod
    def _match(words: tuple[str, ...], slots, partial: bool) -> bool:
        """Whether ``words`` is the whole pattern (or, with ``partial``, a prefix of it)."""
        if not slots:
            return not words
        for option in slots[0]:
            n = len(option)
            if words[:n] == option and Grammar._match(words[n:], slots[1:], partial):
                return True
            if partial and len(words) < n and option[:len(words)] == words:
                return True
        return partial and not words

    def sentence(self, words: Sequence[str], partial: bool = False) -> bool:
        words = tuple(words)
        for opener in self.openers:
            if words[:len(opener)] == opener or (partial and opener[:len(words)] == words):
                rest = words[len(opener):]
                if any(self._match(rest, p, partial) for p in self.patterns):
                    return True
        return False

    def well_formed(self, words: Sequence[str]) -> bool:
        for doc in " ".join(words).split(BOS):
            parts = doc.split()
            cut = [i + 1 for i, w in enumerate(parts) if w == "."]
            starts = [0] + cut
            for a, b in zip(starts[:-1], cut):
                if not self.sentence(parts[a:b]):
                    return False
            if not self.sentence(parts[starts[-1]:], partial=True):
                return False
        return True


def oracle_fluency(gen_fn, oracle_fn, world: FactsWorld, grammar: Grammar, prompt_sets: dict[str, list], n_new: dict,
                   key) -> dict[str, float]:
    """For each prompt set: the oracle's per-token NLL of the continuations (``oracle_nll_<set>``)
    and the share of prompt-tail + continuation texts that are well-formed (``well_formed_<set>``).

    The judged text is the prompt after its bos plus the continuation (fact prompts end inside a
    sentence, openings at a sentence end)."""
    out = {}
    for i, (name, prompts) in enumerate(prompt_sets.items()):
        gens, nll = um.scored_continuations(gen_fn, oracle_fn, prompts, n_new[name], jax.random.fold_in(key, i),
                                            pad_id=world.pad_id)
        last_doc = [list(p)[max(j for j, t in enumerate(p) if t == world.bos_id) + 1:] for p in prompts]
        ok = [grammar.well_formed(world.decode(tail + list(g)).split()) for tail, g in zip(last_doc, gens)]
        out[f"oracle_nll_{name}"] = nll
        out[f"well_formed_{name}"] = float(np.mean(ok))
    return out
