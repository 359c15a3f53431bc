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


def test_elm_adv_term_equals_direct_computation():
    """elm_adv's extra term: ELM's erase cross-entropy after one normalised relearning step on the erase text."""
    import jax
    import jax.numpy as jnp

    import jaxinterp as ji
    from jaxinterp import lora
    from jaxinterp.experiments.elm_erase import main as exp
    from jaxinterp.experiments.elm_erase.config import ExperimentConfig
    from jaxinterp.models.gpt2 import GPT2Config
    from jaxinterp.unlearning import elm

    base = ji.init(GPT2Config.tiny(vocab_size=41, max_seq_len=32, n_layers=2), 0)
    rng = np.random.default_rng(0)
    erase = [[0] + list(rng.integers(3, 41, n)) for n in (6, 8)]
    batch = elm.make_elm_batch(erase, [0, 5, 6], [0, 8], erase, [e + [9, 10] for e in erase], [len(e) for e in erase],
                               erase_len=10, retain_len=10, fluency_len=12, pad_id=1)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    cfg = ExperimentConfig(elm=elm.ElmConfig.tiny(top_k=10), adv_lr=0.01, adv_weight=2.0,
                           lora=lora.LoraConfig(rank=2, dropout=0.0))
    lm = lora.init(base, cfg.lora, key=1)
    adapters = lm.lora.replace({k: {"A": v["A"], "B": v["B"] + 0.05} for k, v in lm.lora.weights.items()})
    key = jax.random.PRNGKey(0)
    total, terms = jax.jit(lambda a: exp._elm_adv_loss(a, base, batch, key, cfg))(adapters)
    # direct: merged weights, gradient of the erase text's NLL, the normalised step, ELM's target
    merged = lora.merge(lora.combine(adapters, base))
    tokens, valid = np.asarray(batch["erase"]), np.asarray(batch["erase_valid"])
    w = np.zeros(tokens.shape, np.float32)
    w[:, :-1] = valid[:, :-1]  # elm.next_token_nll: every valid position t predicts t + 1

    def nll(params):
        logp = jax.nn.log_softmax(merged.replace(params=params).run(tokens).logits[:, :-1], -1)
        picked = jnp.take_along_axis(logp, jnp.asarray(tokens[:, 1:, None]), -1)[..., 0]
        return -(picked * w[:, :-1]).sum() / w.sum()

    grads = jax.jit(jax.grad(nll))(merged.params)
    moved = jax.tree_util.tree_map(lambda p, g: p - 0.01 * g / (np.abs(g) + np.abs(g).mean() + 1e-12),
                                   merged.params, grads)
    target = np.exp(np.asarray(jax.jit(lambda b: elm.elm_targets(b, batch, cfg.elm))(base), np.float64))
    logp = np.asarray(jax.nn.log_softmax(exp.FORWARD(merged.replace(params=moved), tokens), -1), np.float64)
    ce = -(np.where(target > 0, target * logp, 0.0)).sum(-1)
    direct = (ce * valid).sum() / valid.sum()
    np.testing.assert_allclose(float(terms["adv"]), direct, rtol=2e-4)
    e = cfg.elm  # the total is ELM's weighted sum plus adv_weight x the new term
    plain = e.erase_weight * terms["erase"] + e.retain_weight * terms["retain"] + e.fluency_weight * terms["fluency"]
    np.testing.assert_allclose(float(total), float(plain) + 2.0 * direct, rtol=2e-4)
