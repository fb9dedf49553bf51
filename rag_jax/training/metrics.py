"""Evaluation metrics for RAG's tasks: exact match / F1 (open-domain QA), answer recall@k of the
retrieved passages, BLEU-1 and ROUGE-L (generation), label accuracy (FEVER).

Every score here is a **fraction in [0, 1]**, averaged over examples (corpus-level for BLEU-1);
multiply by 100 for the percentages papers print. A prediction is scored against all of its gold
answers and the best one counts (SQuAD's ``metric_max_over_ground_truths``). A gold answer list
may not be empty; a plain string is taken as one answer.

* ``normalize_answer``, ``exact_match``, ``f1_score``: exactly the official SQuAD v1.1 evaluation
  script (lower-case, drop ASCII punctuation, drop the words a / an / the, collapse whitespace; F1
  over whitespace tokens with multiplicity), which the transformers RAG example (``eval_rag.py``)
  uses. DPR's reader evaluation first applies Unicode NFD to both strings; that changes a result only
  when one side is written with precomposed and the other with combining characters.
* ``has_answer`` / ``answer_recall_at_k``: DPR's ``has_answer`` (``dpr/data/qa_validation.py``),
  the retrieval accuracy the DPR and RAG papers report. ``match="string"``: NFD, then DPR's
  ``SimpleTokenizer`` (runs of letters / digits / combining marks, and every other non-space
  character alone), lower-cased; a passage has the answer when the answer's tokens occur
  contiguously among its tokens (so "cat" is not found in "category", and punctuation is kept:
  "1,000" needs "1 , 000"). One difference: an answer with no tokens (only spaces or control
  characters) is never found, where DPR counts it as found everywhere. ``match="regex"``: each
  answer is a regular expression (CuratedTrec), NFD-normalised and searched with Python's ``re``
  (IGNORECASE | UNICODE | MULTILINE, DPR's ``regex_match``) in the NFD text; an invalid pattern
  matches nothing (as in DPR) and is logged once per call.
* ``bleu1``: sacrebleu's corpus BLEU with unigrams only (brevity penalty included; sacrebleu's
  defaults otherwise: 13a tokenisation, case-sensitive), over one or more references per
  prediction, divided by 100 (sacrebleu reports 0-100): an identical corpus scores 1.0.
* ``rouge_l``: rouge-score's ROUGE-L F-measure per example (the best over its references), averaged
  (rouge-score's own scale, 0-1); rouge-score lower-cases and keeps only ``[a-z0-9]`` tokens.
* ``q_bleu1``: Q-BLEU-1 (Nema & Khapra 2018), the authors' answerability-weighted BLEU-1 for
  generated questions (Jeopardy); see ``rag_jax.training.qbleu`` for the formula, the weights and
  how it differs from the authors' script (tokenisation only).
* ``label_accuracy``: the prediction equals the label after SQuAD normalisation.
"""

from __future__ import annotations

import collections
import logging
import re
import string
import unicodedata
from collections.abc import Sequence

import numpy as np
import regex
import sacrebleu

from rag_jax.training import qbleu

logger = logging.getLogger(__name__)

Answers = Sequence[str] | str

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
# DPR's SimpleTokenizer: alphanumeric runs (letters, numbers, marks) or any single non-space, non-control character.
_DPR_TOKEN = regex.compile(r"([\p{L}\p{N}\p{M}]+)|([^\p{Z}\p{C}])",
                           flags=regex.IGNORECASE | regex.UNICODE | regex.MULTILINE)  # fmt: skip


def _gold(answers: Answers) -> Sequence[str]:
    answers = [answers] if isinstance(answers, str) else answers
    if len(answers) == 0:
        raise ValueError("a gold answer list is empty; every example needs at least one answer")
    return answers


def _pairs(items: Sequence, golds: Sequence, items_name: str, golds_name: str) -> None:
    """Checks that there is one gold entry per scored item, and at least one item."""
    if len(items) != len(golds):
        raise ValueError(f"{len(items)} {items_name} but {len(golds)} {golds_name}")
    if len(items) == 0:
        raise ValueError(f"no {items_name} to score")


# ---------------------------------------------------------------------------------------------
# Open-domain QA


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation, in its order: lower-case, remove ASCII punctuation characters
    (``"Eiffel-Tower"`` -> ``"eiffeltower"``), replace the words a / an / the by spaces, collapse
    whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: Answers) -> float:
    """1.0 when the normalised prediction equals some normalised gold answer, else 0.0."""
    norm = normalize_answer(prediction)
    return float(any(norm == normalize_answer(a) for a in _gold(answers)))


def _f1(prediction_tokens: list[str], gold_tokens: list[str]) -> float:
    same = sum((collections.Counter(prediction_tokens) & collections.Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, answers: Answers) -> float:
    """SQuAD token F1 in [0, 1] of the prediction against its best gold answer (0.0 when either is
    empty after normalisation, as in the SQuAD v1.1 script)."""
    tokens = normalize_answer(prediction).split()
    return max(_f1(tokens, normalize_answer(a).split()) for a in _gold(answers))


def regex_exact_match(prediction: str, patterns: Answers) -> float:
    """1.0 if the prediction matches any gold pattern from its start (DrQA's / DPR's ``regex_match_score``
    for CuratedTrec, whose answers are regular expressions: ``re.match``, case-insensitive, on NFD text;
    an invalid pattern matches nothing, with a warning), else 0.0."""
    text = unicodedata.normalize("NFD", prediction)
    compiled = [p for p in map(_answer_pattern, _gold(patterns)) if p is not None]
    return float(any(p.match(text) is not None for p in compiled))


def qa_metrics(predictions: Sequence[str], answers_list: Sequence[Answers], *, match: str = "string") -> dict[str, float]:
    """``{"em", "f1"}``: the mean exact match and F1 over the examples (fractions in [0, 1]). With
    ``match="regex"`` (answers are patterns, CuratedTrec) only ``{"em"}``, by ``regex_exact_match``."""
    _pairs(predictions, answers_list, "predictions", "answer lists")
    if match == "regex":
        return {"em": float(np.mean([regex_exact_match(p, a) for p, a in zip(predictions, answers_list)]))}
    if match != "string":
        raise ValueError(f"match must be 'string' or 'regex', got {match!r}")
    return {
        "em": float(np.mean([exact_match(p, a) for p, a in zip(predictions, answers_list)])),
        "f1": float(np.mean([f1_score(p, a) for p, a in zip(predictions, answers_list)])),
    }


def label_accuracy(predictions: Sequence[str], labels: Sequence[Answers]) -> float:
    """The fraction of predictions equal to their label (or one of their labels) after SQuAD
    normalisation, so case, punctuation and spacing do not matter (FEVER: SUPPORTS / REFUTES /
    NOT ENOUGH INFO)."""
    _pairs(predictions, labels, "predictions", "labels")
    return float(np.mean([exact_match(p, label) for p, label in zip(predictions, labels)]))


# ---------------------------------------------------------------------------------------------
# Retrieval


def dpr_tokens(text: str) -> list[str]:
    """DPR's ``SimpleTokenizer`` words of the NFD-normalised text, lower-cased."""
    return [m.group().lower() for m in _DPR_TOKEN.finditer(unicodedata.normalize("NFD", text))]


def _contains(tokens: list[str], part: list[str]) -> bool:
    n = len(part)
    return any(tokens[i : i + n] == part for i in range(len(tokens) - n + 1))


def _answer_pattern(pattern: str) -> re.Pattern | None:
    """DPR's ``regex_match`` compilation of an NFD-normalised answer pattern; None (logged) when invalid."""
    try:
        return re.compile(unicodedata.normalize("NFD", pattern), flags=re.IGNORECASE | re.UNICODE | re.MULTILINE)
    except (re.error, OverflowError, RecursionError) as e:
        logger.warning("answer pattern %r is not a valid regular expression (%s); it matches nothing", pattern, e)
        return None


def has_answer(passages: Sequence[str] | str, answers: Answers, *, match: str = "string") -> bool:
    """Whether any of ``passages`` (texts) contains any gold answer, as DPR decides it (module
    docstring); ``match`` is ``"string"`` (token match) or ``"regex"`` (answers are patterns)."""
    passages = [passages] if isinstance(passages, str) else passages
    answers = _gold(answers)
    if match == "string":
        wanted = [tokens for tokens in map(dpr_tokens, answers) if tokens]
        return any(_contains(text_tokens, a) for text_tokens in map(dpr_tokens, passages) for a in wanted)
    if match == "regex":
        patterns = [p for p in map(_answer_pattern, answers) if p is not None]
        texts = [unicodedata.normalize("NFD", p) for p in passages]
        return any(p.search(text) is not None for p in patterns for text in texts)
    raise ValueError(f"match must be 'string' or 'regex', got {match!r}")


def answer_recall_at_k(passages_per_question: Sequence[Sequence[str]], answers_per_question: Sequence[Answers],
                       k: int, *, match: str = "string") -> float:  # fmt: skip
    """The fraction (in [0, 1]) of questions with a gold answer in one of their top ``k`` passages
    (texts, best first), by ``has_answer``. Every question must have at least ``k`` passages."""
    _pairs(passages_per_question, answers_per_question, "passage lists", "answer lists")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    short = [i for i, p in enumerate(passages_per_question) if len(p) < k]
    if short:
        raise ValueError(f"recall@{k} needs {k} passages per question; question {short[0]} has "
                         f"{len(passages_per_question[short[0]])} ({len(short)} question(s) have fewer "
                         f"than {k})")  # fmt: skip
    hits = [has_answer(p[:k], a, match=match) for p, a in zip(passages_per_question, answers_per_question)]
    return float(np.mean(hits))


# ---------------------------------------------------------------------------------------------
# Generation


def bleu1(predictions: Sequence[str], references: Sequence[Answers]) -> float:
    """Corpus BLEU-1 in [0, 1] (sacrebleu's score, unigram precision times the brevity penalty,
    divided by 100); each prediction has one or more references."""
    _pairs(predictions, references, "predictions", "reference lists")
    refs = [_gold(r) for r in references]
    # sacrebleu takes reference streams (the i-th reference of every prediction); None fills the
    # streams of predictions with fewer references.
    streams = [[r[i] if i < len(r) else None for r in refs] for i in range(max(map(len, refs)))]
    return sacrebleu.metrics.BLEU(max_ngram_order=1).corpus_score(list(predictions), streams).score / 100


def q_bleu1(predictions: Sequence[str], references: Sequence[Answers]) -> float:
    """Mean Q-BLEU-1 in [0, 1] (``rag_jax.training.qbleu``), each prediction against its best reference."""
    _pairs(predictions, references, "predictions", "reference lists")
    return qbleu.mean_q_bleu1(predictions, [_gold(r) for r in references])


def rouge_l(predictions: Sequence[str], references: Sequence[Answers], *, use_stemmer: bool = False) -> float:
    """Mean ROUGE-L F-measure in [0, 1] (rouge-score), each prediction scored against its best
    reference."""
    # imported here: it loads nltk, seconds of start-up
    from rouge_score import rouge_scorer

    _pairs(predictions, references, "predictions", "reference lists")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    scores = [scorer.score_multi(list(_gold(r)), p)["rougeL"].fmeasure for p, r in zip(predictions, references)]
    return float(np.mean(scores))
