"""BM25 lexical retrieval (the paper's BM25 baseline, Table 6), with the bm25s package.

``BM25Index.build`` indexes every passage's ``title text`` (lower-cased word tokens of two or more
characters, English stop words removed; Lucene's BM25 with k1 = 1.5, b = 0.75, bm25s's defaults)
in memory. ``search_text(questions, k)`` gives the top-k rows and their BM25 scores. A
``Retriever`` built over a ``BM25Index`` (no question encoder vectors, no embeddings) retrieves by
question text and uses the BM25 scores as the retrieval logits of p(z|x), as the paper did; the
training step then takes those scores as fixed (``doc_scores`` in the batch), and nothing in the
question encoder trains.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from rag_jax.retrieval.corpus import Passage
from rag_jax.retrieval.index.base import check_k


def _bm25s():
    try:
        import bm25s
    except ImportError as e:  # pragma: no cover - bm25s is a pinned dependency
        raise ImportError("BM25 retrieval needs the bm25s package: pip install bm25s") from e
    return bm25s


def _tokens(texts: Sequence[str]) -> list[list[str]]:
    return _bm25s().tokenize(list(texts), stopwords="en", return_ids=False, show_progress=False)


class BM25Index:
    """A BM25 index over ``size`` passages (rows ``0 .. size-1``, the passage store's rows)."""

    lexical = True  # searched by question text, not vectors (see ``Retriever``)

    def __init__(self, model, size: int):
        self.model = model
        self.size = size

    @classmethod
    def build(cls, passages: Iterable[Passage], *, progress: bool = False) -> BM25Index:
        texts = [f"{p.title} {p.text}" for p in passages]
        if not texts:
            raise ValueError("BM25Index.build: no passages")
        model = _bm25s().BM25()
        model.index(_tokens(texts), show_progress=progress)
        return cls(model, len(texts))

    def search_text(self, texts: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(rows [Q, k] int64, scores [Q, k] float32)``, best first. A question sharing no word
        with the corpus gets score-0 rows."""
        check_k(k, self.size)
        rows, scores = self.model.retrieve(_tokens(texts), k=k, show_progress=False, n_threads=1)
        return np.asarray(rows, np.int64), np.asarray(scores, np.float32)
