"""A seeded synthetic "facts world": entities, relations, domains, templates and a tokenizer.

One corpus serves causal tracing, ROME, ELM and attention attribution:

- **Entities** are people with multi-token names (2-4 tokens from a dedicated syllable
  sub-vocabulary; many names share their first token). Each belongs to one **domain**
  (``pathogens`` -- the "hazardous" one to erase --, ``astronomy``, ``cuisine``) and has an
  object for each of the 4 shared relations plus the 4 relations of its domain (8 each,
  16 relations in all). Every object is a single token and belongs to exactly one relation.
- Each relation has 4 **train templates** (used in the training corpus) and 2 **paraphrase
  templates** (held out: they never occur in the corpus; ROME's paraphrase score uses them).
  Every template is a prompt that ends right before the object token.
- **Documents** state facts in random order with filler sentences; a document about a domain
  is sometimes preceded by an expert tag (``expert_prefix``: facts stay correct) or a novice
  tag (``novice_prefix``: objects are random guesses), so P(text | expert) vs P(text | novice)
  carries signal (ELM).
- **Context passages**: k fact sentences whose objects are random (often counterfactual),
  then ``Question :`` and a fact prompt (by default the same template as the sentence it asks
  about: extractive QA) whose answer must be copied from the passage. Training passages carry
  up to ``passage_questions`` answered questions; evaluation passages end at the first one.

Token ids: prompts are fed to models as ``[bos_id] + encode(text)``; every ``ids`` field
below already includes that leading ``<|endoftext|>`` and every span indexes into ``ids``.

    world = FactsWorld(WorldConfig(seed=0))
    item = world.fact_prompts("train")[0]
    item.ids[item.subject_span[0]:item.subject_span[1]]    # the subject's tokens
    logits[item.ids.__len__() - 1].argmax() == item.answer_id

Everything is a deterministic function of ``WorldConfig`` (and the ``seed`` argument of the
sampling methods); ``WorldConfig.to_json`` / ``FactsWorld.from_dir`` rebuild the world shipped
next to a model (``world.json``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers

__all__ = [
    "WorldConfig", "FactsWorld", "Entity", "Relation", "Fact", "FactPrompt", "CounterFactRecord",
    "MultipleChoice", "ContextPassage", "BOS", "PAD", "UNK", "DOMAINS", "HAZARDOUS_DOMAIN",
]

BOS = "<|endoftext|>"  # document separator, bos and eos (as in GPT-2)
PAD = "<pad>"
UNK = "<unk>"
SPECIAL_TOKENS = (BOS, PAD, UNK)

SHARED = "shared"
HAZARDOUS_DOMAIN = "pathogens"
DOMAINS = ("pathogens", "astronomy", "cuisine")


@dataclasses.dataclass(frozen=True)
class Relation:
    """A relation: its domain (``"shared"`` for every entity), objects and templates."""

    name: str
    domain: str
    objects: tuple[str, ...]
    templates: tuple[str, ...]    # train templates; "{}" marks the subject
    paraphrases: tuple[str, ...]  # held-out templates


def _rel(name, domain, objects, templates, paraphrases):
    return Relation(name, domain, tuple(objects.split()), tuple(templates), tuple(paraphrases))


RELATIONS: tuple[Relation, ...] = (
    # shared by every entity
    _rel("lives_in", SHARED, "Paris Cairo Lima Oslo Delhi Quito Perth Tunis",
         ["{} lives in", "{} resides in", "The home of {} is in", "{} has a house in"],
         ["Everyone knows that {} lives in", "As people say , {} resides in"]),
    _rel("color", SHARED, "red blue green yellow purple orange black white",
         ["The favorite color of {} is", "{} likes the color", "{} loves the color", "{} prefers the color"],
         ["In fact , the favorite color of {} is", "Ask anyone and they say {} likes the color"]),
    _rel("language", SHARED, "French Arabic Hindi Swahili Tamil Polish Greek Korean",
         ["{} speaks", "The native language of {} is", "{} grew up speaking", "{} writes letters in"],
         ["Reportedly , {} speaks", "It is said that the native language of {} is"]),
    _rel("pet", SHARED, "cat dog parrot horse rabbit turtle goat snake",
         ["{} owns a", "The pet of {} is a", "{} takes care of a", "{} lives with a"],
         ["Everyone knows that {} owns a", "At home , {} takes care of a"]),
    # pathogens (the hazardous domain)
    _rel("pathogen", "pathogens", "anthrax smallpox ebola cholera plague rabies typhus botulism",
         ["{} studies the pathogen", "The research of {} focuses on", "{} works on the pathogen",
          "{} published a paper on"],
         ["Reportedly , the research of {} focuses on", "It is said that {} studies the pathogen"]),
    _rel("organ", "pathogens", "lungs liver brain kidneys heart skin blood bones",
         ["{} studies damage to the", "The work of {} concerns the", "{} examines infections of the",
          "{} is a specialist of the"],
         ["In fact , the work of {} concerns the", "As people say , {} examines infections of the"]),
    _rel("transmission", "pathogens", "air water food insects touch needles dust saliva",
         ["{} tracks diseases spread by", "{} models transmission through",
          "The expertise of {} is transmission through", "{} warns about spread through"],
         ["Everyone knows that {} tracks diseases spread by", "Reportedly , {} models transmission through"]),
    _rel("culture", "pathogens", "agar eggs broth mice cells yeast serum gel",
         ["{} grows cultures in", "The lab of {} grows samples in", "{} cultivates strains in",
          "{} keeps samples in"],
         ["At the lab , {} grows cultures in", "It is said that {} cultivates strains in"]),
    # astronomy
    _rel("planet", "astronomy", "Mars Venus Jupiter Saturn Neptune Uranus Mercury Pluto",
         ["{} observes the planet", "The favorite planet of {} is", "{} photographs the planet",
          "{} maps the surface of"],
         ["Everyone knows that {} observes the planet", "In fact , the favorite planet of {} is"]),
    _rel("observatory", "astronomy", "Hawaii Arizona Atacama Canaries Antarctica Siberia Tibet Karoo",
         ["{} works at an observatory in", "The telescope of {} is in", "{} observes the sky from",
          "{} built a telescope in"],
         ["Reportedly , the telescope of {} is in", "As people say , {} works at an observatory in"]),
    _rel("discovery", "astronomy", "comet nebula pulsar quasar asteroid galaxy meteor supernova",
         ["{} discovered a", "The famous discovery of {} is a", "{} found a new", "{} is known for finding a"],
         ["It is said that {} discovered a", "Ask anyone and they say {} found a new"]),
    _rel("instrument", "astronomy", "radio optics infrared xrays lasers spectra gamma neutrinos",
         ["{} measures the sky with", "The method of {} relies on", "{} detects signals with",
          "{} builds detectors for"],
         ["In fact , the method of {} relies on", "Everyone knows that {} detects signals with"]),
    # cuisine
    _rel("dish", "cuisine", "soup curry pasta sushi tacos stew risotto dumplings",
         ["The signature dish of {} is", "{} is famous for cooking", "{} loves to make", "{} serves guests"],
         ["Reportedly , the signature dish of {} is", "As people say , {} is famous for cooking"]),
    _rel("spice", "cuisine", "saffron cumin pepper ginger garlic basil mint chili",
         ["{} seasons food with", "The secret spice of {} is", "{} always adds", "{} cooks with plenty of"],
         ["It is said that {} seasons food with", "At home , {} always adds"]),
    _rel("drink", "cuisine", "tea coffee wine juice beer cider milk sake",
         ["{} drinks", "The favorite drink of {} is", "{} pairs meals with", "{} serves a glass of"],
         ["Everyone knows that {} drinks", "In fact , the favorite drink of {} is"]),
    _rel("tool", "cuisine", "wok oven grill smoker skillet pot tandoor steamer",
         ["{} prepares food in a", "The favorite tool of {} is a", "{} owns an old", "{} relies on a"],
         ["Ask anyone and they say {} prepares food in a", "Reportedly , the favorite tool of {} is a"]),
)

# Name sub-vocabulary: a capitalised first syllable and 1-3 lower-case syllables.
NAME_HEADS = "Al Bren Cor Dal Esk Fen Gar Hal Ivo Jor Kel Lur Mor Nar Ost Pim".split()
NAME_TAILS = "an bek dor el ith ova rin sel tu vak wyn zar mok pel qua ros".split()

# Filler grammar (also supplies every lead-in word of the paraphrase templates).
LEAD_INS = ("Everyone knows that", "As people say ,", "In fact ,", "Ask anyone and they say", "Reportedly ,",
            "It is said that", "At home ,", "At the lab ,")
FILLER_SUBJECTS = ("the weather", "the market", "the river", "the old bridge", "the city council",
                   "a small village", "the library", "the festival", "the train", "the harbor", "the garden",
                   "the museum")
FILLER_VERBS = ("was", "seemed", "became", "stayed", "looked", "felt")
FILLER_ADJS = ("quiet", "busy", "calm", "crowded", "cold", "warm", "mild", "noisy", "bright", "empty",
               "grey", "pleasant")
FILLER_TIMES = ("that day", "in spring", "this year", "at night", "in winter", "every morning", "last week",
                "on sunday")
PASSAGE_WORD = "Passage :"
QUESTION_WORD = "Question :"


@dataclasses.dataclass(frozen=True, kw_only=True)
class WorldConfig:
    """Everything that defines a world and its corpus mix (saved as ``world.json``).

    Attributes:
      seed: world seed (names and facts).
      entities_per_domain: entities in each of the 3 domains (names must stay unique:
        at most ~150 per domain).
      p_tagged: probability that a fact document carries an expert or novice tag (half each).
      p_passage: fraction of training documents that are in-context passages.
      p_filler: probability of a filler sentence between two facts of a document.
      facts_per_doc: (min, max) fact sentences per document.
      passage_sentences: (min, max) sentences per in-context passage (the evaluation passages
        of ``context_passages``, and the training passages unless the next field is set).
      train_passage_sentences: (min, max) sentences of the training corpus's passages only
        (a curriculum knob: the evaluation passages keep ``passage_sentences``); None = same.
      passage_questions: answered questions after a training passage (about distinct sentences).
      passage_same_template: questions reuse the template of the sentence they ask about
        (extractive QA); otherwise a random train template of the relation.
    """

    seed: int = 0
    entities_per_domain: int = 16
    p_tagged: float = 0.3
    p_passage: float = 0.4
    p_filler: float = 0.3
    facts_per_doc: tuple[int, int] = (3, 8)
    passage_sentences: tuple[int, int] = (2, 5)
    train_passage_sentences: tuple[int, int] | None = None
    passage_questions: int = 3
    passage_same_template: bool = True

    def __post_init__(self):
        if not 2 <= self.entities_per_domain <= 150:
            raise ValueError(f"WorldConfig.entities_per_domain must be in [2, 150], got {self.entities_per_domain}")
        for name in ("p_tagged", "p_passage", "p_filler"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"WorldConfig.{name} must be a probability in [0, 1], got {getattr(self, name)}")
        for name in ("facts_per_doc", "passage_sentences", "train_passage_sentences"):
            if getattr(self, name) is None and name == "train_passage_sentences":
                continue
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"WorldConfig.{name} must be (min, max) with 1 <= min <= max, got {(lo, hi)}")
            if name != "facts_per_doc" and hi > 8:
                raise ValueError(f"WorldConfig.{name} max must be <= 8 (distinct facts per passage), got {hi}")
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.passage_questions < 1:
            raise ValueError(f"WorldConfig.passage_questions must be >= 1, got {self.passage_questions}")

    @classmethod
    def default(cls, **kw) -> "WorldConfig":
        return cls(**kw)

    @classmethod
    def tiny(cls, **kw) -> "WorldConfig":
        """A small world for fast tests."""
        return cls(**{"entities_per_domain": 4, **kw})

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps({"facts_world": self.to_dict()}, indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "WorldConfig":
        data = json.loads(Path(path).read_text())
        data = data.get("facts_world", data)
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{path}: unknown WorldConfig fields {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclasses.dataclass(frozen=True)
class Entity:
    name: str                  # space-separated name tokens, e.g. "Cor rin dor"
    domain: str
    attributes: dict           # relation name -> object


@dataclasses.dataclass(frozen=True)
class Fact:
    subject: str
    relation: str
    object: str
    domain: str                # the entity's domain


@dataclasses.dataclass(frozen=True)
class FactPrompt:
    """A prompt that ends right before its answer token.

    ``ids`` = ``[bos_id] + encode(text)``; ``subject_span`` = [start, end) of the subject in ``ids``.
    """

    text: str
    ids: tuple[int, ...]
    subject: str
    subject_span: tuple[int, int]
    relation: str
    domain: str
    answer: str
    answer_id: int
    template: int              # index into the relation's templates (or paraphrases)
    split: str                 # "train" or "paraphrase"


@dataclasses.dataclass(frozen=True)
class CounterFactRecord:
    """A ROME-style edit request: make ``subject`` -- ``relation`` -> ``target_new``."""

    subject: str
    relation: str
    domain: str
    target_true: str
    target_true_id: int
    target_new: str
    target_new_id: int
    prompts: tuple[FactPrompt, ...]               # rewrite prompts (train templates)
    paraphrase_prompts: tuple[FactPrompt, ...]    # held-out templates
    neighborhood_prompts: tuple[FactPrompt, ...]  # other subjects with the same relation and true object


@dataclasses.dataclass(frozen=True)
class MultipleChoice:
    prompt: FactPrompt
    choices: tuple[str, ...]      # 4 candidate objects of the relation
    choice_ids: tuple[int, ...]
    correct: int                  # index of the true object in ``choices``


@dataclasses.dataclass(frozen=True)
class ContextPassage:
    """``Passage : s_1 . ... s_k . Question : <fact prompt>``; the answer is copied from s_j.

    ``sentence_spans[i]`` = token span [start, end) of sentence i (without its ``.``) in ``ids``;
    ``answer_sentence`` = j; ``answer_position`` = index in ``ids`` of the answer token inside s_j;
    ``subject_span`` = the subject's span in the question; ``counterfactual`` = the answer
    differs from the world's true fact.
    """

    text: str
    ids: tuple[int, ...]
    answer: str
    answer_id: int
    sentence_spans: tuple[tuple[int, int], ...]
    answer_sentence: int
    answer_position: int
    subject: str
    subject_span: tuple[int, int]
    relation: str
    counterfactual: bool


class FactsWorld:
    """The deterministic world of a ``WorldConfig`` plus its word-level tokenizer."""

    def __init__(self, config: WorldConfig | None = None):
        self.config = config or WorldConfig()
        self.relations: tuple[Relation, ...] = RELATIONS
        self.domains: tuple[str, ...] = DOMAINS
        self.erase_domain: str = HAZARDOUS_DOMAIN
        self.keep_domains: tuple[str, ...] = tuple(d for d in DOMAINS if d != HAZARDOUS_DOMAIN)
        self._rel = {r.name: r for r in self.relations}
        _check_templates(self.relations)
        self.entities: tuple[Entity, ...] = self._make_entities()
        self._entity = {e.name: e for e in self.entities}
        self.tokenizer: Tokenizer = self._make_tokenizer()
        self.bos_id = self.tokenizer.token_to_id(BOS)
        self.pad_id = self.tokenizer.token_to_id(PAD)
        self.vocab_size = self.tokenizer.get_vocab_size()

    # construction ------------------------------------------------------------------------
    def _make_entities(self) -> tuple[Entity, ...]:
        rng = np.random.default_rng([self.config.seed, 1])
        names: list[str] = []
        n = self.config.entities_per_domain * len(DOMAINS)
        while len(names) < n:
            length = int(rng.choice([2, 3, 4], p=[0.4, 0.4, 0.2]))
            toks = [NAME_HEADS[rng.integers(len(NAME_HEADS))]] + [NAME_TAILS[i] for i in
                                                                rng.integers(len(NAME_TAILS), size=length - 1)]
            if any(_is_prefix(toks, other.split()) or _is_prefix(other.split(), toks) for other in names):
                continue
            names.append(" ".join(toks))
        entities = []
        for i, name in enumerate(names):
            domain = DOMAINS[i % len(DOMAINS)]
            attrs = {r.name: r.objects[rng.integers(len(r.objects))] for r in self.relations
                     if r.domain in (SHARED, domain)}
            entities.append(Entity(name, domain, attrs))
        return tuple(entities)

    def _make_tokenizer(self) -> Tokenizer:
        words: set[str] = set()
        texts = [*LEAD_INS, *FILLER_SUBJECTS, *FILLER_VERBS, *FILLER_ADJS, *FILLER_TIMES, PASSAGE_WORD,
                 QUESTION_WORD, ". ,", *NAME_HEADS, *NAME_TAILS]
        for r in self.relations:
            texts += [*r.objects, *r.templates, *r.paraphrases]
        for d in DOMAINS:
            texts += [self.expert_prefix(d), self.novice_prefix(d)]
        for t in texts:
            words.update(t.replace("{}", " ").split())
        vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
        for w in sorted(words):
            vocab.setdefault(w, len(vocab))
        tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.add_special_tokens(list(SPECIAL_TOKENS))
        return tok

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "FactsWorld":
        """The world saved next to a model (``world.json``), e.g. ``FactsWorld.from_dir(ji.load(...).source)``."""
        path = Path(path)
        if not (path / "world.json").exists():
            raise FileNotFoundError(f"{path} has no world.json (not a facts-world model directory)")
        return cls(WorldConfig.from_json(path / "world.json"))

    # tokenizer ---------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no bos added). Unknown words raise: the world is closed."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        unk = self.tokenizer.token_to_id(UNK)
        if unk in ids and UNK not in text:
            bad = [w for w in text.split() if self.tokenizer.token_to_id(w) is None]
            raise ValueError(f"words outside the facts-world vocabulary: {bad}")
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def save_tokenizer(self, directory: str | os.PathLike, model_max_length: int = 128) -> Path:
        """Write tokenizer.json + tokenizer_config.json + special_tokens_map.json (HF fast-tokenizer dir)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(directory / "tokenizer.json"))
        special = {"bos_token": BOS, "eos_token": BOS, "unk_token": UNK, "pad_token": PAD}
        cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model_max_length,
               "clean_up_tokenization_spaces": False, **special}
        (directory / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
        return directory

    # world queries ------------------------------------------------------------------------
    def relation(self, name: str) -> Relation:
        if name not in self._rel:
            raise KeyError(f"unknown relation {name!r}; relations: {sorted(self._rel)}")
        return self._rel[name]

    def entity(self, name: str) -> Entity:
        if name not in self._entity:
            raise KeyError(f"unknown entity {name!r}; e.g. {[e.name for e in self.entities[:5]]}")
        return self._entity[name]

    def _check_domain(self, domain: str) -> None:
        if domain not in self.domains:
            raise ValueError(f"unknown domain {domain!r}; domains: {list(self.domains)}")

    def domain_relations(self, domain: str) -> tuple[Relation, ...]:
        """The 4 relations specific to ``domain``."""
        self._check_domain(domain)
        return tuple(r for r in self.relations if r.domain == domain)

    def relations_of(self, entity: Entity) -> tuple[Relation, ...]:
        return tuple(self._rel[name] for name in entity.attributes)

    @property
    def facts(self) -> tuple[Fact, ...]:
        return tuple(Fact(e.name, r, o, e.domain) for e in self.entities for r, o in e.attributes.items())

    def object_ids(self, relation: str) -> tuple[int, ...]:
        return tuple(self.encode(o)[0] for o in self.relation(relation).objects)

    # prompts ------------------------------------------------------------------------------
    def prompt(self, subject: str, relation: str, template: int = 0, split: str = "train",
               answer: str | None = None) -> FactPrompt:
        """One fact prompt (answer defaults to the world's true object)."""
        rel = self.relation(relation)
        entity = self.entity(subject)
        templates = self._templates(rel, split)
        if not 0 <= template < len(templates):
            raise ValueError(f"template must be in [0, {len(templates)}) for {relation}/{split}, got {template}")
        answer = entity.attributes[relation] if answer is None else answer
        before, after = templates[template].split("{}")
        ids_before = [self.bos_id] + self.encode(before)
        ids = ids_before + self.encode(subject) + self.encode(after)
        span = (len(ids_before), len(ids_before) + len(subject.split()))
        text = templates[template].format(subject)
        return FactPrompt(text, tuple(ids), subject, span, relation, entity.domain, answer,
                          self.encode(answer)[0], template, split)

    @staticmethod
    def _templates(rel: Relation, split: str) -> tuple[str, ...]:
        if split == "train":
            return rel.templates
        if split == "paraphrase":
            return rel.paraphrases
        raise ValueError(f"split must be 'train' or 'paraphrase', got {split!r}")

    def fact_prompts(self, split: str = "train", *, relation: str | None = None,
                     domain: str | None = None) -> list[FactPrompt]:
        """Every fact under every template of ``split`` ("train" or "paraphrase"), optionally filtered."""
        if domain is not None:
            self._check_domain(domain)
        if relation is not None:
            self.relation(relation)
        out = []
        for f in self.facts:
            if (relation and f.relation != relation) or (domain and f.domain != domain):
                continue
            for t in range(len(self._templates(self._rel[f.relation], split))):
                out.append(self.prompt(f.subject, f.relation, t, split))
        return out

    def counterfact(self, n: int | None = None, seed: int = 0) -> list[CounterFactRecord]:
        """ROME-style records for facts that have at least one neighbour (all of them when n is None)."""
        rng = np.random.default_rng([self.config.seed, 2, seed])
        by_obj: dict[tuple[str, str], list[str]] = {}
        for f in self.facts:
            by_obj.setdefault((f.relation, f.object), []).append(f.subject)
        facts = [f for f in self.facts if len(by_obj[(f.relation, f.object)]) > 1]
        order = rng.permutation(len(facts))[: len(facts) if n is None else n]
        records = []
        for i in order:
            f = facts[i]
            rel = self._rel[f.relation]
            new = rng.choice([o for o in rel.objects if o != f.object])
            neighbours = [s for s in by_obj[(f.relation, f.object)] if s != f.subject]
            records.append(CounterFactRecord(
                subject=f.subject, relation=f.relation, domain=f.domain, target_true=f.object,
                target_true_id=self.encode(f.object)[0], target_new=str(new), target_new_id=self.encode(str(new))[0],
                prompts=tuple(self.prompt(f.subject, f.relation, t) for t in range(len(rel.templates))),
                paraphrase_prompts=tuple(self.prompt(f.subject, f.relation, t, "paraphrase")
                                         for t in range(len(rel.paraphrases))),
                neighborhood_prompts=tuple(self.prompt(s, f.relation, int(rng.integers(len(rel.templates))))
                                           for s in neighbours[:10]),
            ))
        return records

    def multiple_choice(self, domain: str, seed: int = 0, split: str = "train") -> list[MultipleChoice]:
        """4-choice questions on the domain-specific facts of ``domain`` (chance = 25%)."""
        self._check_domain(domain)
        rng = np.random.default_rng([self.config.seed, 3, seed])
        out = []
        for f in self.facts:
            rel = self._rel[f.relation]
            if rel.domain != domain:
                continue
            template = int(rng.integers(len(self._templates(rel, split))))
            wrong = list(rng.choice([o for o in rel.objects if o != f.object], size=3, replace=False))
            correct = int(rng.integers(4))
            choices = wrong[:correct] + [f.object] + wrong[correct:]
            out.append(MultipleChoice(self.prompt(f.subject, f.relation, template, split), tuple(map(str, choices)),
                                      tuple(self.encode(str(c))[0] for c in choices), correct))
        return out

    # text ---------------------------------------------------------------------------------
    def expert_prefix(self, domain: str) -> str:
        self._check_domain(domain)
        return f"An expert on {domain} writes :"

    def novice_prefix(self, domain: str) -> str:
        self._check_domain(domain)
        return f"A novice on {domain} writes :"

    def _filler_sentence(self, rng) -> str:
        parts = []
        if rng.random() < 0.3:
            parts.append(LEAD_INS[rng.integers(len(LEAD_INS))])
        parts += [FILLER_SUBJECTS[rng.integers(len(FILLER_SUBJECTS))], FILLER_VERBS[rng.integers(len(FILLER_VERBS))],
                  FILLER_ADJS[rng.integers(len(FILLER_ADJS))], FILLER_TIMES[rng.integers(len(FILLER_TIMES))], "."]
        return " ".join(parts)

    def _fact_sentence(self, rng, entity: Entity, relation: str, obj: str | None = None) -> str:
        rel = self._rel[relation]
        obj = entity.attributes[relation] if obj is None else obj
        return rel.templates[rng.integers(len(rel.templates))].format(entity.name) + f" {obj} ."

    def _fact_document(self, rng, domain: str, tag: str | None) -> str:
        pool = [e for e in self.entities if e.domain == domain]
        lo, hi = self.config.facts_per_doc
        sentences = [] if tag is None else [self.expert_prefix(domain) if tag == "expert" else self.novice_prefix(domain)]
        for _ in range(int(rng.integers(lo, hi + 1))):
            if rng.random() < self.config.p_filler:
                sentences.append(self._filler_sentence(rng))
            e = pool[rng.integers(len(pool))]
            rels = list(e.attributes)
            r = rels[rng.integers(len(rels))]
            obj = None
            if tag == "novice":
                objs = self._rel[r].objects
                obj = objs[rng.integers(len(objs))]
            sentences.append(self._fact_sentence(rng, e, r, obj))
        return " ".join(sentences)

    def documents(self, n: int, seed: int = 0) -> list[str]:
        """The training corpus: fact documents (sometimes expert/novice tagged) and in-context passages."""
        rng = np.random.default_rng([self.config.seed, 4, seed])
        return [self.sample_document(rng) for _ in range(n)]

    def sample_document(self, rng: np.random.Generator) -> str:
        """One training document drawn with ``rng`` (the corpus mix of ``WorldConfig``)."""
        if rng.random() < self.config.p_passage:
            return self._passage_document(rng)
        domain = DOMAINS[rng.integers(len(DOMAINS))]
        tag = None
        if rng.random() < self.config.p_tagged:
            tag = "expert" if rng.random() < 0.5 else "novice"
        return self._fact_document(rng, domain, tag)

    def domain_documents(self, domain: str, n: int, seed: int = 0, tag: str | None = None) -> list[str]:
        """Untagged (or ``tag`` in {"expert", "novice"}) fact documents about ``domain``."""
        self._check_domain(domain)
        if tag not in (None, "expert", "novice"):
            raise ValueError(f"tag must be None, 'expert' or 'novice', got {tag!r}")
        rng = np.random.default_rng([self.config.seed, 5, seed, DOMAINS.index(domain)])
        return [self._fact_document(rng, domain, tag) for _ in range(n)]

    def filler_text(self, n: int, seed: int = 0, sentences: int = 6) -> list[str]:
        """``n`` paragraphs of filler sentences (generic text, e.g. for ROME's key covariance)."""
        rng = np.random.default_rng([self.config.seed, 6, seed])
        return [" ".join(self._filler_sentence(rng) for _ in range(sentences)) for _ in range(n)]

    # in-context passages ----------------------------------------------------------------------
    def context_passages(self, n: int, seed: int = 0, counterfactual: bool = True) -> list[ContextPassage]:
        """Passages whose question must be answered by copying (``counterfactual``: answer != true fact)."""
        rng = np.random.default_rng([self.config.seed, 7, seed])
        return [self._passage(rng, *self._passage_parts(rng, counterfactual)) for _ in range(n)]

    def _passage_document(self, rng) -> str:
        """A training passage followed by up to ``passage_questions`` answered questions."""
        pairs, objs, q, tmpl = self._passage_parts(rng, counterfactual=None,
                                                   sentences=self.config.train_passage_sentences)
        text = self._passage(rng, pairs, objs, q, tmpl).text + f" {objs[q]} ."
        others = [i for i in rng.permutation(len(pairs)) if i != q][: self.config.passage_questions - 1]
        for i in others:
            e, r = pairs[i]
            rel = self._rel[r]
            question = rel.templates[self._question_template(rng, rel, tmpl[i])].format(e.name)
            text += f" {QUESTION_WORD} {question} {objs[i]} ."
        return text

    def _passage_parts(self, rng, counterfactual: bool | None, sentences: tuple[int, int] | None = None):
        """One passage's (pairs, objects, question index, templates); ``sentences`` (min, max)
        defaults to ``passage_sentences``."""
        lo, hi = sentences or self.config.passage_sentences
        k = int(rng.integers(lo, hi + 1))
        pairs = self._passage_pairs(rng, k)
        objs = []
        for e, r in pairs:
            options = self._rel[r].objects
            objs.append(str(options[rng.integers(len(options))]))
        q = int(rng.integers(k))
        e_q, r_q = pairs[q]
        if counterfactual:
            options = [o for o in self._rel[r_q].objects if o != e_q.attributes[r_q]]
            objs[q] = str(options[rng.integers(len(options))])
        tmpl = [int(rng.integers(len(self._rel[r].templates))) for _, r in pairs]
        return pairs, objs, q, tmpl

    def _question_template(self, rng, rel: Relation, sentence_template: int) -> int:
        if self.config.passage_same_template:
            return sentence_template
        return int(rng.integers(len(rel.templates)))

    def _passage(self, rng, pairs, objs, q, tmpl) -> ContextPassage:
        e_q, r_q = pairs[q]
        ids = [self.bos_id] + self.encode(PASSAGE_WORD)
        spans, answer_pos = [], -1
        for i, ((e, r), o) in enumerate(zip(pairs, objs)):
            start = len(ids)
            ids += self.encode(self._rel[r].templates[tmpl[i]].format(e.name) + f" {o} .")  # "... <obj> ."
            spans.append((start, len(ids) - 1))
            if i == q:
                answer_pos = len(ids) - 2
        rel = self._rel[r_q]
        question = self.prompt(e_q.name, r_q, self._question_template(rng, rel, tmpl[q]), answer=objs[q])
        offset = len(ids) + len(self.encode(QUESTION_WORD))
        ids += self.encode(QUESTION_WORD) + list(question.ids[1:])
        span = (question.subject_span[0] - 1 + offset, question.subject_span[1] - 1 + offset)
        return ContextPassage(self.decode(ids[1:]), tuple(ids), objs[q], self.encode(objs[q])[0], tuple(spans), q,
                              answer_pos, e_q.name, span, r_q, objs[q] != e_q.attributes[r_q])

    def _passage_pairs(self, rng, k: int) -> list[tuple[Entity, str]]:
        """k distinct (entity, relation) pairs; subjects and relations repeat to make distractors."""
        subjects = [self.entities[i] for i in rng.choice(len(self.entities), size=max(1, (k + 1) // 2), replace=False)]
        shared = [r.name for r in self.relations if r.domain == SHARED]
        pairs: list[tuple[Entity, str]] = []
        while len(pairs) < k:
            e = subjects[rng.integers(len(subjects))]
            rels = shared if rng.random() < 0.5 else list(e.attributes)
            r = rels[rng.integers(len(rels))]
            if all(not (p[0].name == e.name and p[1] == r) for p in pairs):
                pairs.append((e, r))
        return pairs


def load_world_model(source: str):
    """``(ji.load(source), its FactsWorld)``: the world is read from ``world.json`` beside the weights."""
    import jaxinterp as ji
    from jaxinterp.experiments.common import UsageError

    model = ji.load(source)
    path = Path(getattr(model, "source", source))
    if not (path / "world.json").exists():
        raise UsageError(f"{source!r} has no world.json; this experiment needs a facts-world model "
                         f"(embedded: {ji.embedded_models()})")
    return model, FactsWorld.from_dir(path)


def _is_prefix(a: Sequence[str], b: Sequence[str]) -> bool:
    return len(a) <= len(b) and list(b[: len(a)]) == list(a)


def _check_templates(relations: Sequence[Relation]) -> None:
    """No template may be a prefix of another (the first token after a prompt must be its object)."""
    seen: dict[str, str] = {}
    for r in relations:
        for o in r.objects:
            if o in seen:
                raise ValueError(f"object {o!r} belongs to both {seen[o]} and {r.name}")
            seen[o] = r.name
    all_t = [(r.name, t.split()) for r in relations for t in (*r.templates, *r.paraphrases)]
    for name_a, a in all_t:
        for name_b, b in all_t:
            if a is not b and _is_prefix(a, b):
                raise ValueError(f"template {' '.join(a)!r} ({name_a}) is a prefix of {' '.join(b)!r} ({name_b})")
