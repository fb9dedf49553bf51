"""transformers RAG folders in and out, and ``save_hf`` for every rag_jax model object.

A RAG folder (``RagTokenForGeneration`` / ``RagSequenceForGeneration.save_pretrained``) holds one
``config.json`` with the question encoder's and the generator's configs nested in it, and one state
dict whose keys start with ``rag.question_encoder.`` or ``rag.generator.``.

transformers' RAG scores documents with ``q . d``: a folder has no retrieval score scale, so a loaded
model's ``score_scale`` is 1 and a saved model's is not written; a model with another scale keeps its
doc scores in transformers only with its passage embeddings multiplied by it (``rag-jax export`` writes
them so: ``rag_jax.training.export``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Union

import jax
import numpy as np

from rag_jax.hf import encoder as encoder_lib
from rag_jax.hf import generator as generator_lib
from rag_jax.hf.bart import bart_from_hf, bart_state_to_hf
from rag_jax.hf.bert import bert_params_from_hf, bert_params_to_hf
from rag_jax.hf.io import CheckpointKeyError, model_folder, read_config, read_state_dict, write_config, write_state_dict
from rag_jax.models.configs import BartConfig, BertConfig, RagConfig
from rag_jax.models.encoder import Encoder
from rag_jax.models.generator import Generator
from rag_jax.rag.model import ARCHITECTURES, RagModel

log = logging.getLogger(__name__)

QUESTION_ENCODER_PREFIX = "rag.question_encoder."
GENERATOR_PREFIX = "rag.generator."
# question encoder architecture in a RAG config -> our Encoder kind
QUESTION_ENCODER_KINDS = {"DPRQuestionEncoder": "dpr_question", "DPRContextEncoder": "dpr_context", "BertModel": "bert"}


def _question_encoder_kind(qe_config: dict, where: str) -> str:
    architectures = qe_config.get("architectures") or ["DPRQuestionEncoder"]
    kind = QUESTION_ENCODER_KINDS.get(architectures[0])
    if kind is None:
        raise ValueError(
            f"{where}: question encoder architecture {architectures[0]!r} is not supported "
            f"(supported: {sorted(QUESTION_ENCODER_KINDS)})"
        )
    return kind


def load_rag(path: str | os.PathLike) -> RagModel:
    """A ``RagModel`` from a transformers RAG folder (question encoder + generator), strictly:
    every key must belong to the question encoder or the generator and every expected key be
    present. A hub id is downloaded where the network allows."""
    folder = model_folder(path)
    hf_config = read_config(folder)
    if hf_config.get("model_type") != "rag":
        raise ValueError(f"{folder}: config.json has model_type {hf_config.get('model_type')!r}, expected 'rag'")
    for part in ("question_encoder", "generator"):
        if not isinstance(hf_config.get(part), dict):
            raise ValueError(f"{folder}: config.json has no nested {part!r} config")
    state = read_state_dict(folder)
    outside = sorted(k for k in state if not k.startswith((QUESTION_ENCODER_PREFIX, GENERATOR_PREFIX)))
    if outside:
        raise CheckpointKeyError(f"{folder}: unexpected keys outside the question encoder and generator: {outside[:20]}")

    qe_config = hf_config["question_encoder"]
    kind = _question_encoder_kind(qe_config, folder)
    bert_cfg = BertConfig.from_hf(qe_config)
    qe_prefix = QUESTION_ENCODER_PREFIX + encoder_lib.KINDS[kind][1]
    qe_state = {k: v for k, v in state.items() if k.startswith(QUESTION_ENCODER_PREFIX)}
    pooler = kind == "bert" and f"{qe_prefix}pooler.dense.weight" in qe_state
    params = bert_params_from_hf(qe_state, bert_cfg, qe_prefix, pooler=pooler, where=folder)
    question_encoder = Encoder(
        params=jax.device_put(params),
        config=bert_cfg,
        pooling=encoder_lib.KINDS[kind][2],
        kind=kind,
        hf_config=qe_config,
    )

    gen_config = hf_config["generator"]
    bart_cfg = BartConfig.from_hf(gen_config)
    gen_state = {k: v for k, v in state.items() if k.startswith(GENERATOR_PREFIX)}
    generator = Generator(model=bart_from_hf(gen_state, bart_cfg, GENERATOR_PREFIX), config=bart_cfg, hf_config=gen_config)

    architecture = (hf_config.get("architectures") or [ARCHITECTURES["token"]])[0]
    variant = "sequence" if architecture == ARCHITECTURES["sequence"] else "token"
    return RagModel(
        question_encoder=question_encoder,
        generator=generator,
        config=RagConfig.from_hf(hf_config),
        variant=variant,
        hf_config={k: v for k, v in hf_config.items() if k not in ("question_encoder", "generator")},
    )


def exported_question_encoder(model: RagModel) -> Encoder:
    """The question encoder as a RAG export holds it: a plain BERT pooled by [CLS] becomes a
    ``DPRQuestionEncoder`` (no projection: its output is the [CLS] vector, the same numbers), because
    transformers' RAG retrieves with the question encoder's first output (a ``BertModel``'s would be
    its hidden states); other kinds as they are."""
    qe = model.question_encoder
    return dataclasses.replace(qe, kind="dpr_question") if qe.kind == "bert" else qe


def rag_hf_config_dict(model: RagModel, variant: str | None = None) -> dict:
    """The RAG ``config.json``: source fields, our RAG settings, and both nested configs."""
    config = dict(model.hf_config or {})
    config.update(model.config.to_hf_dict())
    config.update(
        model_type="rag",
        architectures=[ARCHITECTURES[variant or model.variant]],
        is_encoder_decoder=True,
        question_encoder=encoder_lib.hf_config_dict(exported_question_encoder(model)),
        generator=generator_lib.hf_config_dict(model.generator),
    )
    return config


def rag_state_dict(model: RagModel) -> dict[str, np.ndarray]:
    qe = exported_question_encoder(model)  # DPR checkpoints hold no pooler
    params = {k: v for k, v in qe.params.items() if k != "pooler"}
    state = bert_params_to_hf(params, qe.config, QUESTION_ENCODER_PREFIX + encoder_lib.KINDS[qe.kind][1])
    state.update(bart_state_to_hf(model.generator.model, GENERATOR_PREFIX))
    return state


def save_rag_hf(model: RagModel, path: str | os.PathLike, variant: str | None = None) -> None:
    """Write a folder that ``RagTokenForGeneration`` / ``RagSequenceForGeneration.from_pretrained``
    (by ``variant``, default the model's) loads with no missing or unexpected keys."""
    folder = os.fspath(path)
    write_state_dict(rag_state_dict(model), folder)
    write_config(rag_hf_config_dict(model, variant), folder)


def save_hf(obj: Union[Encoder, Generator, RagModel], path: str | os.PathLike) -> None:
    """Export an ``Encoder``, ``Generator`` or ``RagModel`` as a transformers folder."""
    if isinstance(obj, RagModel):
        if obj.score_scale != 1.0:
            log.warning("the model scores documents with %g * q . d; transformers' RAG scores them with q . d: "
                        "use passage embeddings multiplied by %g with this folder (rag-jax export writes them)",
                        obj.score_scale, obj.score_scale)  # fmt: skip
        save_rag_hf(obj, path)
    elif isinstance(obj, Encoder):
        encoder_lib.save_encoder_hf(obj, path)
    elif isinstance(obj, Generator):
        generator_lib.save_generator_hf(obj, path)
    else:
        raise TypeError(f"save_hf: expected an Encoder, Generator or RagModel, got {type(obj).__name__}")
