"""Model shapes for planning, without weights: a local folder's ``config.json``, or a built-in
architecture for the hub ids the paper configs name (so planning needs neither the hub nor weights)."""

from __future__ import annotations

import os

import ml_collections

from rag_jax.errors import ConfigError
from rag_jax.hf.io import read_config
from rag_jax.models.configs import BartConfig, BertConfig

_BERT_BASE = BertConfig()  # 12 layers, 768 wide, 30522 tokens: BERT-base and every DPR encoder
_BART_LARGE = BartConfig()  # 12 + 12 layers, 1024 wide, 50265 tokens
_BART_BASE = BartConfig(d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                        decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072)  # fmt: skip

BUILTIN_ENCODERS = {
    "facebook/dpr-question_encoder-multiset-base": _BERT_BASE,
    "facebook/dpr-question_encoder-single-nq-base": _BERT_BASE,
    "facebook/dpr-ctx_encoder-multiset-base": _BERT_BASE,
    "facebook/dpr-ctx_encoder-single-nq-base": _BERT_BASE,
    "bert-base-uncased": _BERT_BASE,
    "google-bert/bert-base-uncased": _BERT_BASE,
}
BUILTIN_GENERATORS = {"facebook/bart-large": _BART_LARGE, "facebook/bart-base": _BART_BASE}
BUILTIN_RAG = {name: (_BERT_BASE, _BART_LARGE) for name in
               ("facebook/rag-token-nq", "facebook/rag-sequence-nq", "facebook/rag-token-base", "facebook/rag-sequence-base")}  # fmt: skip


def _local(name: str) -> dict | None:
    return read_config(name) if os.path.isfile(os.path.join(name, "config.json")) else None


def _one(name: str, builtin: dict, kind, what: str):
    local = _local(name)
    if local is not None:
        return kind.from_hf(local)
    if name in builtin:
        return builtin[name]
    raise ConfigError(f"{name!r} is neither a folder with config.json nor a built-in architecture "
                      f"({', '.join(sorted(builtin))})", what=what)  # fmt: skip


def model_architectures(config: ml_collections.ConfigDict) -> tuple[BertConfig, BartConfig]:
    """(question encoder, generator) shapes of a run config's ``model`` section."""
    m = config.model
    if m.rag:
        local = _local(m.rag)
        if local is not None:
            return BertConfig.from_hf(local["question_encoder"]), BartConfig.from_hf(local["generator"])
        if m.rag in BUILTIN_RAG:
            return BUILTIN_RAG[m.rag]
        raise ConfigError(f"{m.rag!r} is neither a RAG folder nor a built-in architecture", what="config.model.rag")
    if not (m.question_encoder and m.generator):
        raise ConfigError("set `rag` or both `question_encoder` and `generator`", what="config.model")
    encoder = _one(m.question_encoder, BUILTIN_ENCODERS, BertConfig, "config.model.question_encoder")
    return encoder, _one(m.generator, BUILTIN_GENERATORS, BartConfig, "config.model.generator")
