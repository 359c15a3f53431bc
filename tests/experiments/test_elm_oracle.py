"""The retrain oracle's corpus (train_lm ``data.without_domain``) and the elm_erase robustness helpers."""

import numpy as np
import pytest

from jaxinterp.experiments.data.facts_world import FactsWorld, WorldConfig
from jaxinterp.experiments.train_lm.config import get_config
from jaxinterp.experiments.train_lm.data import FactsBatches, withhold_facts

WORLD = FactsWorld(WorldConfig())


def _true_fact_sentences(domain: str) -> set[str]:
    """Every sentence that states a true fact of ``domain``'s own relations (train templates)."""
    out = set()
    for e in WORLD.entities:
        for r in WORLD.domain_relations(domain):
            if r.name in e.attributes:
                out |= {t.format(e.name) + f" {e.attributes[r.name]} ." for t in r.templates}
    return out


def _sentences(text: str) -> list[str]:
    parts = [p.strip() for p in text.split(" .")]
    return [p + " ." for p in parts if p]


def test_withhold_facts_drops_exactly_the_true_erased_facts():
    rng = np.random.default_rng(0)
    facts = _true_fact_sentences("pathogens")
    dropped = kept_whole = 0
    for _ in range(600):
        doc = WORLD.sample_document(rng)
        out = withhold_facts(WORLD, doc, "pathogens")
        if doc.startswith("Passage :") or doc.startswith("A novice on"):
            assert out == doc  # random objects: no information about the facts, kept whole
            kept_whole += 1
            continue
        tag = next((WORLD.expert_prefix(d) for d in WORLD.domains if doc.startswith(WORLD.expert_prefix(d))), "")
        want = [s for s in _sentences(doc[len(tag):]) if s not in facts]
        dropped += len(_sentences(doc[len(tag):])) - len(want)
        if not want:
            assert out is None
        else:
            assert out == " ".join(([tag] if tag else []) + want)
            assert not facts & set(_sentences(out[len(tag):]))
    assert dropped > 50 and kept_whole > 50
    # the other domains' corpora are untouched
    for doc in WORLD.domain_documents("astronomy", 20) + WORLD.domain_documents("cuisine", 20):
        assert withhold_facts(WORLD, doc, "pathogens") == doc


def test_oracle_batches_are_deterministic_and_fact_free():
    cfg = get_config("facts-gpt-oracle")
    assert cfg.data.without_domain == "pathogens" and cfg.train == get_config("facts-gpt").train
    a = FactsBatches(WORLD, 4, 96, 0, "pathogens")
    np.testing.assert_array_equal(a.batch(3), a.batch(3))
    text = " ".join(WORLD.decode(r) for r in a.batch(0))
    facts = _true_fact_sentences("pathogens")
    for doc in text.split("<|endoftext|>")[1:-1]:  # whole documents (the row's last one is cut)
        doc = doc.strip()
        if not (doc.startswith("Passage :") or doc.startswith("A novice on")):
            assert not facts & set(_sentences(doc))
    with pytest.raises(ValueError, match="without_domain"):
        get_config("facts-gpt", ["data.without_domain=biology"])


def test_grammar_accepts_the_corpus_and_rejects_broken_sentences():
    from jaxinterp.experiments.elm_erase.robustness import Grammar

    g = Grammar(WORLD)
    rng = np.random.default_rng(1)
    for _ in range(30):
        doc = WORLD.sample_document(rng)
        assert g.well_formed(doc.split()), doc
        words = doc.split()
        assert g.well_formed(words[: len(words) // 2])  # an unfinished sentence at the end is fine
    e = next(x for x in WORLD.entities if x.domain == "pathogens")
    a = next(x for x in WORLD.entities if x.domain == "astronomy")
    ok = f"{e.name} studies the pathogen anthrax . the river was calm at night ."
    assert g.well_formed(ok.split())
    assert g.well_formed(f"<|endoftext|> An expert on pathogens writes : {ok}".split())
    bad = [f"{e.name} studies the pathogen Paris .",          # object of another relation
           f"{a.name} studies the pathogen anthrax .",         # an astronomer has no pathogen
           f"{e.name.split()[0]} studies the pathogen anthrax .",  # a broken name
           f"{e.name} studies the the pathogen anthrax .",
           f"the river was calm . {e.name} studies <pad>",
           "the river was ."]
    for text in bad:
        assert not g.well_formed(text.split()), text


def test_relearning_rows_state_true_facts_of_the_given_entities():
    from jaxinterp.experiments.elm_erase import robustness as rb

    attack, held = rb.split_entities(WORLD, "pathogens", seed=0)
    assert len(attack) == len(held) == 8 and not set(attack) & set(held)
    assert set(attack) | set(held) == {x.name for x in WORLD.entities if x.domain == "pathogens"}
    rels = [r.name for r in WORLD.domain_relations("pathogens")]
    batch = rb.relearn_batches(WORLD, attack, rels, 4, 40, seed=0)(2)
    assert batch["tokens"].shape == (4, 40) and batch["valid"].all()
    np.testing.assert_array_equal(batch["tokens"], rb.relearn_batches(WORLD, attack, rels, 4, 40, seed=0)(2)["tokens"])
    truth = {t.format(x) + f" {WORLD.entity(x).attributes[r]} ." for x in attack for r in rels
             for t in WORLD.relation(r).templates}
    for row in batch["tokens"]:
        sentences = _sentences(WORLD.decode(row[1:]))[:-1]  # the last one may be cut
        assert sentences and all(s in truth for s in sentences)
    items = rb.heldout_mc(WORLD, "pathogens", held)
    assert len(items) == 32 and {q.prompt.subject for q in items} == set(held)
    for q, pre in zip(items, rb.few_shot_prefixes(WORLD, items, attack)):
        shots = _sentences(WORLD.decode(pre[1:]))
        assert len(shots) == 3 and all(s in truth for s in shots)
        assert all(WORLD.relation(q.prompt.relation).templates[0].format("") .split()[0] in s for s in shots)
