"""Facts world: determinism, spans, single-token objects, held-out templates, tokenizer files."""

import json

import pytest

from jaxinterp.experiments.data.facts_world import BOS, FactsWorld, WorldConfig


@pytest.fixture(scope="module")
def world():
    return FactsWorld(WorldConfig(seed=0))


def test_deterministic_and_seed_dependent(world):
    again = FactsWorld(WorldConfig(seed=0))
    assert again.entities == world.entities
    assert again.documents(20, seed=3) == world.documents(20, seed=3)
    assert again.context_passages(5, seed=1) == world.context_passages(5, seed=1)
    assert again.counterfact(5, seed=2) == world.counterfact(5, seed=2)
    other = FactsWorld(WorldConfig(seed=1))
    assert [e.attributes for e in other.entities] != [e.attributes for e in world.entities]
    assert world.documents(5, seed=0) != world.documents(5, seed=1)


def test_world_shape(world):
    assert len(world.domains) >= 3 and world.erase_domain in world.domains
    assert set(world.keep_domains) == set(world.domains) - {world.erase_domain}
    assert len(world.relations) >= 8
    for e in world.entities:
        assert len(e.attributes) >= 8
        assert 2 <= len(world.encode(e.name)) <= 4
    heads = [e.name.split()[0] for e in world.entities]
    assert len(set(heads)) < len(heads)  # some names share a prefix
    for r in world.relations:
        assert len(r.templates) >= 4 and len(r.paraphrases) >= 1
        assert not set(r.templates) & set(r.paraphrases)
        for o in r.objects:
            assert len(world.encode(o)) == 1


@pytest.mark.parametrize("split", ["train", "paraphrase"])
def test_prompt_spans_and_answers(world, split):
    items = world.fact_prompts(split)
    assert len(items) == len(world.facts) * (4 if split == "train" else 2)
    for p in items:
        assert p.ids[0] == world.bos_id
        assert list(p.ids[1:]) == world.encode(p.text)
        b, e = p.subject_span
        assert world.decode(p.ids[b:e]) == p.subject
        assert world.entity(p.subject).attributes[p.relation] == p.answer
        assert world.encode(p.answer) == [p.answer_id]
        assert world.decode(p.ids).endswith(p.text)


def test_paraphrase_templates_never_in_corpus(world):
    corpus = " ".join(world.documents(3000, seed=0))
    train_hits = 0
    for p in world.fact_prompts("paraphrase"):
        assert p.text not in corpus, p.text
    for p in world.fact_prompts("train")[:200]:
        train_hits += p.text in corpus
    assert train_hits > 150  # the train templates do occur


def test_context_passages(world):
    items = world.context_passages(50, seed=0)
    for c in items:
        assert c.counterfactual
        assert c.ids[c.answer_position] == c.answer_id
        b, e = c.sentence_spans[c.answer_sentence]
        assert b <= c.answer_position < e
        sb, se = c.subject_span
        assert world.decode(c.ids[sb:se]) == c.subject
        assert world.decode(c.ids[1:]) == c.text
        assert world.entity(c.subject).attributes[c.relation] != c.answer
        # the answer sentence states the queried subject
        assert c.subject in world.decode(c.ids[b:e])


def test_counterfact_and_multiple_choice(world):
    for r in world.counterfact(20, seed=0):
        assert r.target_new != r.target_true
        assert r.target_new in world.relation(r.relation).objects
        assert r.neighborhood_prompts and all(p.subject != r.subject and p.answer == r.target_true
                                              for p in r.neighborhood_prompts)
        assert all(p.split == "paraphrase" for p in r.paraphrase_prompts)
    mcq = world.multiple_choice(world.erase_domain)
    assert len(mcq) == world.config.entities_per_domain * 4
    for q in mcq:
        assert len(set(q.choices)) == 4 and q.choices[q.correct] == q.prompt.answer
        assert q.prompt.domain == world.erase_domain


def test_domain_text(world):
    d = world.erase_domain
    assert world.expert_prefix(d) != world.novice_prefix(d)
    docs = world.domain_documents(d, 10, seed=0, tag="expert")
    assert all(doc.startswith(world.expert_prefix(d)) for doc in docs)
    names = {e.name for e in world.entities if e.domain == d}
    assert any(n in docs[0] for n in names)
    assert all(len(world.encode(t)) > 10 for t in world.filler_text(3))
    with pytest.raises(ValueError, match="domains"):
        world.domain_documents("biology", 1)


def test_tokenizer_files_open_in_transformers(world, tmp_path):
    transformers = pytest.importorskip("transformers")
    world.save_tokenizer(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["bos_token"] == BOS
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    p = world.fact_prompts("train")[7]
    assert tok(p.text, add_special_tokens=False)["input_ids"] == list(p.ids[1:])
    assert tok.convert_tokens_to_ids(BOS) == world.bos_id
    round_trip = FactsWorld.from_dir(_write_world(world, tmp_path))
    assert round_trip.entities == world.entities


def _write_world(world, path):
    world.config.to_json(path / "world.json")
    return path


def test_train_passage_sentences_changes_training_passages_only():
    """The curriculum knob: training passages take their length from train_passage_sentences
    (so the corpus equals that of a world whose passage_sentences it is), while the evaluation
    passages keep passage_sentences."""

    def n_sentences(doc):  # sentences before the first question of a training passage
        return doc.split(" Question : ")[0].count(" . ") + 1

    short = FactsWorld(WorldConfig(p_passage=1.0, train_passage_sentences=(1, 1)))
    docs = short.documents(40, seed=1)
    assert docs == FactsWorld(WorldConfig(p_passage=1.0, passage_sentences=(1, 1))).documents(40, seed=1)
    assert {n_sentences(d) for d in docs} == {1}
    assert short.context_passages(30, seed=2) == FactsWorld(WorldConfig(p_passage=1.0)).context_passages(30, seed=2)
    assert {len(c.sentence_spans) for c in short.context_passages(30, seed=2)} == {2, 3, 4, 5}
    with pytest.raises(ValueError, match="train_passage_sentences"):
        WorldConfig(train_passage_sentences=(0, 2))
    with pytest.raises(ValueError, match="train_passage_sentences"):
        WorldConfig(train_passage_sentences=(1, 9))


def test_bad_input(world):
    with pytest.raises(ValueError, match="split"):
        world.fact_prompts("test")
    with pytest.raises(KeyError, match="relations"):
        world.relation("height")
    with pytest.raises(ValueError, match="vocabulary"):
        world.encode("Zebra lives in")
    with pytest.raises(ValueError, match="entities_per_domain"):
        WorldConfig(entities_per_domain=0)
