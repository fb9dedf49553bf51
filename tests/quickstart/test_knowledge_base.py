"""The synthetic knowledge base: deterministic, held-out people whose facts are only in the corpus,
distractors, files that rag_jax's readers take, fact edits, and the word-level generator tokenizer."""

import dataclasses
import filecmp
import json
import re

import pytest

from rag_jax.data import qa as data
from rag_jax.quickstart.knowledge_base import (
    ATTRIBUTE_NAMES,
    LAST_NAMES,
    SPECIAL_TOKENS,
    alias_codes,
    generate_kb,
    generator_tokenizer,
    modify_facts,
    vocabulary_texts,
    write_kb,
)
from rag_jax.retrieval.corpus import PassageStore, read_passages

NUM_ENTITIES = 120


@pytest.fixture(scope="module")
def kb():
    return generate_kb(NUM_ENTITIES, seed=3, facts_per_passage=3)


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text)


def _passage(kb, passage_id):
    return kb.passages[int(passage_id) - 1]


def test_same_seed_same_kb_and_files(kb, tmp_path):
    again = generate_kb(NUM_ENTITIES, seed=3, facts_per_passage=3)
    assert again == kb
    assert generate_kb(NUM_ENTITIES, seed=4, facts_per_passage=3).passages != kb.passages
    a, b = write_kb(kb, str(tmp_path / "a")), write_kb(again, str(tmp_path / "b"))
    for name in a:
        assert filecmp.cmp(a[name], b[name], shallow=False), name


def test_sizes_and_splits(kb):
    people = {s: [e for e in kb.entities if e.split == s] for s in ("train", "dev", "test")}
    assert len(kb.entities) == NUM_ENTITIES and len({e.name for e in kb.entities}) == NUM_ENTITIES
    assert len(people["dev"]) == len(people["test"]) == 12
    num_attrs = len(ATTRIBUTE_NAMES)
    assert len(kb.train) == 2 * num_attrs * len(people["train"])
    assert len(kb.dev) == num_attrs * len(people["dev"]) and len(kb.test) == num_attrs * len(people["test"])
    assert [p.id for p in kb.passages] == [str(i) for i in range(1, len(kb.passages) + 1)]
    assert len(kb.passages) == 2 * NUM_ENTITIES  # 4 facts, at most 3 to a passage: 3 + 1
    assert [len(e.passages) for e in generate_kb(10, facts_per_passage=None).entities] == [1] * 10
    default = generate_kb(10)  # one passage per fact
    assert len(default.passages) == 10 * len(ATTRIBUTE_NAMES)
    assert all(p.text.count(".") == 1 and p.title in p.text for p in default.passages)
    for split in ("train", "dev", "test"):
        assert {q.entity for q in kb.split(split)} == {e.name for e in people[split]}
    with pytest.raises(ValueError, match="split must be one of"):
        kb.split("validation")


def test_held_out_people_never_appear_in_training_questions(kb):
    train_people = {q.entity for q in kb.train}
    held_out = {q.entity for q in kb.dev + kb.test}
    assert train_people.isdisjoint(held_out)
    train_text = " ".join(q.question for q in kb.train)
    for name in held_out:
        assert name not in train_text


def test_every_answer_is_stated_in_exactly_its_entitys_passage(kb):
    for q in kb.train + kb.dev + kb.test:
        gold = _passage(kb, q.passage_id)
        assert gold.title == q.entity and q.entity in q.question and q.question.endswith("?")
        assert q.answers[0] in _words(gold.text)
        own = [p for p in kb.passages if p.title == q.entity]
        assert [p.id for p in own if q.answers[0] in _words(p.text)] == [q.passage_id]
        # The full name is only written in the person's own passages: the fact has to be retrieved from them.
        assert all(p.title == q.entity for p in kb.passages if q.entity in p.text)
    for e in kb.entities:
        texts = [p.text for p in kb.passages if p.title == e.name]
        assert len(texts) == len(e.passages)
        assert all(e.name in text.split(". ")[0] for text in texts)  # each passage names the person in full first
        stated = " ".join(texts)
        assert all(value in _words(stated) for value in e.facts.values())


def test_distractors_share_names_and_values(kb):
    for e in (e for e in kb.entities if e.split == "test"):
        others = [o for o in kb.entities if o.name != e.name]
        assert any(o.first_name == e.first_name or o.last_name == e.last_name for o in others), e.name
    shared = [
        sum(any(o.facts[a] == e.facts[a] for o in kb.entities if o.name != e.name) for a in ATTRIBUTE_NAMES)
        for e in kb.entities
    ]
    assert sum(shared) > len(kb.entities)  # most people share some attribute value with another


def test_files_round_trip_through_the_readers(kb, tmp_path):
    paths = write_kb(kb, str(tmp_path / "kb"))
    assert open(paths["passages"]).readline() == "id\ttext\ttitle\n"
    assert list(read_passages(paths["passages"], strict=True)) == list(kb.passages)
    with PassageStore.open(paths["passages"], strict=True) as store:
        assert len(store) == len(kb.passages)
        q = kb.test[0]
        assert store[store.row_of(q.passage_id)] == _passage(kb, q.passage_id)
    for split in ("train", "dev", "test"):
        result = data.read_qa(paths[split], strict=True)
        assert result.report.format == "jsonl"
        assert [(ex.question, ex.answers) for ex in result.examples] == [(q.question, q.answers) for q in kb.split(split)]
    truth = [json.loads(line) for line in open(paths["entities"])]
    assert [t["name"] for t in truth] == [e.name for e in kb.entities]
    q = kb.test[-1]
    record = next(t for t in truth if t["name"] == q.entity)
    assert record["facts"][q.attribute] == q.answers[0] and record["fact_passage_ids"][q.attribute] == q.passage_id


def test_modify_facts_changes_passages_and_answers_consistently(kb):
    edit = modify_facts(kb, fraction=0.5, seed=1)
    assert modify_facts(kb, fraction=0.5, seed=1) == edit
    edited_people = {q.entity for q in edit.changed}
    assert len(edited_people) == 6 and len(edit.changed) == 6 * len(ATTRIBUTE_NAMES)
    assert [p.id for p in edit.kb.passages] == [p.id for p in kb.passages]
    assert edit.kb.train == kb.train and edit.kb.dev == kb.dev
    assert {p.title for p in edit.changed_passages} == edited_people
    assert {p.id for p in edit.changed_passages} == {
        p.id for old, p in zip(kb.passages, edit.kb.passages) if old.text != p.text
    }
    for q, previous in zip(edit.changed, edit.previous_answers):
        assert q.answers != previous
        assert q.answers[0] in _words(_passage(edit.kb, q.passage_id).text)
        assert previous[0] not in _words(_passage(edit.kb, q.passage_id).text)
        assert previous[0] in _words(_passage(kb, q.passage_id).text)
    changed = {(q.entity, q.attribute): q for q in edit.changed}
    for old, new in zip(kb.test, edit.kb.test):
        assert new == changed.get((old.entity, old.attribute), old)
    assert modify_facts(kb, fraction=0.0).changed == ()
    with pytest.raises(ValueError, match="fraction"):
        modify_facts(kb, fraction=1.5)


def test_generator_tokenizer_covers_every_word_and_round_trips(kb, tmp_path):
    from transformers import AutoTokenizer

    tok = generator_tokenizer()
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert (tok.bos_token_id, tok.pad_token_id, tok.eos_token_id) == (0, 1, 2)
    edited = modify_facts(kb, fraction=1.0).kb
    texts = [p.title + " / " + p.text + " // " + q.question for p, q in zip(edited.passages, kb.train)]
    texts += [q.question.lower() for q in kb.test]  # the question encoder's decoded (uncased) form
    for text in texts:
        assert tok.unk_token_id not in tok(text)["input_ids"], text
    answer = kb.test[0].answers[0]
    ids = tok(answer)["input_ids"]
    assert len(ids) == 3 and (ids[0], ids[-1]) == (0, 2)  # <s> answer </s>: one token per answer
    assert tok.decode(ids, skip_special_tokens=True) == answer.lower()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(texts[:3])["input_ids"] == tok(texts[:3])["input_ids"]


@pytest.fixture(scope="module")
def aliased():
    return generate_kb(NUM_ENTITIES, seed=3, facts_per_passage=3, aliases=True)


def test_aliases_off_change_nothing_and_on_change_only_the_written_names(kb, aliased, tmp_path):
    assert generate_kb(NUM_ENTITIES, seed=3, facts_per_passage=3, aliases=False) == kb
    assert all(e.alias is None and e.written_name == e.name for e in kb.entities)
    assert generate_kb(NUM_ENTITIES, seed=3, facts_per_passage=3, aliases=True) == aliased  # deterministic
    assert alias_codes(3) == alias_codes(3) != alias_codes(4)
    # The same people, facts, templates, layouts and questions: aliasing draws nothing from the KB's stream.
    assert [dataclasses.replace(e, alias=None) for e in aliased.entities] == list(kb.entities)
    assert (aliased.train, aliased.dev, aliased.test) == (kb.train, kb.dev, kb.test)
    assert [p.id for p in aliased.passages] == [p.id for p in kb.passages]
    assert aliased.passage_ids == kb.passage_ids  # keyed by the real names
    records = [json.loads(line) for line in open(write_kb(aliased, str(tmp_path / "a"))["entities"])]
    assert [r["alias"] for r in records] == [e.alias for e in aliased.entities]
    assert all("alias" not in json.loads(line) for line in open(write_kb(kb, str(tmp_path / "k"))["entities"]))


def test_aliased_passages_write_each_last_name_as_one_code(kb, aliased):
    codes = alias_codes(3)
    assert list(codes) == list(LAST_NAMES) and len(set(codes.values())) == len(LAST_NAMES)
    vocabulary = {w.lower() for w in _words(" ".join(vocabulary_texts()))}
    assert all(re.fullmatch(r"([bdfgklmnprstvz][aeiou]){3}", c.lower()) and c.lower() not in vocabulary
               for c in codes.values())  # fmt: skip
    real = set(LAST_NAMES)
    code_of: dict[str, set[str]] = {}
    for e in aliased.entities:
        first, code = e.alias.split()
        assert first == e.first_name and code == codes[e.last_name]
        code_of.setdefault(code, set()).add(e.last_name)
        for p in (aliased.passages[int(i) - 1] for i in aliased.passage_ids[e.name]):
            assert p.title == e.alias and p.text.split(". ")[0].count(e.alias) == 1
            assert real.isdisjoint(_words(p.title + " " + p.text)), p
    assert all(len(last_names) == 1 for last_names in code_of.values())  # each code is one last name
    for q in aliased.train + aliased.dev + aliased.test:
        gold = _passage(aliased, q.passage_id)
        assert q.entity in q.question and q.entity.split()[-1] not in gold.text  # the real name is only asked
        assert q.answers[0] in _words(gold.text) and q.answers[0] in _words(_passage(kb, q.passage_id).text)
    edit = modify_facts(aliased, fraction=0.5, seed=1)  # edits keep the aliases
    assert {p.title for p in edit.changed_passages} <= {e.alias for e in aliased.entities}
    for q in edit.changed:
        assert q.answers[0] in _words(_passage(edit.kb, q.passage_id).text)


def test_generator_tokenizer_knows_the_code_words(aliased):
    texts = [p.title + " / " + p.text + " // " + q.question for p, q in zip(aliased.passages, aliased.train)]
    with_codes = generator_tokenizer(vocabulary_texts(alias_codes(3).values()))
    for text in texts:
        assert with_codes.unk_token_id not in with_codes(text)["input_ids"], text
    assert generator_tokenizer().unk_token_id in generator_tokenizer()(texts[0])["input_ids"]  # the default does not
    assert len(with_codes) == len(generator_tokenizer()) + len(LAST_NAMES)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="num_entities"):
        generate_kb(2)
    with pytest.raises(ValueError, match="attributes"):
        generate_kb(10, attributes=("height",))
    with pytest.raises(ValueError, match="facts_per_passage"):
        generate_kb(10, facts_per_passage=0)
    with pytest.raises(ValueError, match="test_fraction"):
        generate_kb(10, dev_fraction=0.5, test_fraction=0.5)
    small = generate_kb(10, attributes=("occupation", "employer"), train_questions_per_fact=1)
    assert all(set(e.facts) == {"occupation", "employer"} for e in small.entities)
    assert dataclasses.replace(small) == small
