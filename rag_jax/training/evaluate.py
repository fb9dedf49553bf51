"""Evaluation: generate answers for QA examples (with retrieval, or closed-book) and score them; load
a run's trained model from its checkpoint."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
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
             fmt: str = "jsonl", progress: bool = True, doc_inputs=None, mesh=None) -> tuple[dict, list[dict]]:  # fmt: skip
    """Generate answers for ``examples`` (``cfg.eval``: k, beams, decoding, batch size) and score them
    (``task_metrics``; with retrieval also ``recall_at_k``: the fraction of questions with a gold
    answer in a retrieved passage). Every batch is padded to the batch size so one compiled program
    serves them all. Returns (metrics, per-example records, in example order).

    With ``mesh`` (the mesh the model's parameters are sharded over: a run's), evaluation scales with the
    run: each global batch (``eval.batch_size`` rounded up to fill the mesh's batch axes) is split over the
    processes, each retrieves for its share, and one program decodes the whole batch on every device of
    the mesh; the records are gathered from all processes, so every process returns the same metrics
    and records (all must call this together). Without it, one process decodes everything on its own.

    With ``doc_inputs`` (``components.DocInputs``) and a model whose document encoder was trained, the
    documents are scored as training scored them: the index proposes ``rerank_candidates(cfg)``, the
    model's encoders score them (``rescored_by_doc_encoder``) and the best ``eval.k`` are kept."""
    e = cfg.eval
    if e.max_examples:
        examples = examples[: e.max_examples]
    processes, me = (jax.process_count(), jax.process_index()) if mesh is not None else (1, 0)
    batch_size = e.batch_size
    if mesh is not None:
        ways = math.lcm(mesh.shape["data"] * mesh.shape["fsdp"], processes)
        batch_size = -(-batch_size // ways) * ways
    share = batch_size // processes
    searcher = _with_host_encoders(model) if processes > 1 else model  # retrieval is per process, on the host
    records = []
    for start in tqdm(range(0, len(examples), batch_size), desc="eval", disable=not progress, leave=False):
        chunk = examples[start : start + batch_size]
        n = len(chunk)
        mine = (chunk + [chunk[-1]] * (batch_size - n))[me * share : (me + 1) * share]
        passages = None
        if retriever is None:
            b = closed_book_batch(cfg, generator_tokenizer, mine)
            ids, mask = _placed((b.input_ids_BxS, b.attention_mask_BxS), mesh)
            out = generate_seq2seq(model.generator, ids, mask, num_beams=e.num_beams, max_length=e.max_length)
        else:
            rescore = doc_inputs is not None and model.doc_encoder is not None
            r = retriever.retrieve([ex.question for ex in mine], k=rerank_candidates(cfg) if rescore else e.k,
                                   query_encoder_params=searcher.question_encoder.params,
                                   score_scale=model.score_scale)  # fmt: skip
            if rescore:
                r = rescored_by_doc_encoder(r, searcher, doc_inputs, e.k)
            B, K, S = r.context_input_ids_BxKxS.shape
            ids, mask, scores = _placed((r.context_input_ids_BxKxS.reshape(B * K, S),
                                         r.context_attention_mask_BxKxS.reshape(B * K, S), r.doc_scores_BxK), mesh)  # fmt: skip
            out = model.generate(ids, mask, scores, n_docs=K, decoding=e.decoding, num_beams=e.num_beams,
                                 max_length=e.max_length)  # fmt: skip
            passages, doc_ids_BxK, doc_scores_BxK = r.passages, np.asarray(r.doc_ids_BxK), np.asarray(r.doc_scores_BxK)
        texts = generator_tokenizer.batch_decode(np.asarray(out)[me * share : (me + 1) * share], skip_special_tokens=True)
        for i, ex in enumerate(mine[: max(0, min(share, n - me * share))]):
            rec = {"question": ex.question, "answers": list(ex.answers), "prediction": texts[i].strip()}
            if passages is not None:
                rec["retrieved"] = [p.title for p in passages[i]]
                rec["retrieved_ids"] = [int(x) for x in doc_ids_BxK[i]]  # corpus rows
                rec["doc_scores"] = [float(x) for x in doc_scores_BxK[i]]  # the scores decoding used
                rec["answer_in_top_k"] = metrics.has_answer([p.text for p in passages[i]], ex.answers,
                                                            match=e.answer_match)  # fmt: skip
            records.append((start + me * share + i, rec))
    records = [rec for _, rec in sorted(_gathered(records) if processes > 1 else records, key=lambda pair: pair[0])]
    result = task_metrics(fmt, [r["prediction"] for r in records], [tuple(r["answers"]) for r in records],
                          e.answer_match)  # fmt: skip
    if retriever is not None:
        result["recall_at_k"] = float(np.mean([r["answer_in_top_k"] for r in records]))
    return result, records


def _placed(arrays, mesh):
    """Host arrays (this process's rows) as rows of a global batch over ``mesh``; as they are without one."""
    return arrays if mesh is None else sharding.shard_batch(arrays, mesh)


def _with_host_encoders(model: RagModel) -> RagModel:
    """``model`` with whole copies of its encoders' parameters on this process (gathered from every
    process), for host-side retrieval of this process's examples alone."""
    def local(encoder):
        return None if encoder is None else dataclasses.replace(encoder, params=sharding.process_local(encoder.params))

    return dataclasses.replace(model, question_encoder=local(model.question_encoder),
                               doc_encoder=local(model.doc_encoder))  # fmt: skip


def _gathered(items: list) -> list:
    """Every process's ``items`` (JSON-serialisable), concatenated in process order on every process."""
    payload = np.frombuffer(json.dumps(items).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([payload.size], np.int64)).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: payload.size] = payload
    everything = multihost_utils.process_allgather(padded)
    return [item for row, size in zip(everything, sizes) for item in json.loads(row[:size].tobytes())]


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
