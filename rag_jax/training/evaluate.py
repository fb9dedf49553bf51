"""Evaluation: generate answers for QA examples (with retrieval, or closed-book) and score them; load
a run's trained model from its checkpoint."""

from __future__ import annotations

import os

import ml_collections
import numpy as np
from tqdm import tqdm

from rag_jax.config import resolve
from rag_jax.data import qa as data
from rag_jax.rag.decoding import generate_seq2seq
from rag_jax.rag.model import RagModel, doc_scores_from_embeddings
from rag_jax.retrieval import RetrievedBatch
from rag_jax.training import checkpointing, metrics, sharding
from rag_jax.training.batches import closed_book_batch
from rag_jax.training.components import build_model
from rag_jax.training.step import Trainer


def task_metrics(fmt: str, predictions: list[str], answers: list[tuple[str, ...]], match: str = "string") -> dict:
    """EM and F1 for every task (EM alone when ``match="regex"``: the answers are patterns, as
    CuratedTrec's); BLEU-1, ROUGE-L and Q-BLEU-1 (for generated questions, Jeopardy) for generation
    targets; label accuracy for FEVER."""
    result = metrics.qa_metrics(predictions, answers, match=match)
    if fmt == "generation":
        result.update(bleu1=metrics.bleu1(predictions, answers), rouge_l=metrics.rouge_l(predictions, answers),
                      q_bleu1=metrics.q_bleu1(predictions, answers))  # fmt: skip
    if fmt == "fever":
        result["label_accuracy"] = metrics.label_accuracy(predictions, answers)
    return result


def evaluate(cfg, model: RagModel, examples: list[data.QAExample], *, generator_tokenizer, retriever=None,
             fmt: str = "jsonl", progress: bool = True, doc_inputs=None) -> tuple[dict, list[dict]]:  # fmt: skip
    """Generate answers for ``examples`` (``cfg.eval``: k, beams, decoding, batch size) and score them
    (``task_metrics``; with retrieval also ``recall_at_k``: the fraction of questions with a gold
    answer in a retrieved passage). Every batch is padded to ``eval.batch_size`` so one compiled
    program serves them all. Returns (metrics, per-example records).

    With ``doc_inputs`` (``components.DocInputs``) and a model whose document encoder was trained, the
    documents are scored as training scored them: the index proposes ``rerank_candidates(cfg)``, the
    model's encoders score them (``rescored_by_doc_encoder``) and the best ``eval.k`` are kept."""
    e = cfg.eval
    if e.max_examples:
        examples = examples[: e.max_examples]
    records = []
    for start in tqdm(range(0, len(examples), e.batch_size), desc="eval", disable=not progress, leave=False):
        chunk = examples[start : start + e.batch_size]
        n = len(chunk)
        chunk = chunk + [chunk[-1]] * (e.batch_size - n)
        passages = None
        if retriever is None:
            b = closed_book_batch(cfg, generator_tokenizer, chunk)
            out = generate_seq2seq(model.generator, b.input_ids_BxS, b.attention_mask_BxS,
                                   num_beams=e.num_beams, max_length=e.max_length)  # fmt: skip
        else:
            rescore = doc_inputs is not None and model.doc_encoder is not None
            r = retriever.retrieve([ex.question for ex in chunk], k=rerank_candidates(cfg) if rescore else e.k,
                                   query_encoder_params=model.question_encoder.params,
                                   score_scale=model.score_scale)  # fmt: skip
            if rescore:
                r = rescored_by_doc_encoder(r, model, doc_inputs, e.k)
            B, K, S = r.context_input_ids_BxKxS.shape
            out = model.generate(
                r.context_input_ids_BxKxS.reshape(B * K, S), r.context_attention_mask_BxKxS.reshape(B * K, S),
                r.doc_scores_BxK, n_docs=K, decoding=e.decoding, num_beams=e.num_beams, max_length=e.max_length,
            )  # fmt: skip
            passages, doc_ids_BxK, doc_scores_BxK = r.passages, np.asarray(r.doc_ids_BxK), np.asarray(r.doc_scores_BxK)
        texts = generator_tokenizer.batch_decode(np.asarray(out), skip_special_tokens=True)
        for i, ex in enumerate(chunk[:n]):
            rec = {"question": ex.question, "answers": list(ex.answers), "prediction": texts[i].strip()}
            if passages is not None:
                rec["retrieved"] = [p.title for p in passages[i]]
                rec["retrieved_ids"] = [int(x) for x in doc_ids_BxK[i]]  # corpus rows
                rec["doc_scores"] = [float(x) for x in doc_scores_BxK[i]]  # the scores decoding used
                rec["answer_in_top_k"] = metrics.has_answer([p.text for p in passages[i]], ex.answers,
                                                            match=e.answer_match)  # fmt: skip
            records.append(rec)
    result = task_metrics(fmt, [r["prediction"] for r in records], [tuple(r["answers"]) for r in records],
                          e.answer_match)  # fmt: skip
    if retriever is not None:
        result["recall_at_k"] = float(np.mean([r["answer_in_top_k"] for r in records]))
    return result, records


def rerank_candidates(cfg) -> int:
    """How many documents the index proposes per question when a trained document encoder rescores
    them: ``train.rerank_candidates`` with ``index_refresh=rerank``, else ``eval.k``."""
    return max(cfg.train.rerank_candidates, cfg.eval.k) if cfg.train.index_refresh == "rerank" else cfg.eval.k


def rescored_by_doc_encoder(retrieved: RetrievedBatch, model: RagModel, doc_inputs, k: int) -> RetrievedBatch:
    """``retrieved``'s best ``k`` documents by ``score_scale * q(x) . d(z)`` with the model's (trained)
    document encoder ``d`` reading their passages (``doc_inputs``)."""
    ids_BxLxP, mask_BxLxP = doc_inputs.of_retrieved(retrieved.passages)
    b, candidates, p = ids_BxLxP.shape
    d_NxD = model.doc_encoder.encode(ids_BxLxP.reshape(b * candidates, p), mask_BxLxP.reshape(b * candidates, p))
    d_BxLxD = np.asarray(d_NxD).reshape(b, candidates, -1)
    return retrieved.rescored(doc_scores_from_embeddings(retrieved.question_vectors_BxD, d_BxLxD, model.score_scale),
                              k)  # fmt: skip


def checkpoint_target(trainer: Trainer) -> dict:
    """The abstract checkpoint of a run: the train state, the retrieval encoder snapshot and, with
    ``index_refresh=full``, the document-encoder snapshots of the index generations in use and being
    built (``rag_jax.training.reindex``)."""
    abstract = trainer.abstract_state()
    target = {"train": abstract, "retrieval_encoder": abstract.params["query_encoder"]}
    if trainer.cfg.index_refresh == "full":
        doc = trainer.doc_params(abstract.params)
        target["doc_snapshots"] = {"current": doc, "pending": doc}
    return target


def load_trained_model(cfg: ml_collections.ConfigDict, step: int | None = None) -> tuple[RagModel, int]:
    """The model of a run's checkpoint ``step`` (default: the latest readable), read-only."""
    settings = resolve(cfg)
    trainer = Trainer(build_model(cfg), settings.train, sharding.make_mesh(settings.mesh))
    directory = os.path.join(cfg.run_dir, "checkpoints")
    with checkpointing.Checkpointer(directory, save_every=1, keep=1, read_only=True) as ckpt:
        restored = ckpt.restore(checkpoint_target(trainer), step=step)
    if restored is None:
        raise checkpointing.MissingCheckpointError("none saved yet", where=directory)
    tree, _, restored_step = restored
    return trainer.to_model(tree["train"].params), restored_step
