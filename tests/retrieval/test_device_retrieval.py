"""Retrieval inside the step (``corpus.retriever=device``) on 8 simulated devices equals host retrieval:
the same top-k, the same context tokens, the same loss and the same training step."""

import dataclasses
import logging

import jax
import numpy as np
import pytest

from rag_jax.config import MeshConfig, default_config, resolve, with_changes
from rag_jax.models.configs import BartConfig
from rag_jax.rag.batches import QuestionsRagBatch
from rag_jax.rag.model import init_rag_model
from rag_jax.retrieval import ExactIndex, Passage, PassageStore, Retriever, device
from rag_jax.training import sharding
from rag_jax.training.step import Trainer
from tests.retrieval.test_retriever import DIM, MAX_CTX, MAX_Q, PREFIX, QUESTIONS, make_corpus, write_jsonl

K = 4
MESH = MeshConfig(data=2, fsdp=2, model=2)


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh(MESH)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("device")
    store, embeddings = make_corpus(tmp, "d", 3, 37)  # 37 rows: padding on the last devices
    yield store, embeddings
    store.close()


@pytest.fixture(scope="module")
def host_retriever(question_encoder, question_tokenizer, generator_tokenizer, corpus):
    store, embeddings = corpus
    return Retriever(question_encoder, question_tokenizer, generator_tokenizer, store, ExactIndex.build(embeddings),
                     embeddings, k=K, max_question_length=MAX_Q, max_combined_length=MAX_CTX, prefix=PREFIX)  # fmt: skip


def _device_corpus(retriever, embeddings, mesh, **kw):
    rows = device.PassageTokens(retriever.store, retriever.generator_tokenizer, retriever.context_format, progress=False)
    template = device.ContextTemplate.of(retriever.generator_tokenizer, retriever.max_combined_length)
    return device.DeviceCorpus.build(embeddings, rows, mesh, template, **kw)


def _retrieve_on_device(retriever, corpus: device.DeviceCorpus, questions, k=K):
    ids_BxQ, mask_BxQ = retriever.tokenize_questions(questions)
    q_BxD = retriever.encode_questions(ids_BxQ, mask_BxQ)
    part_ids, part_lengths = device.question_tokens(retriever.generator_tokenizer, retriever.question_strings(ids_BxQ),
                                                    retriever.context_format)  # fmt: skip

    @jax.jit
    def run(q_BxD, arrays, part_ids, part_lengths):
        got = device.retrieve(q_BxD, arrays, corpus.layout, k)
        return got, device.join_contexts(got.passage_ids_BxKxL, got.passage_lengths_BxK, part_ids, part_lengths,
                                         corpus.layout.template)  # fmt: skip

    return jax.device_get(run(q_BxD, corpus.arrays, part_ids, part_lengths))


@pytest.mark.parametrize("max_length", [MAX_CTX, 200])
def test_device_top_k_and_contexts_equal_host_retrieval(host_retriever, corpus, mesh, max_length):
    store, embeddings = corpus
    host_retriever = dataclasses.replace(host_retriever, max_combined_length=max_length)
    on_device = _device_corpus(host_retriever, embeddings, mesh)
    assert on_device.arrays.embeddings_NxD.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp", "model"), None)
    questions = QUESTIONS + [f"question {i} about the lazy fox" for i in range(9)]
    got, (ctx_ids, ctx_mask) = _retrieve_on_device(host_retriever, on_device, questions)
    host = host_retriever.retrieve(questions)
    np.testing.assert_array_equal(got.rows_BxK, host.doc_ids_BxK)
    np.testing.assert_array_equal(got.embeddings_BxKxD, host.doc_embeddings_BxKxD)
    np.testing.assert_array_equal(ctx_ids, host.context_input_ids_BxKxS)
    np.testing.assert_array_equal(ctx_mask, host.context_attention_mask_BxKxS)
    full = ctx_mask.all(axis=2)  # cut contexts (the question first) at 40 tokens, padded ones at 200
    assert full.all() if max_length == MAX_CTX else not full.any()
    # the index over the same device arrays searches the same (evaluation's host-side search)
    ids, _ = on_device.index.search(host_retriever.encode_questions(*host_retriever.tokenize_questions(questions)), K)
    np.testing.assert_array_equal(ids, host.doc_ids_BxK)


def test_every_row_can_be_retrieved_with_a_single_device_axis(host_retriever, corpus):
    """k = N: every row, each from the device that holds it (the merge and the gather across devices)."""
    store, embeddings = corpus
    flat = sharding.make_mesh(MeshConfig(data=8, fsdp=1, model=1))
    on_device = _device_corpus(host_retriever, embeddings, flat)
    got, _ = _retrieve_on_device(host_retriever, on_device, QUESTIONS, k=len(store))
    host = host_retriever.retrieve(QUESTIONS, k=len(store))
    np.testing.assert_array_equal(got.rows_BxK, host.doc_ids_BxK)
    assert sorted(got.rows_BxK[0].tolist()) == list(range(len(store)))


def test_passage_ends_in_whitespace(tmp_path, host_retriever, mesh, caplog):
    """One trailing space is what the host's join drops: equal; a trailing tab is reported (it may differ:
    with this byte-level BPE it happens not to, the tab staying a token of its own)."""
    passages = [Passage("1", "Paris", "the capital of france "), Passage("2", "Fox", "the quick brown fox\t"),
                Passage("3", "Dog", "lazy dog")]  # fmt: skip
    write_jsonl(tmp_path / "p.jsonl", passages)
    embeddings = np.random.default_rng(0).standard_normal((3, DIM)).astype(np.float32)
    with PassageStore.open(str(tmp_path / "p.jsonl")) as store:
        retriever = dataclasses.replace(host_retriever, store=store, index=ExactIndex.build(embeddings),
                                        embeddings=embeddings, k=3)  # fmt: skip
        with caplog.at_level(logging.WARNING):
            on_device = _device_corpus(retriever, embeddings, mesh)
        assert "1 of 3 passages end their title / text in whitespace" in caplog.text
        _, (ctx_ids, _) = _retrieve_on_device(retriever, on_device, QUESTIONS[:2], k=3)
        host = retriever.retrieve(QUESTIONS[:2], k=3)
        np.testing.assert_array_equal(ctx_ids, host.context_input_ids_BxKxS)


def _trainer(question_encoder, generator_tokenizer, mesh, layout=None):
    bart = BartConfig(vocab_size=len(generator_tokenizer), d_model=16, encoder_layers=1, decoder_layers=1,
                      encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24,
                      max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)  # fmt: skip
    model = dataclasses.replace(init_rag_model(question_encoder.config, bart, seed=0), question_encoder=question_encoder)
    config = with_changes(default_config(), rag={"k": K}, corpus={"retriever": "device"},
                          train={"learning_rate": 1e-2, "warmup_steps": 0, "epsilon": 0.0, "batch_size": 8})  # fmt: skip
    return Trainer(model, resolve(config).train, mesh, corpus_layout=layout)


def test_device_retrieval_step_equals_host_retrieval_step(host_retriever, corpus, mesh, question_encoder,
                                                          generator_tokenizer):  # fmt: skip
    store, embeddings = corpus
    on_device = _device_corpus(host_retriever, embeddings, mesh)
    trainer = _trainer(question_encoder, generator_tokenizer, mesh, on_device.layout)
    questions = QUESTIONS + [f"who wrote the book {i}" for i in range(5)]  # 8: the batch over data x fsdp
    labels = generator_tokenizer([f"paris {i}" for i in range(8)], padding="max_length", max_length=6,
                                 return_tensors="np")["input_ids"].astype(np.int32)  # fmt: skip
    host = host_retriever.train_batch(host_retriever.retrieve(questions), labels)
    ids, mask = host_retriever.tokenize_questions(questions)
    part_ids, part_lengths = device.question_tokens(generator_tokenizer, host_retriever.question_strings(ids),
                                                    host_retriever.context_format)  # fmt: skip
    on_mesh = QuestionsRagBatch(question_input_ids_BxQ=ids, question_attention_mask_BxQ=mask,
                                question_part_ids_BxM=part_ids, question_part_lengths_B=part_lengths, labels_BxT=labels)

    state = trainer.init_state()
    with sharding.use_mesh(mesh):
        dense, rows = jax.jit(trainer.retrieved_on_device)(state.params, on_mesh, on_device.arrays)
    np.testing.assert_array_equal(np.asarray(rows), host_retriever.retrieve(questions).doc_ids_BxK)
    for name in ("context_input_ids_BxKxS", "context_attention_mask_BxKxS", "doc_embeddings_BxKxD"):
        np.testing.assert_array_equal(np.asarray(getattr(dense, name)), getattr(host, name), err_msg=name)
    host_loss = np.asarray(jax.jit(trainer.eval_loss)(state.params, host))
    with sharding.use_mesh(mesh):
        device_loss = np.asarray(jax.jit(trainer.eval_loss)(state.params, dense))
    np.testing.assert_allclose(device_loss, host_loss, rtol=1e-6)

    # two training steps: the same losses, parameters and a distinct-passages count
    reference = _trainer(question_encoder, generator_tokenizer, mesh)
    host_state, device_state = reference.init_state(), trainer.init_state()
    for _ in range(2):
        retrieved = host_retriever.retrieve(
            questions, query_encoder_params=sharding.process_local(host_state.params["query_encoder"]))
        host_state, host_metrics = reference.train_step(host_state, host_retriever.train_batch(retrieved, labels))
        device_state, device_metrics = trainer.train_step(device_state, on_mesh, on_device.arrays)
        np.testing.assert_allclose(float(device_metrics["loss"]), float(host_metrics["loss"]), rtol=1e-5)
        assert int(device_metrics["distinct_passages"]) == len(np.unique(retrieved.doc_ids_BxK))
    for a, b in zip(jax.tree.leaves(device_state.params), jax.tree.leaves(host_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
