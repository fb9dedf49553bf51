"""What a run config names, built: the model, its tokenizers, the retriever over the corpus, the
train-step settings and the QA splits."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from rag_jax.config import dense_rag, resolve
from rag_jax.data import qa as data
from rag_jax.errors import ConfigError, named_by
from rag_jax.hf.encoder import load_encoder
from rag_jax.hf.generator import load_generator
from rag_jax.hf.rag import load_rag
from rag_jax.models.encoder import Encoder
from rag_jax.rag.model import RagModel, automatic_score_scale
from rag_jax.retrieval import (
    BM25Index,
    ExactIndex,
    Passage,
    PassageStore,
    Retriever,
    device,
    hf_tokenize_fn,
    load_embeddings,
    load_index,
    passage_inputs,
    read_manifest,
)

log = logging.getLogger(__name__)


def build_model(cfg: ml_collections.ConfigDict) -> RagModel:
    """From a transformers RAG folder, or a question encoder folder + a generator folder, with the
    config's retrieval score scale (``score_scale``) and, when the document encoder is trained (not
    shared), the document encoder (``doc_encoder_folder``)."""
    m = _model_config(cfg)
    variant = "token" if cfg.rag.variant == "closed_book" else cfg.rag.variant
    if m.rag:
        model = dataclasses.replace(load_rag(m.rag), variant=variant)
    else:
        model = RagModel(load_encoder(m.question_encoder), load_generator(m.generator), resolve(cfg).rag, variant)
    doc_encoder = None
    if cfg.train.doc_encoder == "trained" and not m.share_encoders:
        with named_by("config.model.doc_encoder"):
            doc_encoder = load_encoder(doc_encoder_folder(cfg))
    return dataclasses.replace(model, score_scale=score_scale(cfg, model.question_encoder), doc_encoder=doc_encoder)


def doc_encoder_folder(cfg: ml_collections.ConfigDict) -> str:
    """``model.doc_encoder``, else the encoder folder that embedded ``corpus.embeddings`` (recorded by
    the embedding job)."""
    if cfg.model.doc_encoder:
        return cfg.model.doc_encoder
    recorded = read_manifest(cfg.corpus.embeddings).get("encoder_name", "") if cfg.corpus.embeddings else ""
    if not recorded:
        raise ConfigError("is empty and the corpus embeddings do not record their encoder: name the document "
                          "encoder's folder", what="config.model.doc_encoder")  # fmt: skip
    return recorded


def _question_tokenizer_folder(cfg: ml_collections.ConfigDict) -> str:
    m = _model_config(cfg)
    return os.path.join(m.rag, "question_encoder_tokenizer") if m.rag else m.question_encoder


@dataclasses.dataclass(frozen=True)
class DocInputs:
    """How the document encoder reads passages: its ``tokenizer`` at ``model.doc_max_length`` tokens
    (``tokenize``: ``(first, second) -> (ids, mask)``, ``rag_jax.retrieval.embed``'s ``TokenizeFn``) and
    the embedding job's input mode (``pair``: title and text, as DPR)."""

    tokenizer: Any
    tokenize: Callable
    input_mode: str

    def __call__(self, passages: Sequence[Passage]) -> tuple[np.ndarray, np.ndarray]:
        return self.tokenize(*passage_inputs(passages, self.input_mode))

    def of_retrieved(self, passages_BxK: Sequence[Sequence[Passage]]) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, mask) [B, K, P]`` of the retrieved passages (``RetrievedBatch.passages``), tokenized as one batch."""
        b, k = len(passages_BxK), len(passages_BxK[0])
        ids_NxP, mask_NxP = self([p for passages in passages_BxK for p in passages])
        return ids_NxP.reshape(b, k, -1), mask_NxP.reshape(b, k, -1)


def doc_inputs(cfg: ml_collections.ConfigDict) -> DocInputs:
    """The document encoder's ``DocInputs``: its folder's tokenizer, the corpus embeddings' input mode. A
    new tokenizer per call (transformers' fast tokenizers are not thread-safe)."""
    from transformers import AutoTokenizer

    folder = _question_tokenizer_folder(cfg) if cfg.model.share_encoders else doc_encoder_folder(cfg)
    mode = read_manifest(cfg.corpus.embeddings).get("input_mode", "pair") if cfg.corpus.embeddings else "pair"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return DocInputs(tokenizer, hf_tokenize_fn(tokenizer, cfg.model.doc_max_length), mode)


def score_scale(cfg: ml_collections.ConfigDict, question_encoder: Encoder) -> float:
    """``rag.score_scale``; when None, ``automatic_score_scale`` of the question encoder, announced
    (once per process) when it is not 1 and the run scores documents densely."""
    setting = resolve(cfg).score_scale
    if setting is not None:
        return float(setting)
    scale = automatic_score_scale(question_encoder)
    if scale != 1.0 and dense_rag(cfg):
        _announce_automatic_scale(question_encoder.pooling, scale)
    return scale


@functools.cache
def _announce_automatic_scale(pooling: str, scale: float) -> None:
    log.warning(
        "the question encoder L2-normalises its vectors (pooling %r): retrieval scores q . d are cosines, so "
        "doc_scores = %g * q . d (1/%g, Contriever's temperature) to let p(z|x) concentrate; choose another with "
        "rag.score_scale, or learn it with rag.learn_score_scale=True", pooling, scale, 1 / scale,
    )  # fmt: skip


def _model_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    m = cfg.model
    if not (m.rag or (m.question_encoder and m.generator)):
        raise ConfigError("set `rag` (a RAG folder) or both `question_encoder` and `generator`", what="config.model")
    return m


def tokenizers(cfg: ml_collections.ConfigDict):
    """(question tokenizer, generator tokenizer) from the model folders."""
    from transformers import AutoTokenizer

    m = _model_config(cfg)
    generator_folder = os.path.join(m.rag, "generator_tokenizer") if m.rag else m.generator
    return AutoTokenizer.from_pretrained(_question_tokenizer_folder(cfg)), AutoTokenizer.from_pretrained(generator_folder)


def build_retriever(cfg, model: RagModel, question_tokenizer, generator_tokenizer, *, k: int, mesh=None):
    """The run's ``Retriever``. With ``corpus.retriever=device`` its index is an ``ExactIndex`` over the
    embeddings on ``mesh`` (default: all devices; the training mesh, for ``device_corpus``)."""
    c = cfg.corpus
    fields = {"bm25": ("passages",), "device": ("passages", "embeddings")}.get(c.retriever,
                                                                            ("passages", "embeddings", "index"))  # fmt: skip
    for field in fields:
        if not c[field]:
            raise ConfigError(
                "is empty: RAG needs a passage file, its embeddings (`rag-jax embed`) and an index "
                "(`rag-jax build-index`; not for corpus.retriever=device)", what=f"config.corpus.{field}",
            )  # fmt: skip
    with named_by("config.corpus.passages"):
        store = PassageStore.open(c.passages)
    if c.retriever == "bm25":
        index, embeddings = BM25Index.build(store.get_many(np.arange(len(store)))), None
    else:
        with named_by("config.corpus.embeddings"):
            embeddings = load_embeddings(c.embeddings, store=store)
        if c.retriever == "device":  # the embeddings on the devices, searched exactly
            index = ExactIndex.build(embeddings, dtype=c.device_dtype, mesh=mesh)
        else:  # a multi-host run splits a sharded index over its processes (each holds its shards only)
            index = load_index(c.index, processes=(jax.process_index(), jax.process_count()) if jax.process_count() > 1 else None)
    return Retriever(
        question_encoder=model.question_encoder,
        question_tokenizer=question_tokenizer,
        generator_tokenizer=generator_tokenizer,
        store=store,
        index=index,
        embeddings=embeddings,
        k=k,
        max_question_length=cfg.data.max_question_length,
        max_combined_length=cfg.rag.max_combined_length,
        prefix=cfg.rag.prefix or None,
    )


def device_corpus(cfg, retriever: Retriever, *, progress: bool = True) -> device.DeviceCorpus:
    """The corpus for retrieval inside the step (``corpus.retriever=device``): ``retriever``'s index (an
    ``ExactIndex`` on the training mesh, ``build_retriever(mesh=)``) and its passages, pre-tokenized."""
    rows = device.PassageTokens(retriever.store, retriever.generator_tokenizer, retriever.context_format,
                                progress=progress)  # fmt: skip
    template = device.ContextTemplate.of(retriever.generator_tokenizer, cfg.rag.max_combined_length)
    return device.DeviceCorpus.of_index(retriever.index, rows, template)


def read_split(cfg: ml_collections.ConfigDict, split: str, generator_tokenizer=None) -> list[data.QAExample]:
    path = cfg.data[split]
    if not path:
        raise ConfigError("is empty", what=f"config.data.{split}")
    with named_by(f"config.data.{split}"):
        examples = data.read_qa(
            path,
            format=cfg.data.format or None,
            strict=cfg.data.strict,
            target_length=_target_length_fn(generator_tokenizer) if generator_tokenizer is not None else None,
            max_target_length=cfg.data.max_target_length,
        ).examples
    return with_labels(examples, cfg.data.labels, f"{path} (config.data.{split})")


def with_labels(examples: list[data.QAExample], labels: str, where: str) -> list[data.QAExample]:
    """The examples whose answer is one of the comma-separated ``labels`` (``config.data.labels``;
    "": all of them), e.g. FEVER-2 from a 3-way FEVER file."""
    if not labels:
        return examples
    keep = {label.strip() for label in labels.split(",") if label.strip()}
    kept = [ex for ex in examples if set(ex.answers) & keep]
    if not kept:
        raise ConfigError(f"no example of {where} has one of the labels {sorted(keep)}", what="config.data.labels")
    log.info("%s: kept %d of %d examples (labels %s)", where, len(kept), len(examples), ", ".join(sorted(keep)))
    return kept


def split_format(cfg: ml_collections.ConfigDict, split: str) -> str:
    """The data format of ``config.data.<split>`` (``config.data.format``, else by the file), which decides
    the split's metrics (``evaluate.task_metrics``); "" when the split has no file."""
    path = cfg.data[split]
    return data.detect_format(path, cfg.data.format or None) if path else ""


def _target_length_fn(tokenizer):
    return lambda text: len(tokenizer(text)["input_ids"])
