"""Q-BLEU-1 (Nema & Khapra 2018, "Towards a Better Metric for Evaluating Question Generation
Systems"), the metric RAG's paper reports for Jeopardy question generation.

Per generated question ``c`` and reference ``r``:

    Q-BLEU-1 = delta * Answerability + (1 - delta) * BLEU-1(c, r)
    Answerability = sum_i w_i * F_i,  i in {relevant words, named entities, question words, function words}

where ``F_i`` is the harmonic mean of the sentence BLEU-1 of ``c``'s type-i words against ``r``'s
(precision) and of ``r``'s against ``c``'s (recall); the result is averaged over questions. This
follows the authors' script (``answerability_score.py``) and its README's weights: named entities
0.6, question words 0.2, relevant words 0.1, function words 0.1 (the rest), ``delta`` 0.7. The word
types are the script's, from the whitespace-split text as written:

* question words: What, Which, Why, Who, Whom, Whose, Where, When, How, Is (either case), with the
  word after "what" / "which";
* named entities: capitalised words, the first word left out when it is a question word (the
  script approximates NER by capitalisation too: no NER model is needed, none is used here);
* relevant words: the rest that are neither capitalised nor stop words;
* function words: the script's stop-word list, lower-cased.

A word type that neither question has scores 0, as in the script: a question identical to its
reference but without function words scores 0.7 x 0.9 + 0.3 = 0.93.

Sentence BLEU-1 is coco-caption's (the script's scorer): clipped unigram matches plus 1e-15 over the
candidate's length plus 1e-9, times the brevity penalty against the reference. The one difference:
coco-caption tokenises with Stanford's Java PTB tokeniser (lower-casing, punctuation dropped); here
a regular expression does the same for words, numbers and punctuation, splitting contractions at
the apostrophe ("don't" -> "don", "t") where PTB makes "do", "n't". With several references a
question gets its best score over them (the script takes one).
"""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Sequence

import numpy as np

NE_WEIGHT, QUESTION_WEIGHT, RELEVANT_WEIGHT = 0.6, 0.2, 0.1  # function words: 1 - the three = 0.1
DELTA = 0.7  # the weight of Answerability against BLEU-1

QUESTION_WORDS = frozenset(w for word in ("What", "Which", "Why", "Who", "Whom", "Whose", "Where", "When", "How", "Is")
                           for w in (word, word.lower()))  # fmt: skip
STOP_WORDS = frozenset("""
did have ourselves hers between yourself but again there about once during out very having with they own an be
some for do its yours such into of most itself other off is s am or as from him each the themselves until below are
we these your his through don nor me were her more himself this down should our their while above both up to ours
had she all no at any before them same and been in will on does yourselves then that because over so can not now
under he you herself has just too only myself those i after few t being if theirs my against a by doing it further
was here than
""".split())  # fmt: skip
_TOKEN = re.compile(r"[^\W_]+|_+")  # words and numbers; punctuation is dropped, as coco-caption's tokeniser does
_TINY, _SMALL = 1e-15, 1e-9  # coco-caption's smoothing constants


def question_type_words(words: list[str]) -> list[str]:
    """The question words, each "what" / "which" with the word after it."""
    found = []
    for i, word in enumerate(words):
        if word in QUESTION_WORDS:
            found.append(word)
            if word.lower() in ("what", "which") and i + 1 < len(words):
                found.append(words[i + 1])
    return found


def named_entity_words(words: list[str]) -> list[str]:
    """Capitalised words, the first one left out when it is a question word."""
    if words and words[0].lower() in QUESTION_WORDS:
        words = words[1:]
    return [w for w in words if w[0].isupper()]


def relevant_words(words: list[str]) -> list[str]:
    """Words that are not question words (or their what/which complement), capitalised or stop words."""
    question = set(question_type_words(words))
    return [w for w in words if w not in question and not w[0].isupper() and w not in STOP_WORDS]


def function_words(words: list[str]) -> list[str]:
    return [w.lower() for w in words if w.lower() in STOP_WORDS]


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def sentence_bleu1(candidate: list[str], reference: list[str]) -> float:
    """coco-caption's sentence BLEU-1 of ``candidate`` against one ``reference`` (token lists)."""
    reference_counts = collections.Counter(reference)
    correct = sum(min(n, reference_counts[w]) for w, n in collections.Counter(candidate).items())
    bleu = (correct + _TINY) / (len(candidate) + _SMALL)
    ratio = (len(candidate) + _TINY) / (len(reference) + _SMALL)
    return bleu * math.exp(1 - 1 / ratio) if ratio < 1 else bleu


def _f1(candidate: list[str], reference: list[str]) -> float:
    precision, recall = sentence_bleu1(candidate, reference), sentence_bleu1(reference, candidate)
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def answerability(candidate: str, reference: str) -> float:
    c, r = candidate.split(), reference.split()
    weighted = (
        (NE_WEIGHT, named_entity_words),
        (QUESTION_WEIGHT, question_type_words),
        (RELEVANT_WEIGHT, relevant_words),
        (1 - NE_WEIGHT - QUESTION_WEIGHT - RELEVANT_WEIGHT, function_words),
    )
    return sum(w * _f1(tokens(" ".join(words(c))), tokens(" ".join(words(r)))) for w, words in weighted)


def q_bleu1_one(candidate: str, reference: str) -> float:
    """One question's Q-BLEU-1 against one reference."""
    return DELTA * answerability(candidate, reference) + (1 - DELTA) * sentence_bleu1(tokens(candidate), tokens(reference))


def mean_q_bleu1(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean Q-BLEU-1 in [0, 1] over the predictions, each against its best reference
    (``rag_jax.training.metrics.q_bleu1`` checks the inputs)."""
    return float(np.mean([max(q_bleu1_one(p, r) for r in refs) for p, refs in zip(predictions, references)]))
