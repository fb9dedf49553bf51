"""A synthetic knowledge base of fictional people, for end-to-end RAG runs whose answers can only
come from retrieval.

People: unique full names ``First Last`` drawn from small pools of first and last names, so most
people share their first or their last name with others (the near-duplicates a retriever has to
tell apart). Each person has one value per attribute (birthplace, birth year, occupation,
employer); values are drawn uniformly from pools of 50-100 single words, so values are shared too
and no answer is much more likely than another (the answer prior is weak: a closed-book model
cannot guess).

Passages (``rag_jax.retrieval.Passage``, title = the person's name): one sentence per attribute,
each from one of several templates, in a random order, ``facts_per_passage`` sentences to a
passage (the default 1: one passage per fact; None: one passage per person); the first sentence
of a passage names the person in full, later ones by first name. Passage ids are ``"1" .. "N"``,
the ids ``write_passages_tsv`` writes; people are shuffled so splits interleave.

Why one fact per passage by default: a small generator trained from scratch learns to copy the
one value of a retrieved sentence in a few hundred steps, while reading the asked fact out of a
several-fact passage (find the sentence the question is about, then copy) takes it far longer and
it memorises the training people first (``experiments/results/kb_probe.md``). Retrieval is then
per fact: the question has to find its person *and* the sentence about the asked attribute.

Questions (``KBQuestion``): natural questions from several templates per attribute; the answer is
the attribute value exactly as the passage spells it. People are split into train / dev / test:
train questions ask about train people only (``train_questions_per_fact`` templates per fact);
dev and test questions (one per fact, random template) ask about people whose facts appear only
in the corpus, never in a training question.

Everything is drawn from ``numpy.random.default_rng(seed)`` in a fixed order: the same arguments
give identical knowledge bases and files.

Aliases (``generate_kb(..., aliases=True)``), the task of end-to-end retriever training (issue
18): passages write every last name as a code word (``alias_codes``: one made-up pronounceable
word per name of ``LAST_NAMES``, drawn from the seed), titles included, while questions keep the
real names: "Where was Ava Brook born?" is answered by "Ava Gedidi was born in Aldhaven." (title
"Ava Gedidi"; seed 0). A pretrained retriever sees the first name and the asked attribute but no
last name it knows; it can narrow a question to the passages about that attribute of the people
sharing the first name (about ``num_entities / 60`` people) and no further, so its recall@k starts
near ``k / (people with that first name)``: low, but not zero, which end-to-end training needs to
get a gradient toward the gold passage. Measured with MiniLM (embedding length 32, questions 16),
1000 people, test questions, answer recall@5 / @20 / @50: 0.18 / 0.60 / 0.86 aliased (seed 0;
0.23 / 0.62 / 0.83 seed 1) against 0.98 / 1.00 / 1.00 without aliases. Which code stands for which
name is learnt only from training pairs: train people cover the last names (at 1000 people every
last name has ~13), held-out people are new first x last combinations of them. Answers are
unchanged, so the generator still copies them from passages (its tokenizer needs the code words:
``vocabulary_texts(alias_codes(seed).values())``).

``modify_facts`` edits the corpus (the paper's index hot-swap): it gives some test people new
attribute values, re-renders their passages with the same templates, and returns the edited
knowledge base with the questions whose answers changed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Iterable, Sequence

import numpy as np

from rag_jax.retrieval.corpus import Passage, write_passages_tsv

SPLITS = ("train", "dev", "test")
# The generator tokenizer's special tokens, with BART's ids: bos 0, pad 1, eos 2 (also BART's decoder start), unk 3.
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")

FIRST_NAMES = (
    "Ava Bram Cyra Dorn Elio Fenna Gideon Hale Isra Joren Kaia Lorcan Mira Nolan Orla Pax Quinn Rhea Soren Tamsin "
    "Ulric Vela Wren Xander Yara Zeno Alba Brisa Casimir Dagny Emrys Faye Galen Hesper Ivo Jessa Kestrel Linnea "
    "Magnus Nerys Oren Petra Rowan Sabine Talia Ulla Vidar Willa Yorick Zinnia Anselm Bryony Cosmo Delphine "
    "Evander Flora Griff Hollis Inga Jasper"
).split()
LAST_NAMES = (
    "Ashby Brook Calder Dunmore Everly Fairfax Greer Holloway Ingram Jessup Kendrick Lowell Marlow Northcott Oakley "
    "Pembroke Quill Ravensworth Stroud Thorne Upton Vance Whitlock Yardley Ziegler Abernathy Blackwood Crane Darrow "
    "Ellery Fenwick Garrow Hartley Ives Jarrow Kingsley Lockhart Mercer Nash Osgood Prescott Radley Sallow Tilney "
    "Underhill Voss Wexley Yates Zeller Ainsworth Barlow Corbin Drummond Elwood Finch Gorman Hawthorne Ivers Keel "
    "Lindqvist"
).split()
# Fictional single-word place and company names: every combination of a stem and an ending.
CITIES = tuple(
    stem + end
    for stem in "Ald Bel Cor Dun Eld Fal Gal Har Ith Kel Lor Mar Nor Ost Pel Quen Ros Sel Tor Vel".split()
    for end in "haven mere ford wick gate".split()
)
COMPANIES = tuple(
    stem + end
    for stem in "Arc Blue Core Delta Echo Flux Grid Helix Ion Jade Kite Lumen Nova Orbit Pixel Quant Rift Sol Terra "
    "Vertex".split()
    for end in "works soft labs".split()
)
OCCUPATIONS = (
    "baker pilot farmer painter sailor doctor teacher lawyer miner poet architect nurse chemist carpenter librarian "
    "journalist engineer dentist florist tailor potter jeweler astronomer geologist pharmacist surveyor translator "
    "violinist sculptor photographer veterinarian electrician plumber cartographer botanist economist historian "
    "mechanic chef butcher locksmith blacksmith glassblower beekeeper fisherman shepherd banker novelist composer "
    "surgeon"
).split()
BIRTH_YEARS = tuple(str(y) for y in range(1921, 2001))
# Code words (aliases) are three consonant-vowel syllables: pronounceable, 6 letters; of such random
# words about 1 in 2000 is a word of MiniLM's vocabulary (1 in 200 with 5 letters, "Davis").
ALIAS_CONSONANTS = "bdfgklmnprstvz"
ALIAS_VOWELS = "aeiou"


@dataclasses.dataclass(frozen=True)
class Attribute:
    """One kind of fact. Templates use ``{name}`` (the person), ``{value}`` and ``{a}`` ("a" or
    "an", agreeing with the value). Statements are passage sentences, questions end with "?"."""

    name: str
    values: tuple[str, ...]
    statements: tuple[str, ...]
    questions: tuple[str, ...]


ATTRIBUTES = (
    Attribute(
        "birthplace",
        CITIES,
        ("{name} was born in {value}.", "{name} is a native of {value}.", "{name} was born in the town of {value}."),
        (
            "Where was {name} born?",
            "In which town was {name} born?",
            "What is the birthplace of {name}?",
            "Which town is {name} a native of?",
        ),
    ),
    Attribute(
        "birth_year",
        BIRTH_YEARS,
        ("{name} was born in the year {value}.", "{name}'s year of birth is {value}.", "{name} came into the world in {value}."),
        (
            "When was {name} born?",
            "In what year was {name} born?",
            "What is the birth year of {name}?",
            "What year was {name} born in?",
        ),
    ),
    Attribute(
        "occupation",
        tuple(OCCUPATIONS),
        ("{name} works as {a} {value}.", "{name} is {a} {value} by profession.", "By trade, {name} is {a} {value}."),
        (
            "What does {name} do for a living?",
            "What is the occupation of {name}?",
            "What is {name}'s job?",
            "What does {name} work as?",
        ),
    ),
    Attribute(
        "employer",
        COMPANIES,
        ("{name} is employed by {value}.", "{name} works for {value}.", "{name} has a job at {value}."),
        (
            "Who employs {name}?",
            "Which company does {name} work for?",
            "Who is {name}'s employer?",
            "Where does {name} work?",
        ),
    ),
)
ATTRIBUTE_NAMES = tuple(a.name for a in ATTRIBUTES)
_BY_NAME = {a.name: a for a in ATTRIBUTES}


@dataclasses.dataclass(frozen=True)
class Entity:
    """A person: ``facts`` maps attribute name -> value; ``statement_templates`` the index of the
    statement template used for each attribute; ``passages`` the attribute names stated in each of
    the person's passages, in sentence order; ``alias`` the name the passages write instead of
    ``name`` (an aliased knowledge base: the last name as its code word), None: the real name."""

    name: str
    split: str
    facts: dict[str, str]
    statement_templates: dict[str, int]
    passages: tuple[tuple[str, ...], ...]
    alias: str | None = None

    @property
    def written_name(self) -> str:
        """The name as the person's passages (titles and texts) write it."""
        return self.alias or self.name

    @property
    def first_name(self) -> str:
        return self.name.split()[0]

    @property
    def last_name(self) -> str:
        return self.name.split()[-1]


@dataclasses.dataclass(frozen=True)
class KBQuestion:
    """A question with its answers (the JSONL record is ``{"question", "answers"}``), the person and
    attribute it asks about, and the id of the passage that states the answer."""

    question: str
    answers: tuple[str, ...]
    entity: str
    attribute: str
    passage_id: str


@dataclasses.dataclass(frozen=True)
class KnowledgeBase:
    """People, their passages (ids ``"1" .. "N"``, in rows ``0 .. N-1``, in the people's order), and
    the QA splits (``KBQuestion.passage_id`` is the passage stating the answer).
    ``passage_ids[name]`` are the ids of a person's passages (``name`` the real name, also in an
    aliased knowledge base, whose titles write the alias)."""

    entities: tuple[Entity, ...]
    passages: tuple[Passage, ...]
    train: tuple[KBQuestion, ...]
    dev: tuple[KBQuestion, ...]
    test: tuple[KBQuestion, ...]

    def split(self, name: str) -> tuple[KBQuestion, ...]:
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return getattr(self, name)

    @property
    def passage_ids(self) -> dict[str, tuple[str, ...]]:
        out, row = {}, 0
        for e in self.entities:
            out[e.name] = tuple(p.id for p in self.passages[row : row + len(e.passages)])
            row += len(e.passages)
        return out


@dataclasses.dataclass(frozen=True)
class FactEdit:
    """The result of ``modify_facts``: the edited knowledge base (its passages and test questions
    carry the new values), the test questions whose answer changed (new answers) and their
    previous answers, in the same order, and the rewritten passages (same ids and rows as before,
    new texts; the rows to re-embed are ``int(id) - 1``)."""

    kb: KnowledgeBase
    changed: tuple[KBQuestion, ...]
    previous_answers: tuple[tuple[str, ...], ...]
    changed_passages: tuple[Passage, ...]

    @property
    def passages(self) -> tuple[Passage, ...]:
        return self.kb.passages


# ---------------------------------------------------------------------------------------------
# Rendering


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _statement(entity: Entity, attribute: str, subject: str) -> str:
    value = entity.facts[attribute]
    template = _BY_NAME[attribute].statements[entity.statement_templates[attribute]]
    sentence = template.format(name=subject, value=value, a=_article(value))
    return sentence[0].upper() + sentence[1:]


def passage_texts(entity: Entity) -> list[str]:
    """The texts of an entity's passages: each names the person in full (``written_name``) in its
    first sentence and by first name afterwards."""
    full = entity.written_name
    return [
        " ".join(_statement(entity, attr, full if i == 0 else entity.first_name) for i, attr in enumerate(attrs))
        for attrs in entity.passages
    ]


def _render(entities: Sequence[Entity]) -> tuple[tuple[Passage, ...], dict[tuple[str, str], str]]:
    """Passages with ids 1..N in entity order, and the passage id stating each (name, attribute)."""
    passages, fact_passage = [], {}
    for entity in entities:
        for attrs, text in zip(entity.passages, passage_texts(entity)):
            pid = str(len(passages) + 1)
            passages.append(Passage(pid, entity.written_name, text))
            fact_passage.update({(entity.name, a): pid for a in attrs})
    return tuple(passages), fact_passage


def _question(entity: Entity, attribute: str, template: int, passage_id: str) -> KBQuestion:
    text = _BY_NAME[attribute].questions[template].format(name=entity.name)
    return KBQuestion(text, (entity.facts[attribute],), entity.name, attribute, passage_id)


# ---------------------------------------------------------------------------------------------
# Generation


def alias_codes(seed: int = 0) -> dict[str, str]:
    """The code word of every last name of ``LAST_NAMES`` (in that order), drawn from ``seed``:
    capitalised words of three consonant-vowel syllables ("Kelovi"), distinct, and none a
    word of the knowledge base's vocabulary (``vocabulary_texts()``: names, values, template
    words). Drawn from a random stream apart from ``generate_kb``'s, so turning aliases on changes
    no other draw."""
    rng = np.random.default_rng([seed, 18])
    taken = set(re.findall(r"\w+", " ".join(vocabulary_texts()).lower()))
    letters = (ALIAS_CONSONANTS, ALIAS_VOWELS) * 3
    codes = {}
    for last in LAST_NAMES:
        code = ""
        while not code or code in taken:
            code = "".join(pool[rng.integers(len(pool))] for pool in letters)
        taken.add(code)
        codes[last] = code.capitalize()
    return codes


def _check_args(num_entities: int, fractions: tuple[float, float], facts_per_passage, attributes, per_fact: int):
    pool = len(FIRST_NAMES) * len(LAST_NAMES)
    if not 3 <= num_entities <= pool:
        raise ValueError(f"num_entities must be in [3, {pool}] (distinct first x last names), got {num_entities}")
    if any(f <= 0 for f in fractions) or sum(fractions) >= 1:
        raise ValueError(f"dev_fraction and test_fraction must be > 0 with a sum < 1, got {fractions}")
    if facts_per_passage is not None and facts_per_passage < 1:
        raise ValueError(f"facts_per_passage must be >= 1 (or None: all of a person's facts), got {facts_per_passage}")
    unknown = [a for a in attributes if a not in _BY_NAME]
    if unknown or not attributes or len(set(attributes)) != len(attributes):
        raise ValueError(f"attributes must be distinct names from {ATTRIBUTE_NAMES}, got {tuple(attributes)}")
    if not 1 <= per_fact <= min(len(_BY_NAME[a].questions) for a in attributes):
        raise ValueError(f"train_questions_per_fact must be between 1 and the number of question templates, got {per_fact}")


def generate_kb(
    num_entities: int,
    seed: int = 0,
    *,
    dev_fraction: float = 0.1,
    test_fraction: float = 0.1,
    attributes: Sequence[str] = ATTRIBUTE_NAMES,
    facts_per_passage: int | None = 1,
    train_questions_per_fact: int = 2,
    aliases: bool = False,
) -> KnowledgeBase:
    """A knowledge base of ``num_entities`` fictional people (see the module docstring).

    ``dev_fraction`` / ``test_fraction`` of the people (at least one each) are held out: their
    facts are only in the corpus. ``attributes`` picks and orders the facts (``ATTRIBUTE_NAMES``).
    ``facts_per_passage`` sentences to a passage (None: one passage per person).
    ``train_questions_per_fact`` distinct question templates per (train person, attribute).
    ``aliases``: passages write each last name as its code word (``alias_codes(seed)``; questions
    keep the real names): the issue-18 task of the module docstring. Off, nothing changes; on, the
    same people, facts, templates, layouts and questions, only the passages' names differ.
    """
    attributes = tuple(attributes)
    _check_args(num_entities, (dev_fraction, test_fraction), facts_per_passage, attributes, train_questions_per_fact)
    per_passage = facts_per_passage or len(attributes)
    rng = np.random.default_rng(seed)
    pairs = rng.choice(len(FIRST_NAMES) * len(LAST_NAMES), size=num_entities, replace=False)
    names = [f"{FIRST_NAMES[p // len(LAST_NAMES)]} {LAST_NAMES[p % len(LAST_NAMES)]}" for p in pairs.tolist()]
    num_dev = max(1, round(dev_fraction * num_entities))
    num_test = max(1, round(test_fraction * num_entities))
    splits = ["dev"] * num_dev + ["test"] * num_test + ["train"] * (num_entities - num_dev - num_test)
    splits = [splits[i] for i in rng.permutation(num_entities)]

    entities = []
    for name, split in zip(names, splits):
        facts = {a: _BY_NAME[a].values[rng.integers(len(_BY_NAME[a].values))] for a in attributes}
        templates = {a: int(rng.integers(len(_BY_NAME[a].statements))) for a in attributes}
        order = tuple(attributes[i] for i in rng.permutation(len(attributes)))
        layout = tuple(order[i : i + per_passage] for i in range(0, len(order), per_passage))
        entities.append(Entity(name, split, facts, templates, layout))
    if aliases:
        codes = alias_codes(seed)
        entities = [dataclasses.replace(e, alias=f"{e.first_name} {codes[e.last_name]}") for e in entities]
    passages, fact_passage = _render(entities)

    questions: dict[str, list[KBQuestion]] = {s: [] for s in SPLITS}
    for entity in entities:
        for attr in attributes:
            num_templates = len(_BY_NAME[attr].questions)
            per_fact = train_questions_per_fact if entity.split == "train" else 1
            for t in rng.choice(num_templates, size=per_fact, replace=False).tolist():
                questions[entity.split].append(_question(entity, attr, t, fact_passage[(entity.name, attr)]))
    train = [questions["train"][i] for i in rng.permutation(len(questions["train"]))]
    return KnowledgeBase(tuple(entities), passages, tuple(train), tuple(questions["dev"]), tuple(questions["test"]))


def modify_facts(kb: KnowledgeBase, fraction: float, seed: int = 0) -> FactEdit:
    """Give ``fraction`` of the test people (at least one when ``fraction`` > 0) a new, different
    value for every attribute, and re-render their passages with the same templates and layout
    (passage ids and order unchanged). Drawn from ``numpy.random.default_rng(seed)``: deterministic.
    Returns a ``FactEdit``: the edited knowledge base, the test questions whose answers changed
    (with the new answers), their previous answers, and the rewritten passages."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    test_people = [i for i, e in enumerate(kb.entities) if e.split == "test"]
    count = 0 if fraction == 0 else max(1, round(fraction * len(test_people)))
    chosen = set(rng.choice(test_people, size=count, replace=False).tolist())
    entities = list(kb.entities)
    for i in sorted(chosen):
        old = entities[i].facts
        new = {}
        for attr, value in old.items():
            others = [v for v in _BY_NAME[attr].values if v != value]
            new[attr] = others[rng.integers(len(others))]
        entities[i] = dataclasses.replace(entities[i], facts=new)
    passages, fact_passage = _render(entities)
    if [p.id for p in passages] != [p.id for p in kb.passages]:
        raise AssertionError("editing facts must not change the passage layout")
    by_name = {e.name: e for e in entities}
    edited_names = {entities[i].name for i in chosen}
    test, changed, previous = [], [], []
    for q in kb.test:
        if q.entity in edited_names:
            new_q = dataclasses.replace(q, answers=(by_name[q.entity].facts[q.attribute],))
            changed.append(new_q)
            previous.append(q.answers)
            q = new_q
        test.append(q)
    edited = dataclasses.replace(kb, entities=tuple(entities), passages=passages, test=tuple(test))
    rewritten = tuple(new for old, new in zip(kb.passages, passages) if old.text != new.text)
    return FactEdit(edited, tuple(changed), tuple(previous), rewritten)


# ---------------------------------------------------------------------------------------------
# Generator tokenizer


def vocabulary_texts(extra_words: Iterable[str] = ()) -> list[str]:
    """Strings holding every word a passage, question or generator context can contain: the name
    and value pools (edited facts included), the templates' words, and the context separators
    ``/`` and ``//`` (``rag_jax.retrieval.context``); then ``extra_words`` (an aliased knowledge
    base's code words: ``alias_codes(seed).values()``)."""
    texts = [*FIRST_NAMES, *LAST_NAMES, "/ //"]
    for attribute in ATTRIBUTES:
        texts += attribute.values
        texts += [t.format(name="", value="", a="a an") for t in attribute.statements + attribute.questions]
    return texts + list(extra_words)


def generator_tokenizer(texts: Iterable[str] | None = None):
    """A word-level tokenizer for a generator trained from scratch on this knowledge base, as a
    transformers ``PreTrainedTokenizerFast`` (``save_pretrained`` / ``AutoTokenizer`` round-trip).

    Text is lower-cased and split into words and punctuation runs (``\\w+|[^\\w\\s]+``, the
    ``tokenizers`` ``Whitespace`` pre-tokenizer); each word of ``texts`` (default
    ``vocabulary_texts()``) is one id, in sorted order after ``SPECIAL_TOKENS`` (BART's ids), other
    words are ``<unk>``. Encoding with special tokens gives ``<s> ... </s>`` as BART's tokenizer
    does; decoding joins words with spaces. So every answer is one token and reading it from a
    passage is pointing at it, which a small model learns in minutes."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer, pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()
    texts = vocabulary_texts() if texts is None else texts
    words = {w for t in texts for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(t))}
    vocab = {w: i for i, w in enumerate(SPECIAL_TOKENS + tuple(sorted(words - set(SPECIAL_TOKENS))))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.normalizer, tokenizer.pre_tokenizer = normalizer, pre_tokenizer
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    bos, pad, eos, unk = SPECIAL_TOKENS
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=bos, pad_token=pad, eos_token=eos, unk_token=unk)


# ---------------------------------------------------------------------------------------------
# Files


def write_qa_jsonl(examples: Iterable[KBQuestion], path: str) -> int:
    """One ``{"question": ..., "answers": [...]}`` object per line; returns the count."""
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for count, q in enumerate(examples, start=1):
            f.write(json.dumps({"question": q.question, "answers": list(q.answers)}, ensure_ascii=False) + "\n")
    return count


def write_entities_jsonl(kb: KnowledgeBase, path: str) -> None:
    """The ground truth, one person per line: name, split, facts, and the passage stating each fact
    (what retrieval recall is measured against); in an aliased knowledge base also the alias."""
    _, fact_passage = _render(kb.entities)
    with open(path, "w", encoding="utf-8") as f:
        for e in kb.entities:
            record = {
                "name": e.name,
                "split": e.split,
                "facts": e.facts,
                "fact_passage_ids": {a: fact_passage[(e.name, a)] for a in e.facts},
            }
            if e.alias is not None:
                record["alias"] = e.alias
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def write_kb(kb: KnowledgeBase, directory: str) -> dict[str, str]:
    """Write ``passages.tsv`` (DPR format: ``id text title``), ``train.jsonl``, ``dev.jsonl``,
    ``test.jsonl`` and ``entities.jsonl`` into ``directory`` (created); returns their paths."""
    os.makedirs(directory, exist_ok=True)
    paths = {name: os.path.join(directory, f"{name}.jsonl") for name in (*SPLITS, "entities")}
    paths["passages"] = os.path.join(directory, "passages.tsv")
    if [p.id for p in kb.passages] != [str(i) for i in range(1, len(kb.passages) + 1)]:
        raise ValueError("passage ids must be 1..N in order (the ids write_passages_tsv writes)")
    write_passages_tsv(kb.passages, paths["passages"])
    for split in SPLITS:
        write_qa_jsonl(kb.split(split), paths[split])
    write_entities_jsonl(kb, paths["entities"])
    return paths
