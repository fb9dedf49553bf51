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

For transformers' own retrieval, RAG exports also hold the passages as a ``datasets`` dataset
(``hf_passages/``: title, text and the exported embeddings, one row per corpus row) and an exact FAISS
inner-product index of those embeddings (``hf_index.faiss``), so that
``RagRetriever.from_pretrained(out, index_name="custom", passages_path=out + "/hf_passages",
index_path=out + "/hf_index.faiss")`` retrieves what rag_jax's exact search retrieves. ``datasets`` and
``faiss-cpu`` are export-time extras (``pip install 'rag_jax[export]'``); without them the export says
so and leaves these two out.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile

import ml_collections
import numpy as np
from tqdm import tqdm

from rag_jax.config import dense_rag
from rag_jax.hf.encoder import save_encoder_hf
from rag_jax.hf.generator import save_generator_hf
from rag_jax.hf.rag import save_rag_hf
from rag_jax.retrieval import PassageStore, embed_passages, index_kind, load_embeddings, write_scaled_embeddings
from rag_jax.retrieval.generations import save_index
from rag_jax.training import components, evaluate

HF_PASSAGES = "hf_passages"
HF_INDEX = "hf_index.faiss"
_ROWS_PER_CHUNK = 65_536


def export_run(cfg: ml_collections.ConfigDict, out: str, *, step: int | None = None, link_corpus: bool = False,
               progress: bool = True) -> tuple[int, list[str]]:  # fmt: skip
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
    scale = model.score_scale if dense_rag(cfg) else 1.0  # BM25 scores keep their own scale
    if scale != 1.0:
        notes.append(
            f"the run scores documents with {scale:g} * q . d, transformers' RAG with q . d: {out}/embeddings holds the "
            f"passage embeddings times {scale:g}, so its doc scores are the run's; the question encoder, the passages "
            "and the index are unchanged (the index ranks the same documents; the scores its own search returns are "
            "unscaled)"
        )  # fmt: skip
    if model.doc_encoder is None:
        place_corpus(cfg, out, link=link_corpus, score_scale=scale)
    else:  # the run trained its document encoder: the corpus as that encoder embeds it
        place_corpus(cfg, out, link=link_corpus, names=("passages",))
        notes.append(export_doc_encoder(cfg, model, out, score_scale=scale, progress=progress))
    if dense_rag(cfg):
        notes.append(write_transformers_retrieval(out, progress=progress))
    return step, notes


def write_transformers_retrieval(out: str, *, progress: bool = True) -> str:
    """``out/hf_passages`` and ``out/hf_index.faiss`` from the exported passages and embeddings (see
    the module docstring); returns the note for the user: how to load them, or why they are missing."""
    try:
        import datasets
        import faiss
        import pyarrow as pa
    except ImportError as e:
        return (f"no transformers-retrievable copy of the passages ({e.name} is not installed): "
                "pip install 'rag_jax[export]' (datasets, faiss-cpu) and export again")  # fmt: skip
    (passages_file,) = [name for name in os.listdir(out) if name.startswith("passages.")]
    embeddings = load_embeddings(os.path.join(out, "embeddings"))
    dim = embeddings.shape[1]
    index = faiss.IndexFlatIP(dim)
    schema = datasets.Features({"title": datasets.Value("string"), "text": datasets.Value("string"),
                                "embeddings": datasets.Sequence(datasets.Value("float32"), length=dim)}).arrow_schema  # fmt: skip
    with PassageStore.open(os.path.join(out, passages_file)) as store, tempfile.TemporaryDirectory() as tmp:
        if len(store) != len(embeddings):
            raise ValueError(f"{len(store)} passages but {len(embeddings)} embeddings in {out}")
        arrow_file = os.path.join(tmp, "passages.arrow")  # written chunk by chunk: the corpus need not fit in memory
        with pa.OSFile(arrow_file, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for start in tqdm(range(0, len(store), _ROWS_PER_CHUNK), desc="transformers index", unit="chunk",
                              disable=not progress):  # fmt: skip
                stop = min(start + _ROWS_PER_CHUNK, len(store))
                vectors_NxD = np.ascontiguousarray(embeddings[start:stop], np.float32)
                index.add(vectors_NxD)
                passages = store.slice(start, stop)
                writer.write_batch(pa.RecordBatch.from_arrays([
                    pa.array([p.title for p in passages], pa.string()), pa.array([p.text for p in passages], pa.string()),
                    pa.FixedSizeListArray.from_arrays(pa.array(vectors_NxD.reshape(-1)), dim),
                ], schema=schema))  # fmt: skip
        datasets.Dataset.from_file(arrow_file).save_to_disk(os.path.join(out, HF_PASSAGES))
    faiss.write_index(index, os.path.join(out, HF_INDEX))
    return (f"transformers' retrieval: RagRetriever.from_pretrained({out!r}, index_name='custom', "
            f"passages_path={os.path.join(out, HF_PASSAGES)!r}, index_path={os.path.join(out, HF_INDEX)!r})")


def export_doc_encoder(cfg: ml_collections.ConfigDict, model, out: str, *, score_scale: float, progress: bool) -> str:
    """A trained document encoder's export: ``out/doc_encoder`` (a ``DPRContextEncoder`` folder for a
    [CLS]-pooled BERT, else the encoder's own layout) with its tokenizer, and the corpus re-embedded with
    it into ``out/embeddings`` (times ``score_scale``, as ``place_corpus`` folds it) and indexed like
    ``corpus.index`` into ``out/index``. Returns the note for the user."""
    doc_encoder = model.doc_encoder
    if doc_encoder.kind == "bert" and doc_encoder.pooling == "cls":
        doc_encoder = dataclasses.replace(doc_encoder, kind="dpr_context")
    folder = os.path.join(out, "doc_encoder")
    save_encoder_hf(doc_encoder, folder)
    inputs = components.doc_inputs(cfg)
    inputs.tokenizer.save_pretrained(folder)
    embeddings_dir = os.path.join(out, "embeddings")
    shutil.rmtree(embeddings_dir, ignore_errors=True)
    encode = model.doc_encoder.encode

    def scaled_encode(ids_BxP, mask_BxP):
        return score_scale * encode(ids_BxP, mask_BxP)

    with PassageStore.open(cfg.corpus.passages) as store:
        embed_passages(store, scaled_encode, inputs.tokenize, embeddings_dir, batch_size=cfg.train.reindex_batch_size,
                       shard_size=1 << 16, input_mode=inputs.input_mode, encoder_name=folder, progress=progress)  # fmt: skip
        save_index(load_embeddings(embeddings_dir, store=store), index_kind(cfg.corpus.index), os.path.join(out, "index"))
    return (f"the run trained its document encoder: {folder} ({doc_encoder.kind}); {out}/embeddings and {out}/index are "
            "the corpus as it embeds it" + (f" (times the score scale {score_scale:g})" if score_scale != 1.0 else ""))


def place_corpus(cfg: ml_collections.ConfigDict, out: str, *, link: bool, score_scale: float = 1.0,
                 names: tuple[str, ...] = ("passages", "embeddings", "index")) -> None:  # fmt: skip
    """The passages, embeddings and index of ``cfg.corpus`` (those of ``names``) next to an exported
    model; with a ``score_scale`` other than 1 the embeddings are written scaled (``write_scaled_embeddings``)."""
    for name, src in (("passages", cfg.corpus.passages), ("embeddings", cfg.corpus.embeddings),
                      ("index", cfg.corpus.index)):  # fmt: skip
        if not src or name not in names:  # a BM25 run has no embeddings or index
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
