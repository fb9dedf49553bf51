"""Step batches from QA examples: closed-book (the question alone) and RAG (retrieved contexts; with a
trained document encoder, the retrieved passages' tokens for it) and RAG retrieving inside the step
(the questions alone)."""

from __future__ import annotations

import numpy as np

from rag_jax.data import qa as data
from rag_jax.rag.batches import DocTokensRagBatch, QuestionsRagBatch, RagBatch, Seq2SeqBatch
from rag_jax.retrieval import device


def label_ids(generator_tokenizer, examples: list[data.QAExample], max_length: int) -> np.ndarray:
    """``[B, T]`` generator labels: the first gold answer, tokenised (BOS ... EOS), padded."""
    tok = generator_tokenizer([ex.answers[0] for ex in examples], padding="max_length", truncation=True,
                              max_length=max_length, return_tensors="np")  # fmt: skip
    return tok["input_ids"]


def closed_book_batch(cfg, generator_tokenizer, examples: list[data.QAExample]) -> Seq2SeqBatch:
    q = generator_tokenizer([ex.question for ex in examples], padding="max_length", truncation=True,
                            max_length=cfg.data.max_source_length, return_tensors="np")  # fmt: skip
    return Seq2SeqBatch(input_ids_BxS=q["input_ids"], attention_mask_BxS=q["attention_mask"],
                        labels_BxT=label_ids(generator_tokenizer, examples, cfg.data.max_target_length))  # fmt: skip


def rag_batch(cfg, retriever, generator_tokenizer, examples: list[data.QAExample], encoder_params, *,
              doc_inputs=None, k: int | None = None) -> tuple[RagBatch, int]:  # fmt: skip
    """The step's batch for ``examples`` (``k`` documents each, default the retriever's) and the number
    of distinct passages retrieved for them (of B x K; a retrieval-collapse diagnostic). With
    ``doc_inputs`` (``components.DocInputs``: a trained document encoder) a ``DocTokensRagBatch``."""
    retrieved = retriever.retrieve([ex.question for ex in examples], k=k, query_encoder_params=encoder_params)
    labels_BxT = label_ids(generator_tokenizer, examples, cfg.data.max_target_length)
    distinct = len(np.unique(retrieved.doc_ids_BxK))
    if doc_inputs is None:
        return retriever.train_batch(retrieved, labels_BxT), distinct
    doc_ids_BxKxP, doc_mask_BxKxP = doc_inputs.of_retrieved(retrieved.passages)
    return DocTokensRagBatch(
        question_input_ids_BxQ=retrieved.question_input_ids_BxSq,
        question_attention_mask_BxQ=retrieved.question_attention_mask_BxSq,
        doc_input_ids_BxKxP=doc_ids_BxKxP, doc_attention_mask_BxKxP=doc_mask_BxKxP,
        context_input_ids_BxKxS=retrieved.context_input_ids_BxKxS,
        context_attention_mask_BxKxS=retrieved.context_attention_mask_BxKxS, labels_BxT=labels_BxT.astype(np.int32),
    ), distinct  # fmt: skip


def questions_batch(cfg, retriever, generator_tokenizer, examples: list[data.QAExample]) -> QuestionsRagBatch:
    """The step's batch when it retrieves on the devices (``corpus.retriever=device``): the questions as
    ``retriever`` tokenizes them, the generator tokens of their part of the contexts, the labels."""
    ids_BxQ, mask_BxQ = retriever.tokenize_questions([ex.question for ex in examples])
    part_ids_BxM, part_lengths_B = device.question_tokens(generator_tokenizer, retriever.question_strings(ids_BxQ),
                                                          retriever.context_format)  # fmt: skip
    labels_BxT = label_ids(generator_tokenizer, examples, cfg.data.max_target_length).astype(np.int32)
    return QuestionsRagBatch(question_input_ids_BxQ=ids_BxQ, question_attention_mask_BxQ=mask_BxQ,
                             question_part_ids_BxM=part_ids_BxM, question_part_lengths_B=part_lengths_B,
                             labels_BxT=labels_BxT)  # fmt: skip
