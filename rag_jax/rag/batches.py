"""The batches the loss reads, one type per kind (registered dataclasses: pytrees of arrays).

* ``DenseRagBatch``: a dense retriever's batch. The loss scores the retrieved documents itself,
  ``doc_scores = q(x) . d(z)`` from the question and the documents' stored embeddings, so its gradient
  reaches the question encoder.
* ``DocTokensRagBatch``: end-to-end retriever training. The batch brings the retrieved documents'
  tokens (their ``title / text`` as the document encoder reads them) instead of stored embeddings;
  the loss encodes them with the trained document encoder, ``doc_scores = q(x) . d(z)``, so its
  gradient reaches both encoders. With a rerank (``TrainConfig.rerank_top_k``) the K axis holds the
  candidates, of which the loss keeps the top ``rerank_top_k`` by the current encoders' scores.
* ``QuestionsRagBatch``: retrieval inside the step (``corpus.retriever=device``): the questions, the
  generator tokens of their part of the contexts (``doc_sep + question``) and the labels; the step
  retrieves and joins the contexts on the devices (``rag_jax.retrieval.device``), which makes it a
  ``DenseRagBatch``.
* ``FixedScoreRagBatch``: documents with fixed scores (a lexical retriever such as BM25, or
  transformers' ``doc_scores`` argument); the question encoder gets no gradient.
* ``Seq2SeqBatch``: the closed-book baseline (k = 0): the question alone is the generator's input.

Every field's name ends with its shape (B examples, Q question tokens, K documents, D embedding
dims, S input tokens, P document-encoder tokens, M question-part tokens, T label tokens); the leading axis is always the batch, so shardings and
micro-batch splits are tree maps over a batch. The type is part of the pytree structure, so a
jitted function that dispatches on it with ``isinstance`` traces one program per kind. Attention masks
are right-padded (every token before every pad; a host mask that is not is a ``ValueError`` naming the
field): the loss hands them to the models as lengths, which cuDNN's fused attention takes on GPU.
"""

from __future__ import annotations

import dataclasses

import jax
from jax.typing import ArrayLike

from rag_jax.models.attention import check_right_padded


class _RightPadded:
    """Checks, on construction, that the batch's host attention masks are right-padded."""

    def __post_init__(self):
        for field in dataclasses.fields(self):
            if "attention_mask" in field.name:
                check_right_padded(getattr(self, field.name), field.name)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseRagBatch(_RightPadded):
    question_input_ids_BxQ: ArrayLike
    question_attention_mask_BxQ: ArrayLike
    doc_embeddings_BxKxD: ArrayLike
    context_input_ids_BxKxS: ArrayLike
    context_attention_mask_BxKxS: ArrayLike
    labels_BxT: ArrayLike


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DocTokensRagBatch(_RightPadded):
    question_input_ids_BxQ: ArrayLike
    question_attention_mask_BxQ: ArrayLike
    doc_input_ids_BxKxP: ArrayLike
    doc_attention_mask_BxKxP: ArrayLike
    context_input_ids_BxKxS: ArrayLike
    context_attention_mask_BxKxS: ArrayLike
    labels_BxT: ArrayLike


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuestionsRagBatch(_RightPadded):
    question_input_ids_BxQ: ArrayLike
    question_attention_mask_BxQ: ArrayLike
    question_part_ids_BxM: ArrayLike
    question_part_lengths_B: ArrayLike
    labels_BxT: ArrayLike


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FixedScoreRagBatch(_RightPadded):
    doc_scores_BxK: ArrayLike
    context_input_ids_BxKxS: ArrayLike
    context_attention_mask_BxKxS: ArrayLike
    labels_BxT: ArrayLike


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Seq2SeqBatch(_RightPadded):
    input_ids_BxS: ArrayLike
    attention_mask_BxS: ArrayLike
    labels_BxT: ArrayLike


RagBatch = DenseRagBatch | DocTokensRagBatch | QuestionsRagBatch | FixedScoreRagBatch
Batch = DenseRagBatch | DocTokensRagBatch | QuestionsRagBatch | FixedScoreRagBatch | Seq2SeqBatch
