"""A trained run as transformers folders (``rag-jax export --format hf``).

RAG runs become a ``RagTokenForGeneration`` / ``RagSequenceForGeneration`` folder (question encoder +
generator, ``config.json``, safetensors weights) with ``question_encoder_tokenizer/`` and
``generator_tokenizer/``, plus the run's corpus next to it: ``passages.<ext>``, ``embeddings/`` and
``index/`` (copies, or symlinks). Closed-book runs become a ``BartForConditionalGeneration`` folder
with its tokenizer.
"""

from __future__ import annotations

import os
import shutil

import ml_collections

from rag_jax.hf.encoder import save_encoder_hf
from rag_jax.hf.generator import save_generator_hf
from rag_jax.hf.rag import save_rag_hf
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
    place_corpus(cfg, out, link=link_corpus)
    return step, notes


def place_corpus(cfg: ml_collections.ConfigDict, out: str, *, link: bool) -> None:
    """The passages, embeddings and index of ``cfg.corpus`` next to an exported model."""
    for name, src in (("passages", cfg.corpus.passages), ("embeddings", cfg.corpus.embeddings),
                      ("index", cfg.corpus.index)):  # fmt: skip
        if not src:  # a BM25 run has no embeddings or index
            continue
        dst = os.path.join(out, name if os.path.isdir(src) else name + os.path.splitext(src)[1])
        if os.path.islink(dst) or os.path.isfile(dst):
            os.remove(dst)
        elif os.path.isdir(dst):
            shutil.rmtree(dst)
        if link:
            os.symlink(os.path.abspath(src), dst)
        elif os.path.isdir(src):
            shutil.copytree(src, dst)
        else:
            shutil.copy2(src, dst)
