"""A trained run as transformers folders (``rag-jax export --format hf``).

RAG runs become a ``RagTokenForGeneration`` / ``RagSequenceForGeneration`` folder (question encoder +
generator, ``config.json``, safetensors weights) with ``question_encoder_tokenizer/`` and
``generator_tokenizer/``, plus the run's corpus next to it: ``passages.<ext>``, ``embeddings/`` and
``index/`` (copies, or symlinks). Closed-book runs become a ``BartForConditionalGeneration`` folder
with its tokenizer.

transformers' RAG scores documents with ``q . d`` and has no temperature: a run's retrieval score
scale (``RagModel.score_scale``) other than 1 is folded into the exported passage embeddings
(``embeddings/`` then holds ``scale * d(z)``, written, never linked), so transformers' doc scores
are rag_jax's. The index is the run's: a positive scale ranks the same documents.
"""

from __future__ import annotations

import os
import shutil

import ml_collections

from rag_jax.hf.encoder import save_encoder_hf
from rag_jax.hf.generator import save_generator_hf
from rag_jax.hf.rag import save_rag_hf
from rag_jax.retrieval import write_scaled_embeddings
from rag_jax.training import components, evaluate


def export_run(cfg: ml_collections.ConfigDict, out: str, *, step: int | None = None,
               link_corpus: bool = False) -> tuple[int, list[str]]:  # fmt: skip
    """Export checkpoint ``step`` (default: the latest) of the run ``cfg`` describes into ``out``.
    Returns the step and notes for the user (what transformers cannot express)."""
    model, step = evaluate.load_trained_model(cfg, step)
    question_tokenizer, generator_tokenizer = components.tokenizers(cfg)
    notes = []
    if cfg.rag.variant == "closed_book":
        save_generator_hf(model.generator, out)
        generator_tokenizer.save_pretrained(out)
        return step, notes
    save_rag_hf(model, out)
    question_tokenizer.save_pretrained(os.path.join(out, "question_encoder_tokenizer"))
    generator_tokenizer.save_pretrained(os.path.join(out, "generator_tokenizer"))
    if model.question_encoder.pooling != "cls":
        # transformers' RagModel scores documents with the question encoder's pooled [CLS] output (DPR)
        save_encoder_hf(model.question_encoder, os.path.join(out, "question_encoder"))
        notes.append(
            f"the question encoder pools by {model.question_encoder.pooling!r}, which transformers' RAG question "
            "encoder (DPR: [CLS]) cannot express; the generator, and the loss given doc scores, are exact; the "
            f"question encoder with its pooling is in {out}/question_encoder (sentence-transformers)"
        )
    if cfg.corpus.retriever == "bm25":
        notes.append("the run retrieved with BM25, which transformers' RagRetriever (dense MIPS) cannot express: the "
                     "generator is exact; retrieve with rag_jax (corpus.retriever=bm25) to reproduce the run")  # fmt: skip
    scale = model.score_scale if cfg.corpus.retriever == "dense" else 1.0  # BM25 scores keep their own scale
    if scale != 1.0:
        notes.append(
            f"the run scores documents with {scale:g} * q . d, transformers' RAG with q . d: {out}/embeddings holds the "
            f"passage embeddings times {scale:g}, so its doc scores are the run's; the question encoder, the passages "
            "and the index are unchanged (the index ranks the same documents; the scores its own search returns are "
            "unscaled)"
        )  # fmt: skip
    place_corpus(cfg, out, link=link_corpus, score_scale=scale)
    return step, notes


def place_corpus(cfg: ml_collections.ConfigDict, out: str, *, link: bool, score_scale: float = 1.0) -> None:
    """The passages, embeddings and index of ``cfg.corpus`` next to an exported model; with a
    ``score_scale`` other than 1 the embeddings are written scaled (``write_scaled_embeddings``)."""
    for name, src in (("passages", cfg.corpus.passages), ("embeddings", cfg.corpus.embeddings),
                      ("index", cfg.corpus.index)):  # fmt: skip
        if not src:  # a BM25 run has no embeddings or index
            continue
        dst = os.path.join(out, name if os.path.isdir(src) else name + os.path.splitext(src)[1])
        if os.path.islink(dst) or os.path.isfile(dst):
            os.remove(dst)
        elif os.path.isdir(dst):
            shutil.rmtree(dst)
        if name == "embeddings" and score_scale != 1.0:
            write_scaled_embeddings(src, dst, score_scale)
        elif link:
            os.symlink(os.path.abspath(src), dst)
        elif os.path.isdir(src):
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
