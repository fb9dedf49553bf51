"""The generator's input for one (question, retrieved passage) pair, as transformers' ``RagRetriever``
builds it (``postprocess_docs``, v5.23).

The string is ``prefix + title + title_sep + text + doc_sep + question`` where the title loses one
leading and one trailing double quote (``removeprefix('"').removesuffix('"')``, as DPR's Wikipedia
titles are quoted), then every ``"  "`` (two spaces) becomes ``" "`` in one left-to-right pass
(``str.replace``, so three spaces become two, exactly as the reference). The strings are tokenised
by the generator tokenizer with its special tokens, right-truncated to ``max_length`` tokens and
padded to it. The question comes last, so when a long passage fills the budget the truncation cuts
the question first (a reference quirk, its code has a TODO about it; kept for parity).

Rows are laid out ``[B, K]`` (``[B, K, S]`` after tokenising); transformers' flat ``B * K`` order
(document fastest) is their reshape.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from rag_jax.retrieval.corpus import Passage


@dataclasses.dataclass(frozen=True)
class ContextFormat:
    """How a passage and a question are joined for the generator (defaults: transformers' RAG).
    ``prefix`` None means "" (transformers falls back to the generator config's ``prefix``, which
    BART does not set)."""

    prefix: str | None = None
    title_sep: str = " / "
    doc_sep: str = " // "
    max_length: int = 300

    def __post_init__(self):
        if self.max_length < 1:
            raise ValueError(f"max_length must be positive, got {self.max_length}")


def context_string(passage: Passage, question: str, fmt: ContextFormat = ContextFormat()) -> str:
    """The generator input string for one passage and question (see the module docstring)."""
    title = passage.title.removeprefix('"').removesuffix('"')
    joined = (fmt.prefix or "") + title + fmt.title_sep + passage.text + fmt.doc_sep + question
    return joined.replace("  ", " ")


def context_strings(
    passages_BxK: Sequence[Sequence[Passage]], questions_B: Sequence[str], fmt: ContextFormat = ContextFormat()
) -> list[list[str]]:
    """``[B][K]`` generator input strings: passage ``k`` of question ``b`` joined with question ``b``."""
    if len(passages_BxK) != len(questions_B):
        raise ValueError(f"{len(passages_BxK)} rows of passages for {len(questions_B)} questions")
    return [[context_string(p, q, fmt) for p in row] for row, q in zip(passages_BxK, questions_B)]


def tokenize_contexts(
    generator_tokenizer, strings_BxK: Sequence[Sequence[str]], max_length: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids [B, K, S], attention_mask [B, K, S])`` int32, S = ``max_length``: the strings
    tokenised with special tokens, right-truncated and padded to ``max_length``."""
    b = len(strings_BxK)
    ks = {len(row) for row in strings_BxK}
    if len(ks) > 1:
        raise ValueError(f"every question needs the same number of contexts, got {sorted(ks)}")
    k = ks.pop() if ks else 0
    flat = [s for row in strings_BxK for s in row]
    if not flat:
        return np.zeros((b, k, max_length), np.int32), np.zeros((b, k, max_length), np.int32)
    enc = generator_tokenizer(flat, max_length=max_length, padding="max_length", truncation=True, return_tensors="np")
    ids, mask = np.asarray(enc["input_ids"], np.int32), np.asarray(enc["attention_mask"], np.int32)
    return ids.reshape(b, k, max_length), mask.reshape(b, k, max_length)
