"""The Retriever: context strings and tokens equal transformers' RagRetriever, training-time query
parameters without recompiling, corpus hot-swap, size checks and the train batch."""

import dataclasses
import json

import jax
import ml_dtypes
import numpy as np
import pytest
from transformers import BartConfig, DPRConfig
from transformers import RagConfig as HFRagConfig
from transformers.models.rag import retrieval_rag

from rag_jax.models import encoder as encoder_module
from rag_jax.rag.batches import DenseRagBatch, FixedScoreRagBatch
from rag_jax.retrieval import (
    BM25Index,
    ContextFormat,
    EmbeddingShards,
    ExactIndex,
    Passage,
    PassageStore,
    Retriever,
    ScannIndex,
    context_strings,
    exact_search_numpy,
)
from rag_jax.retrieval.retriever import gather_rows

DIM, K, MAX_Q, MAX_CTX = 16, 3, 16, 40
PREFIX = "ctx: "
QUESTIONS = ["Who wrote  the Lazy Fox's book?", "WHERE is Paris,   France", "a"]
WORDS = "the quick brown fox jumps over lazy dog paris is capital of france who wrote book river city".split()


def write_jsonl(path, passages):
    with open(path, "w", encoding="utf-8") as f:
        for p in passages:
            f.write(json.dumps({"id": p.id, "title": p.title, "text": p.text}) + "\n")


def random_passages(rng, n, tag):
    """Titles with DPR's quotes (and ones the reference strips only once), texts with runs of
    spaces, and lengths on both sides of the context budget."""
    titles = ['"Quoted title"', '""Twice quoted""', "Plain  title", '"', "Paris"]
    out = []
    for i in range(n):
        words = rng.choice(WORDS, size=rng.integers(1, 30)).tolist()
        text = " ".join(w + " " * int(rng.integers(1, 4)) for w in words).strip()
        out.append(
            Passage(f"{tag}{i}", f"{titles[i % len(titles)]} {tag}{i}" if i % 3 else titles[i % len(titles)], text)
        )
    return out


def make_corpus(tmp_path, name, seed, n):
    rng = np.random.default_rng(seed)
    passages = random_passages(rng, n, name)
    path = str(tmp_path / f"{name}.jsonl")
    write_jsonl(path, passages)
    store = PassageStore.open(path)
    embeddings = rng.standard_normal((n, DIM)).astype(np.float32)
    return store, embeddings


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    store, embeddings = make_corpus(tmp_path_factory.mktemp("a"), "a", 1, 23)
    yield store, ExactIndex.build(embeddings), embeddings
    store.close()


@pytest.fixture(scope="module")
def retriever(question_encoder, question_tokenizer, generator_tokenizer, corpus):
    store, index, embeddings = corpus
    return Retriever(question_encoder, question_tokenizer, generator_tokenizer, store, index, embeddings,
                     k=K, max_question_length=MAX_Q, max_combined_length=MAX_CTX, prefix=PREFIX)  # fmt: skip


class ListIndex(retrieval_rag.Index):
    """transformers' Index interface over in-memory passages and embeddings (what CustomHFIndex does
    with a datasets.Dataset, which is not installed here)."""

    def __init__(self, passages, embeddings):
        self.passages, self.embeddings = passages, embeddings

    def get_doc_dicts(self, doc_ids):
        rows = [[self.passages[i] for i in ids] for ids in doc_ids.tolist()]
        return [{"title": [p.title for p in r], "text": [p.text for p in r]} for r in rows]

    def get_top_docs(self, question_hidden_states, n_docs=5):
        ids, _ = exact_search_numpy(self.embeddings, question_hidden_states, n_docs)
        return ids, self.embeddings[ids]


class RecordingTokenizer:
    """Delegates to a tokenizer and keeps the strings it was called with."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, []

    def __call__(self, texts, **kwargs):
        self.calls.append(list(texts))
        return self.tokenizer(texts, **kwargs)


def test_contexts_match_transformers_rag_retriever(
    retriever, corpus, question_tokenizer, generator_tokenizer, monkeypatch
):
    store, _, embeddings = corpus
    ours = retriever.retrieve(QUESTIONS)

    monkeypatch.setattr(retrieval_rag, "requires_backends", lambda *a, **kw: None)  # `datasets` is not installed
    config = HFRagConfig.from_question_encoder_generator_configs(
        DPRConfig(), BartConfig(), n_docs=K, max_combined_length=MAX_CTX, retrieval_vector_size=DIM
    )
    recorder = RecordingTokenizer(generator_tokenizer)
    index = ListIndex(store.slice(0, len(store)), embeddings)
    hf = retrieval_rag.RagRetriever(config, question_tokenizer, recorder, index=index, init_retrieval=False)
    out = hf(ours.question_input_ids_BxSq, ours.question_vectors_BxD, prefix=PREFIX, n_docs=K, return_tensors="np")

    b = len(QUESTIONS)
    np.testing.assert_array_equal(ours.doc_ids_BxK, out["doc_ids"])
    np.testing.assert_array_equal(ours.doc_embeddings_BxKxD, out["retrieved_doc_embeds"])
    np.testing.assert_array_equal(ours.context_input_ids_BxKxS.reshape(b * K, MAX_CTX), out["context_input_ids"])
    np.testing.assert_array_equal(
        ours.context_attention_mask_BxKxS.reshape(b * K, MAX_CTX), out["context_attention_mask"]
    )
    (hf_strings,) = recorder.calls
    ours_strings = context_strings(ours.passages, ours.questions, retriever.context_format)
    assert [s for row in ours_strings for s in row] == hf_strings
    # the cases the test is for did occur: quotes, runs of spaces, the decoded (lower-cased) question,
    # truncated and padded contexts
    assert any(p.title.startswith('"') for row in ours.passages for p in row)
    assert any("  " in p.text for row in ours.passages for p in row)
    assert ours.questions[1] == "where is paris, france"
    mask_lengths = ours.context_attention_mask_BxKxS.sum(-1)
    assert mask_lengths.max() == MAX_CTX and mask_lengths.min() < MAX_CTX
    # the rest of the batch
    assert [[p.id for p in row] for row in ours.passages] == [
        [store[i].id for i in row] for row in ours.doc_ids_BxK.tolist()
    ]
    np.testing.assert_allclose(
        ours.doc_scores_BxK, np.einsum("bd,bkd->bk", ours.question_vectors_BxD, embeddings[ours.doc_ids_BxK]), rtol=1e-6
    )
    q = np.asarray(retriever.question_encoder.encode(ours.question_input_ids_BxSq, ours.question_attention_mask_BxSq))
    np.testing.assert_allclose(ours.question_vectors_BxD, q, rtol=1e-5, atol=1e-6)


def test_context_string_reference_details():
    fmt = ContextFormat(prefix=None)
    got = context_strings([[Passage("1", '""A""', "x   y"), Passage("2", '"', "z")]], ["q  ?"], fmt)
    # one quote removed at each end, "  " replaced once left to right (3 spaces -> 2)
    assert got == [['"A" / x  y // q ?', " / z // q ?"]]


def test_token_ids_and_strings_retrieve_the_same(retriever):
    from_text = retriever.retrieve(QUESTIONS)
    width = int(from_text.question_attention_mask_BxSq.sum(1).max())
    assert width < MAX_Q
    ids = from_text.question_input_ids_BxSq[:, :width]  # shorter ids are padded to max_question_length
    from_ids = retriever.retrieve(ids)  # mask from the pad id
    np.testing.assert_array_equal(from_ids.question_input_ids_BxSq, from_text.question_input_ids_BxSq)
    np.testing.assert_array_equal(from_ids.doc_ids_BxK, from_text.doc_ids_BxK)
    np.testing.assert_array_equal(from_ids.context_input_ids_BxKxS, from_text.context_input_ids_BxKxS)
    with pytest.raises(ValueError, match="max_question_length"):
        retriever.retrieve(np.ones((2, MAX_Q + 1), np.int32))


def test_query_encoder_params_without_recompiling(retriever):
    retriever.retrieve(QUESTIONS)
    compiled = encoder_module._pooled_encode_jit._cache_size()
    params = jax.tree.map(lambda x: x + 0.05 * np.sign(np.asarray(x)), retriever.question_encoder.params)
    moved = retriever.retrieve(QUESTIONS + ["one more"], query_encoder_params=params)  # 4 rows: the padded shape of 3
    assert encoder_module._pooled_encode_jit._cache_size() == compiled
    expected = np.asarray(encoder_module.dataclasses.replace(retriever.question_encoder, params=params).encode(
        moved.question_input_ids_BxSq, moved.question_attention_mask_BxSq))  # fmt: skip
    np.testing.assert_allclose(moved.question_vectors_BxD, expected, rtol=1e-5, atol=1e-6)
    ids, _ = exact_search_numpy(retriever.embeddings, moved.question_vectors_BxD, K)
    np.testing.assert_array_equal(moved.doc_ids_BxK, ids)


def test_score_scale_multiplies_the_dense_scores(retriever):
    plain, scaled = retriever.retrieve(QUESTIONS), retriever.retrieve(QUESTIONS, score_scale=20.0)
    np.testing.assert_array_equal(scaled.doc_ids_BxK, plain.doc_ids_BxK)
    np.testing.assert_allclose(scaled.doc_scores_BxK, 20 * plain.doc_scores_BxK, rtol=1e-6)
    expected = np.einsum("bd,bkd->bk", plain.question_vectors_BxD, plain.doc_embeddings_BxKxD)
    np.testing.assert_allclose(plain.doc_scores_BxK, expected, rtol=1e-5, atol=1e-6)


def test_hot_swap_changes_passages_and_contexts(retriever, tmp_path):
    store_b, embeddings_b = make_corpus(tmp_path, "b", 2, 31)
    with store_b:
        swapped = retriever.with_corpus(store_b, ScannIndex.build(embeddings_b), embeddings_b)
        before, after = retriever.retrieve(QUESTIONS), swapped.retrieve(QUESTIONS)
        np.testing.assert_array_equal(after.question_vectors_BxD, before.question_vectors_BxD)  # same models
        ids, _ = exact_search_numpy(embeddings_b, after.question_vectors_BxD, K)
        np.testing.assert_array_equal(after.doc_ids_BxK, ids)
        assert [[p.id for p in row] for row in after.passages] == [[store_b[i].id for i in row] for row in ids.tolist()]
        assert all(p.id.startswith("b") for row in after.passages for p in row)
        np.testing.assert_array_equal(after.doc_embeddings_BxKxD, embeddings_b[ids])
        expected = context_strings(after.passages, after.questions, swapped.context_format)
        tokens = retriever.generator_tokenizer([s for row in expected for s in row], max_length=MAX_CTX,
                                               padding="max_length", truncation=True, return_tensors="np")  # fmt: skip
        np.testing.assert_array_equal(after.context_input_ids_BxKxS.reshape(-1, MAX_CTX), tokens["input_ids"])
        assert not np.array_equal(after.context_input_ids_BxKxS, before.context_input_ids_BxKxS)
        assert retriever.retrieve(QUESTIONS).passages == before.passages  # the original is untouched


def test_mismatched_sizes_are_refused(retriever, corpus, question_encoder):
    store, index, embeddings = corpus
    with pytest.raises(ValueError, match="embeddings have shape"):
        retriever.with_corpus(store, index, embeddings[:-1])
    with pytest.raises(ValueError, match="the passage store has 23 passages but the index holds 22"):
        retriever.with_corpus(store, ExactIndex.build(embeddings[:-1]), embeddings[:-1])
    wide = np.concatenate([embeddings, embeddings], axis=1)
    with pytest.raises(ValueError, match="question encoder gives 16-dim vectors, the index has dim 32"):
        retriever.with_corpus(store, ScannIndex.build(wide), wide)
    with pytest.raises(ValueError, match="k=24"):
        Retriever(question_encoder, None, None, store, index, embeddings, k=24)


def test_gather_rows_from_memory_mapped_shards():
    rng = np.random.default_rng(3)
    whole = rng.standard_normal((10, 4)).astype(ml_dtypes.bfloat16)
    shards = EmbeddingShards([whole[:4], whole[4:7], whole[7:]])
    rows = np.array([[9, 0, 4], [3, 7, 7]])
    np.testing.assert_array_equal(gather_rows(shards, rows), whole[rows].astype(np.float32))
    assert gather_rows(shards, rows).dtype == np.float32


def test_train_batch(retriever):
    retrieved = retriever.retrieve(QUESTIONS)
    labels = np.arange(len(QUESTIONS) * 5).reshape(len(QUESTIONS), 5)
    batch = retriever.train_batch(retrieved, labels)
    assert isinstance(batch, DenseRagBatch)
    assert {f.name: getattr(batch, f.name).shape for f in dataclasses.fields(batch)} == {
        "question_input_ids_BxQ": (3, MAX_Q), "question_attention_mask_BxQ": (3, MAX_Q),
        "doc_embeddings_BxKxD": (3, K, DIM), "context_input_ids_BxKxS": (3, K, MAX_CTX),
        "context_attention_mask_BxKxS": (3, K, MAX_CTX), "labels_BxT": (3, 5),
    }  # fmt: skip
    assert batch.doc_embeddings_BxKxD.dtype == np.float32 and batch.labels_BxT.dtype == np.int32
    with pytest.raises(ValueError, match=r"labels must be \[B=3, T\]"):
        retriever.train_batch(retrieved, labels[:2])


# -- BM25 ----------------------------------------------------------------------------------------

def bm25_reference(passages, question, k1=1.5, b=0.75):
    """Lucene's BM25 (bm25s's default) written out: idf = ln(1 + (N - df + 0.5) / (df + 0.5)), term
    weight tf / (tf + k1 (1 - b + b dl / avgdl)) (Lucene drops the constant (k1 + 1) factor)."""
    import re

    from bm25s.stopwords import STOPWORDS_EN

    def words(text):
        return [w for w in re.findall(r"(?u)\b\w\w+\b", text.lower()) if w not in STOPWORDS_EN]

    docs = [words(f"{p.title} {p.text}") for p in passages]
    avgdl = np.mean([len(d) for d in docs])
    scores = np.zeros(len(docs))
    for term in set(words(question)):
        df = sum(term in d for d in docs)
        idf = np.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
        for i, d in enumerate(docs):
            tf = d.count(term)
            scores[i] += idf * tf / (tf + k1 * (1 - b + b * len(d) / avgdl))
    return scores


def test_bm25_scores_follow_the_formula(corpus):
    store = corpus[0]
    passages = store.get_many(np.arange(len(store)))
    index = BM25Index.build(passages)
    questions = ["quick brown fox in paris", "who wrote the book about the river city", "unseen words only"]
    rows, scores = index.search_text(questions, 5)
    assert rows.shape == scores.shape == (3, 5)
    for question, row, score in zip(questions, rows, scores):
        reference = bm25_reference(passages, question)
        np.testing.assert_allclose(score, reference[row], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(score, np.sort(reference)[::-1][:5], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="k=24"):
        index.search_text(questions, 24)


def test_retriever_over_bm25_scores_by_text_and_gives_fixed_scores(retriever, corpus):
    store = corpus[0]
    index = BM25Index.build(store.get_many(np.arange(len(store))))
    lexical = retriever.with_corpus(store, index, None)
    found = lexical.retrieve(QUESTIONS)
    rows, scores = index.search_text(found.questions, K)
    np.testing.assert_array_equal(found.doc_ids_BxK, rows)
    np.testing.assert_array_equal(found.doc_scores_BxK, scores)
    np.testing.assert_array_equal(lexical.retrieve(QUESTIONS, score_scale=20.0).doc_scores_BxK, scores)  # BM25's own
    assert found.question_vectors_BxD is None and found.doc_embeddings_BxKxD is None
    expected = context_strings(found.passages, found.questions, lexical.context_format)
    decoded = [[lexical.generator_tokenizer.decode(ids[m.astype(bool)], skip_special_tokens=True) for ids, m in
                zip(ids_K, mask_K)] for ids_K, mask_K in zip(found.context_input_ids_BxKxS,
                                                             found.context_attention_mask_BxKxS)]  # fmt: skip
    assert [[d[:12] for d in row] for row in decoded] == [[e[:12] for e in row] for row in expected]
    batch = lexical.train_batch(found, np.ones((len(QUESTIONS), 4), np.int32))
    assert isinstance(batch, FixedScoreRagBatch)
    np.testing.assert_array_equal(batch.doc_scores_BxK, found.doc_scores_BxK)
    with pytest.raises(ValueError, match="embeddings=None"):
        retriever.with_corpus(store, index, corpus[2])


def test_run_config_bm25_builds_a_lexical_retriever_and_freezes_the_question_encoder(
    question_encoder, question_tokenizer, generator_tokenizer, corpus
):
    import types

    from rag_jax.config import default_config, resolve
    from rag_jax.training import components

    cfg = default_config()
    cfg.corpus.update(passages=corpus[0].path, retriever="bm25")  # no embeddings, no index needed
    model = types.SimpleNamespace(question_encoder=question_encoder)
    retriever = components.build_retriever(cfg, model, question_tokenizer, generator_tokenizer, k=K)
    assert retriever.lexical and retriever.embeddings is None and len(retriever.store) == len(corpus[0])
    assert resolve(cfg).train.freeze_query_encoder
    cfg.corpus.retriever = "sparse"
    with pytest.raises(ValueError, match="config.corpus.retriever: must be one of 'dense', 'device', 'bm25'; got 'sparse'"):
        resolve(cfg)
