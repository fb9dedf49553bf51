"""The host side of RAG's retrieval: questions -> query vectors -> top-k passages -> generator inputs.

``Retriever.retrieve`` runs, for a batch of questions: the question tokenizer (padded to
``max_question_length``), the question encoder (jitted; the parameters are an argument, so a
training loop passes its current ones without recompiling), the index search, the retrieved rows'
stored embeddings and passages, and the generator's context strings and tokens
(``rag_jax.retrieval.context``, transformers' ``RagRetriever`` format). Everything comes back as
NumPy arrays in a ``RetrievedBatch``; ``train_batch`` turns one and its labels into the typed batch
(``rag_jax.rag.batches``) ``rag_jax.training.step``'s step takes.

As in transformers, the question text joined to each passage is the question tokenizer's decoding
of the question ids (``skip_special_tokens=True``): lower-cased by an uncased BERT tokenizer,
truncated to ``max_question_length`` tokens.

The passage store, the index and the embeddings are one corpus (rows shared); ``with_corpus``
swaps them for another (an edited or newer corpus) without touching the models: RAG's hot-swap
of its non-parametric memory. Over a lexical index (``BM25Index``: no question vectors, no
embeddings) the retriever searches by the question strings and the doc scores are the index's
(BM25) scores. The training loop (``rag_jax.training.loop``) runs retrieval for the next steps in a
background thread while the device runs the current one.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from rag_jax.models.encoder import Encoder
from rag_jax.rag.batches import DenseRagBatch, FixedScoreRagBatch, RagBatch
from rag_jax.rag.model import doc_scores_from_embeddings
from rag_jax.retrieval.context import ContextFormat, context_strings, tokenize_contexts
from rag_jax.retrieval.corpus import Passage


@dataclasses.dataclass(frozen=True)
class RetrievedBatch:
    """What ``Retriever.retrieve`` found for B questions (K documents each), as NumPy arrays.

    ``doc_ids_BxK`` are corpus rows (``PassageStore`` rows; ``passages[b][k]`` holds the passage
    and its file id), best first; ``doc_scores_BxK[b, k] = score_scale * question_vectors_BxD[b] .
    doc_embeddings_BxKxD[b, k]`` in float32 (the embeddings as stored, cast to float32; the scale is
    ``retrieve``'s); over a lexical index the question vectors and doc embeddings are None and the
    scores are the index's.
    Ids and masks are int32. ``questions`` are the question strings joined into the contexts.
    """

    questions: list[str]
    question_input_ids_BxSq: np.ndarray
    question_attention_mask_BxSq: np.ndarray
    question_vectors_BxD: np.ndarray | None
    doc_ids_BxK: np.ndarray
    doc_scores_BxK: np.ndarray
    doc_embeddings_BxKxD: np.ndarray | None
    context_input_ids_BxKxS: np.ndarray
    context_attention_mask_BxKxS: np.ndarray
    passages: list[list[Passage]]

    def rescored(self, doc_scores_BxL: np.ndarray, k: int) -> "RetrievedBatch":
        """The ``k`` of these documents with the highest ``doc_scores_BxL`` (new scores for them, e.g. from
        a document encoder newer than the index), best first, ties to the earlier; their stored
        embeddings are dropped (they no longer give these scores)."""
        doc_scores_BxL = np.asarray(doc_scores_BxL, np.float32)
        keep_BxK = np.argsort(-doc_scores_BxL, axis=1, kind="stable")[:, :k]

        def kept(x_BxL):
            return np.take_along_axis(x_BxL, keep_BxK.reshape(*keep_BxK.shape, *[1] * (x_BxL.ndim - 2)), axis=1)

        return dataclasses.replace(
            self, doc_ids_BxK=kept(self.doc_ids_BxK), doc_scores_BxK=kept(doc_scores_BxL), doc_embeddings_BxKxD=None,
            context_input_ids_BxKxS=kept(self.context_input_ids_BxKxS),
            context_attention_mask_BxKxS=kept(self.context_attention_mask_BxKxS),
            passages=[[row[i] for i in keep] for row, keep in zip(self.passages, keep_BxK.tolist())],
        )  # fmt: skip


def train_batch(retrieved: RetrievedBatch, labels_BxT) -> RagBatch:
    """The batch ``rag_jax.training.step.Trainer.train_step`` takes: a ``DenseRagBatch`` (question
    ids/mask ``[B, Q]`` and ``doc_embeddings [B, K, D]`` (float32) for the step to score), or, from a
    lexical index, a ``FixedScoreRagBatch`` (the index's ``doc_scores [B, K]``); with the context
    ids/mask ``[B, K, S]`` and ``labels [B, T]`` (int32)."""
    labels_BxT = np.asarray(labels_BxT)
    batch_size = retrieved.doc_ids_BxK.shape[0]
    if labels_BxT.ndim != 2 or labels_BxT.shape[0] != batch_size:
        raise ValueError(f"labels must be [B={batch_size}, T], got shape {labels_BxT.shape}")
    contexts_and_labels = {
        "context_input_ids_BxKxS": retrieved.context_input_ids_BxKxS,
        "context_attention_mask_BxKxS": retrieved.context_attention_mask_BxKxS,
        "labels_BxT": labels_BxT.astype(np.int32),
    }
    if retrieved.doc_embeddings_BxKxD is None:
        return FixedScoreRagBatch(doc_scores_BxK=retrieved.doc_scores_BxK, **contexts_and_labels)
    return DenseRagBatch(
        question_input_ids_BxQ=retrieved.question_input_ids_BxSq,
        question_attention_mask_BxQ=retrieved.question_attention_mask_BxSq,
        doc_embeddings_BxKxD=retrieved.doc_embeddings_BxKxD,
        **contexts_and_labels,
    )


def gather_rows(embeddings, rows: np.ndarray) -> np.ndarray:
    """``embeddings[rows]`` as float32 for any ``[N, D]`` array-like with integer row access
    (``np.ndarray`` / memmap, ``EmbeddingShards``), in the shape ``rows.shape + (D,)``."""
    flat = np.asarray(rows, np.int64).reshape(-1)
    if isinstance(embeddings, np.ndarray):
        out = np.asarray(embeddings[flat], np.float32)
    else:
        out = np.array([np.asarray(embeddings[int(i)], np.float32) for i in flat], np.float32)
    return out.reshape(*np.shape(rows), embeddings.shape[1])


def _padded_rows(n: int) -> int:
    """The question batch is padded to a power of two: few compiled encoder programs."""
    return 1 << max(0, math.ceil(math.log2(n)))


@dataclasses.dataclass(frozen=True, eq=False)
class Retriever:
    """A question encoder and its tokenizer, the generator tokenizer, and one corpus: ``store``
    (passages by row, e.g. ``PassageStore``), ``index`` (``Index``: ``search``, ``dim``, ``size``)
    and ``embeddings`` (the ``[N, D]`` document vectors by row, e.g. ``load_embeddings``); or a
    lexical ``index`` (``BM25Index``) with ``embeddings=None``, searched by question text (the
    question encoder is then only carried along, never run).

    ``k`` documents per question by default; questions are padded/truncated to
    ``max_question_length`` tokens, contexts to ``max_combined_length``; ``prefix``, ``title_sep``
    and ``doc_sep`` build the context strings (``rag_jax.retrieval.context``; transformers'
    defaults). Construction refuses a corpus whose parts disagree in size or dim.
    """

    question_encoder: Encoder = dataclasses.field(repr=False)
    question_tokenizer: Any = dataclasses.field(repr=False)
    generator_tokenizer: Any = dataclasses.field(repr=False)
    store: Any = dataclasses.field(repr=False)
    index: Any = dataclasses.field(repr=False)
    embeddings: Any = dataclasses.field(repr=False)
    k: int = 5
    max_question_length: int = 128
    max_combined_length: int = 300
    prefix: str | None = None
    title_sep: str = " / "
    doc_sep: str = " // "

    def __post_init__(self):
        n = self.index.size
        if len(self.store) != n:
            raise ValueError(f"the passage store has {len(self.store)} passages but the index holds {n} vectors")
        if not 1 <= self.k <= n:
            raise ValueError(f"k={self.k} must be between 1 and the corpus size {n}")
        if self.max_question_length < 1:
            raise ValueError(f"max_question_length must be positive, got {self.max_question_length}")
        if self.lexical:
            if self.embeddings is not None:
                raise ValueError("a lexical index is searched by text: pass embeddings=None")
            return
        dim = self.index.dim
        if tuple(self.embeddings.shape) != (n, dim):
            raise ValueError(f"the embeddings have shape {tuple(self.embeddings.shape)}, the index is [{n}, {dim}]")
        if self.question_encoder.dim != dim:
            raise ValueError(
                f"the question encoder gives {self.question_encoder.dim}-dim vectors, the index has dim {dim}"
            )

    @property
    def lexical(self) -> bool:
        return getattr(self.index, "lexical", False)

    @property
    def context_format(self) -> ContextFormat:
        return ContextFormat(self.prefix, self.title_sep, self.doc_sep, self.max_combined_length)

    def with_corpus(self, store, index, embeddings) -> "Retriever":
        """The same models and settings over another corpus (no retraining): hot-swap."""
        return dataclasses.replace(self, store=store, index=index, embeddings=embeddings)

    train_batch = staticmethod(train_batch)

    def tokenize_questions(self, questions, attention_mask=None) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, mask) [B, max_question_length]`` int32 from question strings, or from token ids
        ``[B, Sq <= max_question_length]`` (padded with the tokenizer's pad id; the mask, when not
        given, is ``ids != pad``)."""
        if isinstance(questions, str):
            raise TypeError("questions must be a list of strings or a [B, Sq] array of token ids, not one string")
        if len(questions) == 0:
            raise ValueError("no questions to retrieve for")
        length = self.max_question_length
        if all(isinstance(q, str) for q in questions):
            enc = self.question_tokenizer(
                list(questions), padding="max_length", truncation=True, max_length=length, return_tensors="np"
            )
            return np.asarray(enc["input_ids"], np.int32), np.asarray(enc["attention_mask"], np.int32)
        ids = np.asarray(questions)
        if ids.ndim != 2 or ids.dtype.kind not in "iu":
            raise ValueError(f"question token ids must be an integer [B, Sq] array, got {ids.dtype} {ids.shape}")
        if ids.shape[1] > length:
            raise ValueError(f"question ids have length {ids.shape[1]} > max_question_length {length}")
        pad_id = self.question_tokenizer.pad_token_id
        mask = (ids != pad_id) if attention_mask is None else np.asarray(attention_mask)
        if mask.shape != ids.shape:
            raise ValueError(f"question attention mask {mask.shape} does not match the ids {ids.shape}")
        width = ((0, 0), (0, length - ids.shape[1]))
        return np.pad(ids, width, constant_values=pad_id).astype(np.int32), np.pad(mask, width).astype(np.int32)

    def question_strings(self, ids_BxSq: np.ndarray) -> list[str]:
        """The questions as the contexts quote them: their token ids decoded (an uncased encoder's are lower case)."""
        return self.question_tokenizer.decode(ids_BxSq.tolist(), skip_special_tokens=True)

    def encode_questions(self, ids_BxSq: np.ndarray, mask_BxSq: np.ndarray, params=None) -> np.ndarray:
        """Query vectors ``[B, D]`` float32 with the encoder's parameters, or ``params`` (same
        structure, e.g. a training state's current ones). The rows are padded to a power of two by
        repeating the last one, so a handful of programs serve every batch size."""
        encoder = self.question_encoder if params is None else dataclasses.replace(self.question_encoder, params=params)
        n = len(ids_BxSq)
        pad = ((0, _padded_rows(n) - n), (0, 0))
        vectors = encoder.encode(np.pad(ids_BxSq, pad, mode="edge"), np.pad(mask_BxSq, pad, mode="edge"))
        return np.asarray(vectors, np.float32)[:n]

    def retrieve(
        self,
        questions: Sequence[str] | np.ndarray,
        k: int | None = None,
        query_encoder_params=None,
        question_attention_mask: np.ndarray | None = None,
        score_scale: float = 1.0,
    ) -> RetrievedBatch:
        """The top ``k`` (default ``self.k``) passages of each question with everything the
        generator and the training step need (see ``RetrievedBatch``). ``questions``: strings, or
        question token ids ``[B, Sq]`` (with an optional mask). ``query_encoder_params`` replaces
        the encoder's parameters for this call; ``score_scale`` multiplies the dense scores (a
        ``RagModel``'s ``score_scale``; a lexical index's scores are kept as they are)."""
        k = self.k if k is None else k
        ids_BxSq, mask_BxSq = self.tokenize_questions(questions, question_attention_mask)
        question_strings = self.question_strings(ids_BxSq)
        if self.lexical:
            q_BxD = doc_emb_BxKxD = None
            doc_ids_BxK, doc_scores_BxK = self.index.search_text(question_strings, k)
        else:
            q_BxD = self.encode_questions(ids_BxSq, mask_BxSq, query_encoder_params)
            doc_ids_BxK, _ = self.index.search(q_BxD, k)
            doc_emb_BxKxD = gather_rows(self.embeddings, doc_ids_BxK)
            doc_scores_BxK = np.asarray(doc_scores_from_embeddings(q_BxD, doc_emb_BxKxD, score_scale))
        flat = self.store.get_many(doc_ids_BxK.reshape(-1))
        passages = [flat[b * k : (b + 1) * k] for b in range(len(ids_BxSq))]
        strings = context_strings(passages, question_strings, self.context_format)
        ctx_ids_BxKxS, ctx_mask_BxKxS = tokenize_contexts(self.generator_tokenizer, strings, self.max_combined_length)
        return RetrievedBatch(
            questions=question_strings,
            question_input_ids_BxSq=ids_BxSq,
            question_attention_mask_BxSq=mask_BxSq,
            question_vectors_BxD=q_BxD,
            doc_ids_BxK=doc_ids_BxK,
            doc_scores_BxK=doc_scores_BxK,
            doc_embeddings_BxKxD=doc_emb_BxKxD,
            context_input_ids_BxKxS=ctx_ids_BxKxS,
            context_attention_mask_BxKxS=ctx_mask_BxKxS,
            passages=passages,
        )
