"""End-to-end retriever training in the step: a trained (or shared) document encoder gets the loss's
gradient, the re-rank keeps what fresh retrieval would, and the index-refresh schedule swaps
generations exactly at snapshot + lag."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rag_jax.config import ConfigError, default_config, resolve, with_changes
from rag_jax.models.configs import BartConfig, BertConfig
from rag_jax.models.encoder import Encoder
from rag_jax.rag.batches import DenseRagBatch, DocTokensRagBatch
from rag_jax.rag.model import init_rag_model, rerank_candidates
from rag_jax.retrieval import exact_search_numpy
from rag_jax.training.reindex import IndexRefresher, RefreshSchedule
from rag_jax.training.step import Trainer

V, D, K, B, Q, P, S, T = 64, 32, 3, 4, 6, 7, 10, 5


def _model():
    bert = BertConfig(vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                      max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # fmt: skip
    bart = BartConfig(vocab_size=V, d_model=D, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                      decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=32,
                      dropout=0.0, attention_dropout=0.0, activation_dropout=0.0)  # fmt: skip
    model = init_rag_model(bert, bart, seed=0)
    doc_params = init_rag_model(bert, bart, seed=1).question_encoder.params  # another encoder than the questions'
    doc_encoder = Encoder(doc_params, bert, pooling="cls", kind="dpr_context")
    return dataclasses.replace(model, doc_encoder=doc_encoder)


def _train_config(share_encoders=False, **train):
    config = with_changes(default_config(), rag={"k": K}, model={"share_encoders": share_encoders},
                          train={"learning_rate": 3e-3, "warmup_steps": 1, "epsilon": 0.0, **train})  # fmt: skip
    return resolve(config).train


def _batch(seed=0, k=K):
    rng = np.random.default_rng(seed)
    question = rng.integers(3, V, size=(B, Q))
    docs = rng.integers(3, V, size=(B, k, P))
    context = rng.integers(3, V, size=(B, k, S))
    labels = np.concatenate([context[:, 0, 1:T], np.full((B, 1), 2)], axis=1)
    return DocTokensRagBatch(question_input_ids_BxQ=question, question_attention_mask_BxQ=np.ones_like(question),
                             doc_input_ids_BxKxP=docs, doc_attention_mask_BxKxP=np.ones_like(docs),
                             context_input_ids_BxKxS=context, context_attention_mask_BxKxS=np.ones_like(context),
                             labels_BxT=labels)  # fmt: skip


def _grads(trainer, params, batch):
    return jax.jit(jax.grad(lambda p: trainer.per_example_loss(p, batch, None).sum()))(params)


def _norm(tree) -> float:
    return float(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree)) ** 0.5)


def test_the_document_encoder_is_trained_only_when_asked():
    model = _model()
    frozen = Trainer(model, _train_config())
    assert "doc_encoder" not in frozen.init_state().params  # the paper: the batch brings stored embeddings
    trained = Trainer(model, _train_config(doc_encoder="trained"))
    state = trained.init_state()
    grads = _grads(trained, state.params, _batch())
    assert _norm(grads["doc_encoder"]) > 0 and _norm(grads["query_encoder"]) > 0
    new_state, _ = trained.train_step(state, _batch())
    new_state, _ = trained.train_step(new_state, _batch())  # (the first step's learning rate is 0: warmup)
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new_state.params["doc_encoder"],
                         jax.tree.map(jnp.asarray, model.doc_encoder.params))  # fmt: skip
    assert any(jax.tree.leaves(moved))
    assert np.allclose(trained.to_model(new_state.params).doc_encoder.params["embeddings"]["word"],
                       new_state.params["doc_encoder"]["embeddings"]["word"])  # fmt: skip


def test_document_encoder_gradient_equals_finite_differences():
    """The derivative of the loss along the document encoder's normalised gradient (its norm) against a
    central difference. Float32 loss sums of ~64 have a 7.6e-6 ulp, i.e. ~4e-4 in a difference over
    2e-2: a few percent of this derivative, hence the 5% tolerance (a missing or wrong path to the
    document encoder is off by far more; score scale 0.1 keeps random encoders' p(z|x) soft)."""
    trainer = Trainer(dataclasses.replace(_model(), score_scale=0.1), _train_config(doc_encoder="trained"))
    params = jax.tree.map(jnp.asarray, trainer.init_state().params)
    batch = _batch(3)
    grads = _grads(trainer, params, batch)["doc_encoder"]
    direction = jax.tree.map(lambda g, n=_norm(grads): g / n, grads)

    @jax.jit
    def loss_along(eps):
        moved = jax.tree.map(lambda p, d: p + eps * d, params["doc_encoder"], direction)
        return trainer.per_example_loss({**params, "doc_encoder": moved}, batch, None).sum()

    eps = 1e-2
    numeric = (loss_along(eps) - loss_along(-eps)) / (2 * eps)
    assert _norm(grads) > 1e-3
    np.testing.assert_allclose(_norm(grads), float(numeric), rtol=5e-2)


def test_shared_encoders_sum_both_sides_gradients():
    """One encoder for both sides (Contriever-style): the loss is the two-encoder loss with equal
    parameters, and its gradient is the sum of the two sides' gradients."""
    model = _model()
    same = dataclasses.replace(model, doc_encoder=dataclasses.replace(model.doc_encoder,
                                                                      params=model.question_encoder.params))  # fmt: skip
    shared = Trainer(model, _train_config(doc_encoder="trained", share_encoders=True))
    separate = Trainer(same, _train_config(doc_encoder="trained"))
    shared_params = jax.tree.map(jnp.asarray, shared.init_state().params)
    separate_params = jax.tree.map(jnp.asarray, separate.init_state().params)
    assert "doc_encoder" not in shared_params
    batch = _batch(4)
    np.testing.assert_allclose(shared.eval_loss(shared_params, batch), separate.eval_loss(separate_params, batch),
                               rtol=1e-6)  # fmt: skip
    g_shared, g_separate = _grads(shared, shared_params, batch), _grads(separate, separate_params, batch)
    summed = jax.tree.map(jnp.add, g_separate["query_encoder"], g_separate["doc_encoder"])
    for a, b in zip(jax.tree.leaves(g_shared["query_encoder"]), jax.tree.leaves(summed)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_rerank_over_the_whole_corpus_equals_retrieval_from_freshly_embedded_passages():
    """Re-rank with L = the corpus size: the step keeps the k passages an exact search over the corpus
    embedded with the current document encoder returns, and its loss is the loss of those k."""
    model = _model()
    trainer = Trainer(model, _train_config(doc_encoder="trained", index_refresh="rerank", rerank_candidates=K + 5))
    params = jax.tree.map(jnp.asarray, trainer.init_state().params)
    corpus = _batch(5, k=12)  # 12 passages per question: each question's candidates are "the corpus"
    q_BxD = np.asarray(model.question_encoder.encode(corpus.question_input_ids_BxQ, corpus.question_attention_mask_BxQ))
    kept = []
    for b in range(B):
        fresh_NxD = np.asarray(model.doc_encoder.encode(corpus.doc_input_ids_BxKxP[b], corpus.doc_attention_mask_BxKxP[b]))
        ids, _ = exact_search_numpy(fresh_NxD, q_BxD[b : b + 1], K)
        kept.append(ids[0])
        d_LxD = fresh_NxD
        assert list(np.asarray(rerank_candidates(q_BxD[b : b + 1], d_LxD[None], K))[0]) == list(ids[0])
    kept_BxK = np.stack(kept)

    def take(x):
        return np.take_along_axis(x, kept_BxK.reshape(B, K, 1), axis=1)

    fresh_top_k = dataclasses.replace(
        corpus, doc_input_ids_BxKxP=take(corpus.doc_input_ids_BxKxP), doc_attention_mask_BxKxP=take(corpus.doc_attention_mask_BxKxP),
        context_input_ids_BxKxS=take(corpus.context_input_ids_BxKxS),
        context_attention_mask_BxKxS=take(corpus.context_attention_mask_BxKxS))  # fmt: skip
    plain = Trainer(model, _train_config(doc_encoder="trained"))
    np.testing.assert_allclose(trainer.eval_loss(params, corpus), plain.eval_loss(params, fresh_top_k), rtol=1e-6)


def test_the_step_takes_doc_tokens_only_with_a_trained_document_encoder():
    frozen = Trainer(_model(), _train_config())
    with pytest.raises(ValueError, match="doc_encoder"):
        frozen.eval_loss(frozen.init_state().params, _batch())
    dense = DenseRagBatch(np.ones((B, Q), int), np.ones((B, Q), int), np.zeros((B, K, D), np.float32),
                          np.ones((B, K, S), int), np.ones((B, K, S), int), np.ones((B, T), int))  # fmt: skip
    assert np.isfinite(frozen.eval_loss(frozen.init_state().params, dense)).all()


@pytest.mark.parametrize("changes, field", [
    ({"train": {"index_refresh": "full"}}, "config.train.index_refresh"),
    ({"model": {"share_encoders": True}}, "config.model.share_encoders"),
    ({"train": {"doc_encoder": "trained"}, "corpus": {"retriever": "bm25"}}, "config.train.doc_encoder"),
    ({"train": {"doc_encoder": "trained"}, "corpus": {"retriever": "device"}}, "config.train.doc_encoder"),
    ({"corpus": {"retriever": "device", "device_dtype": "float16"}}, "config.corpus.device_dtype"),
    ({"train": {"doc_encoder": "trained", "index_refresh": "full", "reindex_every": 5, "reindex_lag": 5}},
     "config.train.reindex_lag"),
    ({"train": {"doc_encoder": "trained", "index_refresh": "rerank", "rerank_candidates": 5}},
     "config.train.rerank_candidates"),
])  # fmt: skip
def test_inconsistent_end_to_end_settings_are_config_errors(changes, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        resolve(with_changes(default_config(), **changes))


def test_schedule_swaps_exactly_at_snapshot_plus_lag():
    schedule = RefreshSchedule(every=4, lag=2)
    # generation retrieving for step t: the latest snapshot s (a positive multiple of 4) with s + 2 < t
    assert [schedule.generation_for(t) for t in range(1, 16)] == [0] * 6 + [4] * 4 + [8] * 4 + [12]
    assert [s for s in range(13) if schedule.is_snapshot(s)] == [4, 8, 12]
    assert [schedule.pending_at(c) for c in range(0, 11)] == [None] * 4 + [4, 4] + [None] * 2 + [8, 8, None]
    assert [schedule.next_swap(c) for c in (0, 5, 6, 9, 10)] == [6, 6, 10, 10, 14]
    assert RefreshSchedule(every=3, lag=0).generation_for(4) == 3  # lag 0: the step right after the snapshot


def test_refresher_swaps_at_the_scheduled_step_and_waits_for_a_late_build(caplog):
    """Driven as the loop drives it: the corpus of step t is generation ``generation_for(t)``, a build not
    finished by its swap is waited for (logged), the checkpoint's snapshots are the generations in use
    and being built, and a resumed refresher hands out the same corpora."""
    import threading

    release = threading.Event()
    built, pruned = [], []

    def build(step, params):
        if step == 4:
            release.wait(timeout=30)
        built.append(step)
        return f"corpus@{step}"

    disk = {}

    def load(step):
        return disk.get(step)

    refresher = IndexRefresher(RefreshSchedule(every=4, lag=2), build, load, pruned.append, "original", "params@0")
    seen = {}
    for step in range(1, 12):
        if step == 7:
            threading.Timer(0.3, release.set).start()
        seen[step] = refresher.corpus_for(step)
        if step == 5:
            assert refresher.checkpoint_snapshots(5) == {"current": "params@0", "pending": "params@4"}
        refresher.after_step(step, lambda s=step: f"params@{s}")
    refresher.close()
    assert seen == {**{t: "original" for t in range(1, 7)}, **{t: "corpus@4" for t in range(7, 11)}, 11: "corpus@8"}
    assert built == [4, 8] and refresher.wait_seconds > 0.1
    assert "waiting for index generation 4" in caplog.text
    assert refresher.checkpoint_snapshots(11) == {"current": "params@8", "pending": "params@8"}

    disk.update({4: "corpus@4 from disk"})
    resumed = IndexRefresher(RefreshSchedule(every=4, lag=2), build, load, pruned.append, "original", "params@0")
    resumed.resume(9, {4: "params@4", 8: "params@8"})  # 4 in use (on disk), 8 being built (rebuilt)
    assert resumed.corpus_for(10) == "corpus@4 from disk" and resumed.corpus_for(11) == "corpus@8"
    resumed.close()
