"""Evaluation metrics: SQuAD normalisation / EM / F1, DPR's has_answer and recall@k, BLEU-1 and
ROUGE-L (against sacrebleu / rouge-score called directly, and by hand), label accuracy. Every score
is a fraction in [0, 1]."""

import logging
import math

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from rag_jax.training import metrics, qbleu
from rag_jax.training.metrics import (
    answer_recall_at_k,
    bleu1,
    dpr_tokens,
    exact_match,
    f1_score,
    has_answer,
    label_accuracy,
    normalize_answer,
    qa_metrics,
    rouge_l,
)


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("The  Eiffel-Tower!", "eiffeltower"),  # punctuation removed (not split on), then the article
        ("A cat, an apple; THE end.", "cat apple end"),
        ("theater Anthem", "theater anthem"),  # articles only as whole words
        ("the-end", "theend"),  # punctuation goes first, so "the" is no longer a word
        ("  hello\tworld\n ", "hello world"),
        ("Röntgen’s “rays”", "röntgen’s “rays”"),  # only ASCII punctuation is removed
        ("The", ""),
    ],
)
def test_normalize_answer_is_squad_v1_1(text, normalised):
    assert normalize_answer(text) == normalised


def test_exact_match_and_f1_take_the_best_gold_answer():
    assert exact_match("The Eiffel Tower", ["Paris", "eiffel tower!"]) == 1.0
    assert exact_match("Paris.", "paris") == 1.0  # a plain string is one answer
    assert exact_match("Eiffel", ["Paris", "eiffel tower"]) == 0.0
    # "the cat sat" -> [cat, sat] against [cat, sat, on, mat]: P = 2/2, R = 2/4, F1 = 2PR / (P + R) = 2/3
    assert f1_score("the cat sat", "cat sat on the mat") == pytest.approx(2 / 3)
    # the best gold counts: [cat] gives P = 1/2, R = 1 (2/3); [cat, sat] gives 1
    assert f1_score("the cat sat", ["a cat", "cat sat"]) == 1.0
    assert f1_score("the cat sat", ["a cat", "dog"]) == pytest.approx(2 / 3)
    # tokens count with multiplicity: [cat, cat, sat] & [cat, sat, sat] share 2 -> P = R = 2/3
    assert f1_score("cat cat sat", "cat sat sat") == pytest.approx(2 / 3)
    assert f1_score("dog", "cat") == 0.0
    # empty after normalisation: SQuAD v1.1 gives EM 1 (equal strings) and F1 0 (no common token)
    assert exact_match("the", "a") == 1.0 and f1_score("the", "a") == 0.0


def test_qa_metrics_are_means_in_0_1():
    result = qa_metrics(["the cat sat", "Paris", "Lyon"], [["cat sat on mat"], ["paris", "France"], "Marseille"])
    assert result == pytest.approx({"em": 1 / 3, "f1": (2 / 3 + 1 + 0) / 3})
    with pytest.raises(ValueError, match="2 predictions but 1 answer lists"):
        qa_metrics(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="no predictions to score"):
        qa_metrics([], [])
    with pytest.raises(ValueError, match="gold answer list is empty"):
        qa_metrics(["a"], [[]])


def test_label_accuracy_ignores_case_and_punctuation():
    predictions = ["SUPPORTS", "refutes", "Not enough info.", "REFUTES"]
    labels = ["SUPPORTS", "REFUTES", "SUPPORTS", ["NOT ENOUGH INFO", "REFUTES"]]
    assert label_accuracy(predictions, labels) == 0.75


# ---------------------------------------------------------------------------------------------
# Retrieval


def test_dpr_tokens():
    # runs of letters / digits / marks, every other non-space character alone, lower-cased
    assert dpr_tokens("Hello, World! 1,000") == ["hello", ",", "world", "!", "1", ",", "000"]
    assert dpr_tokens("Ro\u0308ntgen") == dpr_tokens("Röntgen") == ["ro\u0308ntgen"]  # NFD, marks stay in words


def test_has_answer_string_match_is_dpr_token_match():
    assert has_answer("The cat sat.", "CAT")
    assert not has_answer("The category was big", "cat")  # whole tokens only
    assert has_answer("about 1,000 people", "1,000") and not has_answer("about 1,000 people", "1000")
    assert has_answer("Wilhelm Röntgen won", "Wilhelm Ro\u0308ntgen")  # precomposed vs combining
    assert has_answer(["nothing here", "but the cat sat here"], ["dog", "cat sat"])  # any passage, any answer
    assert not has_answer(["nothing here", "cat  on sat"], "cat sat")  # contiguous tokens
    assert not has_answer("anything", [" "])  # an answer with no tokens is never found
    with pytest.raises(ValueError, match="match must be"):
        has_answer("x", "x", match="fuzzy")


def test_has_answer_regex_match(caplog):
    assert has_answer("It was founded in 1885 by", r"18[0-9]{2}", match="regex")
    assert has_answer("PARIS is large", r"paris", match="regex")  # case-insensitive
    assert not has_answer("the category", r"\bcat\b", match="regex")
    assert has_answer("Ro\u0308ntgen", "Röntgen", match="regex")  # both sides NFD
    with caplog.at_level(logging.WARNING):
        assert not has_answer(["cat (", "dog"], ["cat (", "bird"], match="regex")  # invalid pattern: no match
    assert [r.getMessage() for r in caplog.records if "not a valid regular expression" in r.getMessage()] != []


def test_answer_recall_at_k():
    passages = [["a dog", "the cat"], ["nothing", "here"], ["Paris is big", "x"]]
    answers = [["cat"], ["zzz"], "paris"]
    assert answer_recall_at_k(passages, answers, 1) == pytest.approx(1 / 3)
    assert answer_recall_at_k(passages, answers, 2) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="recall@3 needs 3 passages per question; question 0 has 2"):
        answer_recall_at_k(passages, answers, 3)
    with pytest.raises(ValueError, match="k must be >= 1"):
        answer_recall_at_k(passages, answers, 0)
    with pytest.raises(ValueError, match="3 passage lists but 2 answer lists"):
        answer_recall_at_k(passages, answers[:2], 1)


# ---------------------------------------------------------------------------------------------
# Generation


def test_bleu1_by_hand():
    assert bleu1(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(1.0)
    # all 3 unigrams match (precision 1); hypothesis 3 < reference 6 words: BP = exp(1 - 6/3)
    assert bleu1(["the cat sat"], ["the cat sat on the mat"]) == pytest.approx(math.exp(-1))
    # "the" x4 clipped to the reference's 2: precision 2/4; BP = exp(1 - 6/4)
    assert bleu1(["the the the the"], ["the cat is on the mat"]) == pytest.approx(0.5 * math.exp(-0.5))
    # corpus level, several references: matches (2 + 3) / (2 + 4) words; the closest reference
    # lengths (1 for "the cat": a tie between 3 and 1 goes to the shorter; 3) sum to 4 < 6: no penalty
    assert bleu1(["the cat", "a dog ran far"], [["the cat sat", "cat"], ["a dog ran"]]) == pytest.approx(5 / 6)


def test_bleu1_matches_sacrebleu():
    predictions = ["The cat sat on the mat.", "a dog ran far away", "nothing in common"]
    references = [["The cat is on the mat.", "There is a cat on the mat."], ["a dog ran"], "something else entirely"]
    streams = [["The cat is on the mat.", "a dog ran", "something else entirely"],
               ["There is a cat on the mat.", None, None]]  # fmt: skip
    expected = sacrebleu.metrics.BLEU(max_ngram_order=1).corpus_score(predictions, streams).score
    assert bleu1(predictions, references) == pytest.approx(expected / 100)
    assert 0 < bleu1(predictions, references) < 1
    with pytest.raises(ValueError, match="1 predictions but 2 reference lists"):
        bleu1(["a"], [["a"], ["b"]])


def test_rouge_l_by_hand_and_against_rouge_score():
    # LCS 3 of 3 prediction and 6 reference words: P = 1, R = 1/2, F = 2/3
    assert rouge_l(["the cat sat"], ["the cat sat on the mat"]) == pytest.approx(2 / 3)
    # rouge-score lower-cases and drops punctuation: LCS 3, P = 1, R = 3/4, F = 6/7
    assert rouge_l(["The Cat, sat!"], ["the cat sat down"]) == pytest.approx(6 / 7)
    assert rouge_l(["the cat"], [["a dog", "the cat"]]) == pytest.approx(1.0)  # the best reference

    predictions = ["the quick brown fox jumps", "police killed the gunman", "no overlap"]
    references = [["the fast brown fox leaps over", "a quick fox"], ["the gunman was shot by police"], "zzz"]
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    per_example = [max(scorer.score(r, p)["rougeL"].fmeasure for r in ([refs] if isinstance(refs, str) else refs))
                   for p, refs in zip(predictions, references)]  # fmt: skip
    assert rouge_l(predictions, references) == pytest.approx(sum(per_example) / len(per_example))
    assert 0 < rouge_l(predictions, references) < 1


def test_task_metrics_follow_the_data_format():
    from rag_jax.training.evaluate import task_metrics

    predictions, answers = ["the cat sat", "supports"], [("the cat sat",), ("SUPPORTS",)]
    assert set(task_metrics("jsonl", predictions, answers)) == {"em", "f1"}
    generation = task_metrics("generation", predictions, answers)
    assert set(generation) == {"em", "f1", "bleu1", "rouge_l", "q_bleu1"} and generation["rouge_l"] == pytest.approx(1.0)
    fever = task_metrics("fever", predictions, answers)
    assert set(fever) == {"em", "f1", "label_accuracy"} and fever["label_accuracy"] == pytest.approx(1.0)


def test_regex_exact_match_is_drqa_match_from_the_start(caplog):
    from rag_jax.training.evaluate import task_metrics
    from rag_jax.training.metrics import regex_exact_match

    assert regex_exact_match("George Washington", ["george\\s+washington"]) == 1.0  # case-insensitive
    assert regex_exact_match("President George Washington", ["George Washington"]) == 0.0  # re.match: from the start
    assert regex_exact_match("1776 AD", ["17[0-9]{2}"]) == 1.0  # a prefix match suffices, as DrQA's
    with caplog.at_level(logging.WARNING):
        assert regex_exact_match("anything", ["(unclosed", "any"]) == 1.0  # the invalid pattern matches nothing
    assert "not a valid regular expression" in caplog.text
    assert task_metrics("tsv", ["Paris", "Lyon"], [("paris|rome",), ("nice",)], "regex") == {"em": 0.5}
    with pytest.raises(ValueError, match="match must be"):
        task_metrics("tsv", ["a"], [("a",)], "fuzzy")


# -- Q-BLEU-1 ---------------------------------------------------------------------------------------


def test_q_bleu1_word_types_follow_the_authors_script():
    words = "What year did Shakespeare write Hamlet ?".split()
    assert qbleu.question_type_words(words) == ["What", "year"]  # with the word after "what"
    assert qbleu.named_entity_words(words) == ["Shakespeare", "Hamlet"]  # capitalised, the question word left out
    assert qbleu.relevant_words(words) == ["write", "?"]  # "?" is dropped by the tokeniser
    assert qbleu.function_words(words) == ["did"]
    assert qbleu.tokens("Write, Hamlet?") == ["write", "hamlet"]


def test_q_bleu1_by_hand():
    # coco-caption's sentence BLEU-1: 2 clipped matches of 3 candidate words, brevity penalty against 4
    assert qbleu.sentence_bleu1(["a", "b", "c"], ["a", "b", "d", "e"]) == pytest.approx(2 / 3 * math.exp(1 - 4 / 3))
    assert qbleu.sentence_bleu1([], ["a"]) == 0.0
    # identical questions: BLEU-1 1, every word type present scores 1, an absent one 0 (as in the script)
    full = "What year did Shakespeare write Hamlet ?"
    assert metrics.q_bleu1([full], [full]) == pytest.approx(1.0)
    assert metrics.q_bleu1(["Who wrote Hamlet ?"], ["Who wrote Hamlet ?"]) == pytest.approx(0.7 * 0.9 + 0.3)
    # the entity matters most: same words but the entity swapped loses its weight of 0.6 x 0.7
    swapped = metrics.q_bleu1(["What year did Shakespeare write Othello ?"], [full])
    ner_f1 = 0.5  # precision = recall = 1/2 on the entities
    bleu = qbleu.sentence_bleu1(qbleu.tokens("What year did Shakespeare write Othello ?"), qbleu.tokens(full))
    assert swapped == pytest.approx(0.7 * (0.6 * ner_f1 + 0.2 + 0.1 + 0.1) + 0.3 * bleu)
    # several references: the best one counts
    assert metrics.q_bleu1(["Who wrote Hamlet ?"], [["Who painted it ?", "Who wrote Hamlet ?"]]) == pytest.approx(0.93)
    with pytest.raises(ValueError, match="no predictions"):
        metrics.q_bleu1([], [])


def test_generation_metrics_include_q_bleu1():
    from rag_jax.training.evaluate import task_metrics

    result = task_metrics("generation", ["Who wrote Hamlet ?"], [("Who wrote Hamlet ?",)])
    assert {"bleu1", "rouge_l", "q_bleu1", "em", "f1"} <= set(result) and result["q_bleu1"] == pytest.approx(0.93)
