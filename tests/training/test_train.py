"""The training step: gradients, freezing, accumulation, SPMD equivalence, and learning."""

import dataclasses
import functools
import logging

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from rag_jax.config import MeshConfig, TrainConfig, default_config, reference_recipe, resolve, with_changes
from rag_jax.models.configs import BartConfig, BertConfig
from rag_jax.models.encoder import Encoder
from rag_jax.rag.batches import DenseRagBatch, FixedScoreRagBatch, Seq2SeqBatch
from rag_jax.rag.model import init_rag_model, question_vectors
from rag_jax.training import components, sharding
from rag_jax.training.optim import AdamWState, weight_decay_mask
from rag_jax.training.step import Trainer

V, D, K, B, SQ, S, T = 64, 32, 3, 8, 6, 10, 5
PAD = 1
# Adam divides by sqrt(v): for a gradient entry near zero, float32 rounding differences between two
# summation orders become update differences of up to a few percent of the learning rate (3e-3 here).
ADAM_ATOL = 5e-5


def _model(dropout: float = 0.0):
    bert = BertConfig(
        vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=32, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )  # fmt: skip
    bart = BartConfig(
        vocab_size=V, d_model=D, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=32,
        dropout=dropout, attention_dropout=dropout, activation_dropout=dropout,
    )  # fmt: skip
    return init_rag_model(bert, bart, seed=0)


def _batch(seed: int = 0, closed_book: bool = False):
    """A synthetic task: the answer is the first tokens of document 0, whose embedding is aligned
    with the question's CLS embedding direction only through training."""
    rng = np.random.default_rng(seed)
    labels = np.full((B, T), PAD)
    context = rng.integers(3, V, size=(B, K, S))
    labels[:, : T - 1] = context[:, 0, 1:T]
    labels[:, T - 1] = 2  # eos
    if closed_book:
        q = rng.integers(3, V, size=(B, S))
        return Seq2SeqBatch(input_ids_BxS=q, attention_mask_BxS=np.ones_like(q), labels_BxT=labels)
    question = rng.integers(3, V, size=(B, SQ))
    return DenseRagBatch(
        question_input_ids_BxQ=question,
        question_attention_mask_BxQ=np.ones_like(question),
        doc_embeddings_BxKxD=rng.normal(size=(B, K, D)).astype(np.float32),
        context_input_ids_BxKxS=context,
        context_attention_mask_BxKxS=np.ones_like(context),
        labels_BxT=labels,
    )


def _fixed_scores(batch: DenseRagBatch, doc_scores_BxK) -> FixedScoreRagBatch:
    """The batch's documents with the given fixed scores (as from BM25)."""
    return FixedScoreRagBatch(
        doc_scores_BxK=doc_scores_BxK,
        context_input_ids_BxKxS=batch.context_input_ids_BxKxS,
        context_attention_mask_BxKxS=batch.context_attention_mask_BxKxS,
        labels_BxT=batch.labels_BxT,
    )


def _cfg(variant="token", rag=None, **train):
    """The run config's train settings for these tests: lr 3e-3, warmup 5, 400 steps, clip 1, no smoothing."""
    config = with_changes(default_config(), rag={"variant": variant, **(rag or {})},
                          train={"learning_rate": 3e-3, "warmup_steps": 5, "steps": 400, "clip_norm": 1.0,
                                 "epsilon": 0.0, **train})  # fmt: skip
    return resolve(config).train


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@functools.cache
def _trainer(cfg: TrainConfig, dropout: float = 0.0) -> Trainer:
    """One single-device Trainer per (config, dropout) in a test process, so tests share its compiled
    step (each test starts from its own ``init_state()``; the step donates only the state)."""
    return Trainer(_model(dropout=dropout), cfg)


@functools.cache
def _loss_grad(trainer):
    """The jitted gradient of the summed loss (eager op-by-op differentiation is much slower)."""
    return jax.jit(jax.grad(lambda params, batch: trainer.per_example_loss(params, batch, None).sum()))


def test_gradients_reach_query_encoder_and_generator_only():
    trainer = _trainer(_cfg())
    state = trainer.init_state()
    assert set(state.params) == {"query_encoder", "generator"}  # the doc encoder is not trained
    grads = _loss_grad(trainer)(state.params, _batch())
    for name in ("query_encoder", "generator"):
        assert sum(float(np.abs(g).sum()) for g in _leaves(grads[name])) > 0, name


def test_frozen_query_encoder_does_not_move():
    trainer = _trainer(_cfg(freeze_query_encoder=True))
    state = trainer.init_state()
    before_qe, before_gen = _leaves(state.params["query_encoder"]), _leaves(state.params["generator"])
    for _ in range(2):  # the warmup's first learning rate is 0
        state, metrics = trainer.train_step(state, _batch())
    assert np.isfinite(float(metrics["loss"]))
    for a, b in zip(before_qe, _leaves(state.params["query_encoder"])):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(before_gen, _leaves(state.params["generator"])))


def test_fixed_doc_scores_give_the_dense_loss_and_no_query_encoder_gradient():
    """A batch from a fixed retriever (BM25) brings ``doc_scores``: the loss is the one the step
    computes from embeddings with the same scores, and the question encoder gets no gradient."""
    trainer = _trainer(_cfg())
    params = trainer.init_state().params
    dense = _batch()
    q_BxD = question_vectors(params["query_encoder"], dense.question_input_ids_BxQ, dense.question_attention_mask_BxQ,
                             encoder=trainer.encoder)  # fmt: skip
    fixed = _fixed_scores(dense, np.einsum("bd,bkd->bk", np.asarray(q_BxD), dense.doc_embeddings_BxKxD))
    loss = jax.jit(lambda p, b: trainer.per_example_loss(p, b, None))
    np.testing.assert_allclose(loss(params, fixed), loss(params, dense), rtol=1e-6)
    grads = _loss_grad(trainer)(params, fixed)
    assert all(not g.any() for g in _leaves(grads["query_encoder"]))
    assert any(g.any() for g in _leaves(grads["generator"]))


def _two_steps_deltas(cfg, batch):
    trainer = _trainer(cfg)
    state = trainer.init_state()
    before = {name: _leaves(tree) for name, tree in state.params.items()}
    for _ in range(2):  # the warmup's first learning rate is 0
        state, _ = trainer.train_step(state, batch)
    return {name: [b - a for a, b in zip(before[name], _leaves(tree))] for name, tree in state.params.items()}


def test_query_encoder_learning_rate_scales_its_updates_only():
    base = _two_steps_deltas(_cfg(), _batch())
    slow = _two_steps_deltas(_cfg(query_encoder_learning_rate=3e-4), _batch())  # a tenth of 3e-3
    for a, b in zip(base["query_encoder"], slow["query_encoder"]):
        np.testing.assert_allclose(b, a / 10, rtol=1e-4, atol=2e-7)  # deltas of O(1) float32 parameters
    for a, b in zip(base["generator"], slow["generator"]):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-9)


def test_closed_book_leaves_the_unused_query_encoder_alone():
    deltas = _two_steps_deltas(_cfg(variant="closed_book"), _batch(closed_book=True))
    assert all(not d.any() for d in deltas["query_encoder"])  # no weight decay drift either
    assert any(d.any() for d in deltas["generator"])


def test_gradient_accumulation_equals_one_big_batch():
    results = []
    for accum in (1, 2):
        trainer = _trainer(_cfg(grad_accum_steps=accum))
        state = trainer.init_state()
        for _ in range(2):  # the warmup's first learning rate is 0
            state, metrics = trainer.train_step(state, _batch())
        results.append((metrics, _leaves(state.params)))
    for name in ("loss", "grad_norm"):
        assert float(results[0][0][name]) == pytest.approx(float(results[1][0][name]), rel=1e-5)
    for a, b in zip(results[0][1], results[1][1]):
        np.testing.assert_allclose(a, b, atol=ADAM_ATOL)


def test_remat_and_bfloat16_compute():
    base = _trainer(_cfg())
    params = base.init_state().params
    loss = jax.jit(lambda p, b: base.per_example_loss(p, b, None))(params, _batch())
    remat = _trainer(_cfg(remat=True))
    grad = _loss_grad(base)(params, _batch())
    grad_remat = _loss_grad(remat)(params, _batch())
    for a, b in zip(_leaves(grad), _leaves(grad_remat)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    bf16 = _trainer(_cfg(compute_dtype="bfloat16"))
    loss_bf16 = jax.jit(lambda p, b: bf16.per_example_loss(p, b, None))(params, _batch())
    np.testing.assert_allclose(np.asarray(loss_bf16), np.asarray(loss), rtol=0.05)


def _is_adam_state(node) -> bool:
    return isinstance(node, AdamWState)


def _two_steps(trainer: Trainer, state, batch):
    """Two steps (the warmup's first learning rate is 0): the state and the second step's metrics."""
    for _ in range(2):
        state, metrics = trainer.train_step(state, batch)
    return state, metrics


def _assert_same_steps(reference, sharded) -> None:
    """``(state, metrics)`` of a sharded trainer equal a single device's (to summation-order rounding)."""
    (state1, metrics1), (state8, metrics8) = reference, sharded
    assert float(metrics8["loss"]) == pytest.approx(float(metrics1["loss"]), rel=1e-5)
    assert float(metrics8["grad_norm"]) == pytest.approx(float(metrics1["grad_norm"]), rel=1e-5)
    for a, b in zip(_leaves(state1.params), _leaves(state8.params)):
        np.testing.assert_allclose(a, b, atol=ADAM_ATOL)


def _single_and_sharded(seed: int, mesh: MeshConfig):
    """A batch, two single-device steps on it, and a fresh trainer and state on ``mesh``."""
    batch = _batch(seed=seed)
    single = _trainer(_cfg(), dropout=0.1)
    reference = _two_steps(single, single.init_state(), batch)
    sharded = Trainer(_model(dropout=0.1), _cfg(), mesh=sharding.make_mesh(mesh))
    return batch, reference, sharded, sharded.init_state()


def test_sharded_step_equals_single_device_step():
    assert jax.device_count() == 8
    batch, reference, sharded, state8 = _single_and_sharded(3, MeshConfig(data=2, fsdp=4, model=1))
    fc1 = state8.params["generator"]["encoder"]["layers"]["fc1"]["kernel"]
    assert fc1.sharding.spec == P(None, "fsdp", None)  # [layers, embed (32) over fsdp, mlp (48) over model (size 1)]
    word = state8.params["query_encoder"]["embeddings"]["word"]
    assert word.sharding.spec == P(None, "fsdp")
    query = state8.params["query_encoder"]["layers"]["query"]["kernel"]
    assert query.sharding.spec == P(None, "fsdp", None)  # [layers, embed, heads]
    adam_states = [s for s in jax.tree_util.tree_leaves(state8.opt_state, is_leaf=_is_adam_state)
                   if _is_adam_state(s)]  # fmt: skip
    assert adam_states
    for adam in adam_states:
        fc1_mu = adam.mu["generator"]["encoder"]["layers"]["fc1"]["kernel"]
        assert fc1_mu.sharding.spec == P(None, "fsdp", None)

    _assert_same_steps(reference, _two_steps(sharded, state8, batch))


def test_tensor_parallel_step_equals_single_device_step():
    """The ``model`` axis in use: heads, feed-forward units and the vocabulary (all even here) split over
    it, the batch over data x fsdp; the step's activation constraints apply (traced on the mesh) and the
    step computes what one device computes."""
    batch, reference, sharded, state8 = _single_and_sharded(4, MeshConfig(data=2, fsdp=2, model=2))
    generator = state8.params["generator"]
    assert generator["decoder"]["layers"]["fc1"]["kernel"].sharding.spec == P(None, "fsdp", "model")
    assert generator["decoder"]["layers"]["self_attn"]["out_proj"]["kernel"].sharding.spec == P(None, "model", "fsdp")
    assert generator["shared"]["embedding"].sharding.spec == P("model", "fsdp")
    assert state8.opt_state.mu["generator"]["shared"]["embedding"].sharding.spec == P("model", "fsdp")
    with sharding.use_mesh(sharded.mesh):
        program = jax.jit(sharded.eval_loss).lower(state8.params, batch).as_text()
    # the per-document logits [K, B, T, V]: documents free, batch over data x fsdp, vocabulary over model
    assert 'sharding_constraint %' in program and '[{?}, {"data", "fsdp"}, {}, {"model"}]' in program

    _assert_same_steps(reference, _two_steps(sharded, state8, batch))


@pytest.mark.parametrize("variant", ["token", "sequence", "closed_book"])
def test_training_drives_the_loss_down(variant):
    closed_book = variant == "closed_book"
    trainer = _trainer(_cfg(variant=variant), dropout=0.1)
    state = trainer.init_state()
    data = [_batch(seed=i, closed_book=closed_book) for i in range(2)]
    losses = []
    for step in range(200):
        state, metrics = trainer.train_step(state, data[step % 2])
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-10:]) < 0.3 * np.mean(losses[:10]), (losses[:10], losses[-10:])


def test_reference_recipe():
    cfg = resolve(reference_recipe()).train
    assert (cfg.epsilon, cfg.loss_reduction) == (0.1, "sum")
    opt = cfg.optimizer
    assert (opt.learning_rate, opt.weight_decay, opt.clip_norm, opt.warmup_steps) == (3e-5, 0.001, 0.1, 500)
    assert dataclasses.replace(cfg, variant="sequence").variant == "sequence"


def test_nonfinite_step_is_skipped_or_reported():
    bad = _batch()
    bad.doc_embeddings_BxKxD[0, 0, 0] = np.inf  # doc scores of example 0 become non-finite
    for skip in (True, False):
        trainer = _trainer(_cfg(on_nonfinite="skip" if skip else "stop"))
        state = trainer.init_state()
        state, _ = trainer.train_step(state, _batch())  # warmup: lr 0 at step 0
        before = _leaves(state.params)
        state, metrics = trainer.train_step(state, bad)
        assert bool(metrics["nonfinite"])
        unchanged = all(np.array_equal(a, b) for a, b in zip(before, _leaves(state.params)))
        assert unchanged == skip
        state, metrics = trainer.train_step(state, _batch())
        assert bool(metrics["nonfinite"]) != skip  # without skipping, NaN parameters stay NaN


def test_to_model_carries_trained_parameters():
    trainer = _trainer(_cfg())
    state = trainer.init_state()
    for _ in range(2):
        state, _ = trainer.train_step(state, _batch())
    model = trainer.to_model(state.params)
    batch = _batch()
    q = model.question_encoder.encode(batch.question_input_ids_BxQ, batch.question_attention_mask_BxQ)
    q_trainer = question_vectors(state.params["query_encoder"], batch.question_input_ids_BxQ,
                                 batch.question_attention_mask_BxQ, encoder=trainer.encoder)  # fmt: skip
    np.testing.assert_allclose(np.asarray(q), np.asarray(q_trainer), atol=1e-6)
    dec = batch.labels_BxT
    ids, mask = batch.context_input_ids_BxKxS[:, 0], batch.context_attention_mask_BxKxS[:, 0]
    logits = model.generator.logits(ids, mask, dec)
    ref = nnx.merge(trainer.graphdef, state.params["generator"], trainer.buffers)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref(ids, mask, dec)), atol=1e-5)


def test_the_step_takes_the_batch_types_of_its_variant():
    """A RAG step takes dense and fixed-score batches (each its own compiled step; doc-token batches: see
    test_end_to_end.py), a closed-book step
    a ``Seq2SeqBatch``; any other batch is refused with the types it takes."""
    rag = _trainer(_cfg())
    state = rag.init_state()
    dense = _batch()
    for batch in (dense, _fixed_scores(dense, np.zeros((B, K), np.float32))):
        state, metrics = rag.train_step(state, batch)
        assert np.isfinite(float(metrics["loss"])) and not bool(metrics["nonfinite"])
    assert set(rag._steps) == {DenseRagBatch, FixedScoreRagBatch}
    closed_book = _batch(closed_book=True)
    with pytest.raises(TypeError, match="'token' loss takes a DenseRagBatch or DocTokensRagBatch or FixedScoreRagBatch, got a Seq2SeqBatch"):
        rag.train_step(state, closed_book)
    with pytest.raises(TypeError, match="got a dict"):
        rag.eval_loss(state.params, dataclasses.asdict(dense))
    seq2seq = _trainer(_cfg(variant="closed_book"))
    params = seq2seq.init_state().params
    assert np.all(np.isfinite(np.asarray(jax.jit(seq2seq.eval_loss)(params, closed_book))))
    for batch in (dense, _fixed_scores(dense, np.zeros((B, K), np.float32))):
        with pytest.raises(TypeError, match=f"'closed_book' loss takes a Seq2SeqBatch, got a {type(batch).__name__}"):
            seq2seq.eval_loss(params, batch)


@pytest.mark.parametrize(("variant", "form"), [("token", "hf"), ("sequence", "paper")])
def test_model_loss_equals_the_trainers_eval_loss(variant, form):
    """``RagModel.loss`` (transformers' layout, fixed scores) and the trainer's dropout-free loss are
    one composition: on the same inputs they agree to float32 rounding, for dense and fixed-score batches."""
    trainer = _trainer(_cfg(variant=variant, form=form, epsilon=0.1))
    params = trainer.init_state().params
    model = trainer.to_model(params)
    dense = _batch(seed=5)
    doc_scores_BxK = model.doc_scores(dense.question_input_ids_BxQ, dense.question_attention_mask_BxQ,
                                      dense.doc_embeddings_BxKxD)  # fmt: skip
    expected = model.loss(
        dense.context_input_ids_BxKxS.reshape(B * K, S), dense.context_attention_mask_BxKxS.reshape(B * K, S),
        doc_scores_BxK, dense.labels_BxT, variant=variant, n_docs=K, epsilon=0.1, form=form,
    )  # fmt: skip
    eval_loss = jax.jit(trainer.eval_loss)
    for batch in (dense, _fixed_scores(dense, np.asarray(doc_scores_BxK))):
        np.testing.assert_allclose(np.asarray(eval_loss(params, batch)), np.asarray(expected), rtol=1e-6)


# -- the retrieval score scale ---------------------------------------------------------------------


def _unscaled_doc_scores(params, batch: DenseRagBatch, encoder) -> np.ndarray:
    q_BxD = question_vectors(params["query_encoder"], batch.question_input_ids_BxQ, batch.question_attention_mask_BxQ,
                             encoder=encoder)  # fmt: skip
    return np.einsum("bd,bkd->bk", np.asarray(q_BxD), batch.doc_embeddings_BxKxD)


@pytest.mark.parametrize("learn", [False, True])
def test_score_scale_multiplies_the_dense_doc_scores(learn):
    """``doc_scores = scale * q . d``: a dense batch's loss under a scale (fixed, or learned in log space)
    is the loss of the unscaled scores times the scale given as fixed scores; the model the trainer
    builds carries the scale into ``doc_scores``."""
    scale = 20.0
    trainer = Trainer(dataclasses.replace(_model(), score_scale=scale), _cfg(rag={"learn_score_scale": learn}))
    params = trainer.init_state().params
    assert ("score_scale" in params) == learn
    dense = _batch()
    scaled_BxK = scale * _unscaled_doc_scores(params, dense, trainer.encoder)
    loss = jax.jit(trainer.eval_loss)
    np.testing.assert_allclose(loss(params, dense), loss(params, _fixed_scores(dense, scaled_BxK)), rtol=1e-5)
    model = trainer.to_model(params)
    assert model.score_scale == pytest.approx(scale, rel=1e-6)
    doc_scores_BxK = model.doc_scores(dense.question_input_ids_BxQ, dense.question_attention_mask_BxQ,
                                      dense.doc_embeddings_BxKxD)  # fmt: skip
    np.testing.assert_allclose(np.asarray(doc_scores_BxK), scaled_BxK, rtol=1e-5, atol=1e-5)


def test_learned_score_scale_moves_with_its_own_learning_rate():
    """The learned log-scale gets a gradient and moves; its group's learning rate (default: the
    optimizer's) drives it, without weight decay, and changes nothing else; the scalar is replicated."""
    rag = {"learn_score_scale": True}
    trainer = _trainer(_cfg(rag=rag))
    params = trainer.init_state().params
    assert params["score_scale"].shape == () and params["score_scale"].sharding.spec == P()
    assert float(_loss_grad(trainer)(params, _batch())["score_scale"]) != 0
    assert not weight_decay_mask(params)["score_scale"]
    base = _two_steps_deltas(_cfg(rag=rag), _batch())  # score_scale_learning_rate None: learning_rate (3e-3)
    fast = _two_steps_deltas(_cfg(rag=rag, score_scale_learning_rate=3e-2), _batch())
    assert base["score_scale"][0] != 0
    np.testing.assert_allclose(fast["score_scale"][0], 10 * base["score_scale"][0], rtol=1e-4)
    for name in ("query_encoder", "generator"):
        for a, b in zip(base[name], fast[name]):
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-9)
    mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=4, model=1))
    abstract = Trainer(_model(), _cfg(rag=rag), mesh=mesh).abstract_state()
    assert abstract.params["score_scale"].sharding.spec == P()


def test_automatic_score_scale_is_20_for_a_normalising_encoder_announced_once(caplog):
    components._announce_automatic_scale.cache_clear()

    def encoder(pooling: str) -> Encoder:
        return Encoder(params={}, config=BertConfig(), pooling=pooling, kind="bert")

    config = default_config()
    with caplog.at_level(logging.WARNING, logger=components.__name__):
        assert components.score_scale(config, encoder("mean_normalized")) == 20
        assert components.score_scale(config, encoder("mean_normalized")) == 20
        assert components.score_scale(config, encoder("cls")) == 1
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "20 * q . d" in record.message and "rag.score_scale" in record.message
    assert "rag.learn_score_scale" in record.message
    assert components.score_scale(with_changes(config, rag={"score_scale": 5.0}), encoder("mean_normalized")) == 5


def test_step_reports_the_entropy_of_the_retrieval_prior():
    """``retrieval_entropy``: the mean entropy of p(z|x) = softmax(doc scores) the loss used (dropout off
    here, so the scores of the step's parameters), in nats; closed-book steps have none."""
    trainer = _trainer(_cfg())
    state = trainer.init_state()
    batch = _batch()
    scores_BxK = _unscaled_doc_scores(state.params, batch, trainer.encoder) * trainer.source_model.score_scale
    p_BxK = np.exp(scores_BxK - scores_BxK.max(-1, keepdims=True))
    p_BxK /= p_BxK.sum(-1, keepdims=True)
    expected = -np.mean(np.sum(p_BxK * np.log(p_BxK), axis=-1))
    _, metrics = trainer.train_step(state, batch)
    assert float(metrics["retrieval_entropy"]) == pytest.approx(expected, rel=1e-4)
    assert 0 <= expected <= np.log(K)
    _, closed_book = _trainer(_cfg(variant="closed_book")).train_step(
        _trainer(_cfg(variant="closed_book")).init_state(), _batch(closed_book=True))
    assert "retrieval_entropy" not in closed_book
