"""rag_jax.rag.objective against transformers' get_nll, torch autograd, and a naive per-document loop."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import BartConfig, DPRConfig, RagConfig, RagSequenceForGeneration, RagTokenForGeneration

from rag_jax.rag import objective

B, T, V = 4, 7, 61
BOS, PAD, EOS = 0, 1, 2
DECODER_START = EOS
RTOL = 1e-5


@pytest.fixture(scope="module")
def hf_models():
    """Tiny RAG-Token / RAG-Sequence models; only their get_nll (and marginalize) are used."""
    question_encoder = DPRConfig(
        vocab_size=V, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
    )
    generator = BartConfig(
        vocab_size=V, d_model=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16, max_position_embeddings=32,
        bos_token_id=BOS, pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=DECODER_START,
    )
    config = RagConfig.from_question_encoder_generator_configs(question_encoder, generator, n_docs=5)
    return {"token": RagTokenForGeneration(config).eval(), "sequence": RagSequenceForGeneration(config).eval()}


def make_inputs(seed: int, n_docs: int, *, all_bos: bool = True):
    """Random float32 logits [B, K, T, V], doc scores [B, K] and labels [B, T] in the hf layout.

    Labels are ``[decoder_start, BOS, tokens..., EOS, PAD...]`` with rows of different lengths, so
    the hf target (labels shifted left) starts with BOS in every row unless ``all_bos`` is False.
    """
    rng = np.random.default_rng(seed)
    logits = (2.0 * rng.standard_normal((B, n_docs, T, V))).astype(np.float32)
    doc_scores = (3.0 * rng.standard_normal((B, n_docs))).astype(np.float32)
    labels = rng.integers(3, V, size=(B, T))
    labels[:, 0], labels[:, 1] = DECODER_START, BOS
    for row, length in enumerate([T, T - 2, 4, 3]):
        labels[row, length - 1] = EOS
        labels[row, length:] = PAD
    if not all_bos:
        labels[2, 1] = 5
    return logits, doc_scores, labels


def hf_nll(model, logits, doc_scores, labels, *, dtype=torch.float32, **kwargs):
    """transformers' get_nll on our inputs, flattened doc-fastest to [B*K, T, V]."""
    seq_logits = torch.tensor(logits.reshape(-1, T, V), dtype=dtype)
    scores = torch.tensor(doc_scores, dtype=dtype)
    return model.get_nll(seq_logits, scores, torch.tensor(labels), n_docs=logits.shape[1], **kwargs)


def max_rel_diff(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected) / np.maximum(np.abs(expected), 1.0)))


@functools.cache
def jitted_losses(kind: str, **kwargs):
    """One jit per configuration: (per-example losses, their sum)."""
    loss_fn = objective.rag_sequence_loss if kind == "sequence" else objective.rag_token_loss
    per_example = functools.partial(loss_fn, pad_token_id=PAD, **kwargs)
    return jax.jit(lambda *args: (per_example(*args), per_example(*args, reduce=True)))


@pytest.mark.parametrize("all_bos", [True, False])
@pytest.mark.parametrize("exclude_bos_score", [False, True])
@pytest.mark.parametrize("epsilon", [0.0, 0.1])
@pytest.mark.parametrize("n_docs", [1, 3, 5])
def test_rag_sequence_matches_transformers(hf_models, n_docs, epsilon, exclude_bos_score, all_bos):
    logits, doc_scores, labels = make_inputs(n_docs, n_docs, all_bos=all_bos)
    loss_fn = jitted_losses("sequence", bos_token_id=BOS, epsilon=epsilon, exclude_bos_score=exclude_bos_score)
    ours, ours_sum = loss_fn(logits, doc_scores, labels)
    for reduce, actual in [(False, ours), (True, ours_sum)]:
        for dtype in (torch.float32, torch.float64):
            expected = hf_nll(
                hf_models["sequence"], logits, doc_scores, labels, dtype=dtype,
                reduce_loss=reduce, epsilon=epsilon, exclude_bos_score=exclude_bos_score,
            )
            assert actual.shape == expected.shape
            assert max_rel_diff(actual, expected.numpy()) <= RTOL, (reduce, dtype)


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
@pytest.mark.parametrize("n_docs", [1, 3, 5])
def test_rag_token_matches_transformers(hf_models, n_docs, epsilon):
    logits, doc_scores, labels = make_inputs(10 + n_docs, n_docs)
    ours, ours_sum = jitted_losses("token", epsilon=epsilon)(logits, doc_scores, labels)
    for reduce, actual in [(False, ours), (True, ours_sum)]:
        for dtype in (torch.float32, torch.float64):
            expected = hf_nll(
                hf_models["token"], logits, doc_scores, labels, dtype=dtype, reduce_loss=reduce, epsilon=epsilon
            )
            assert actual.shape == expected.shape
            assert max_rel_diff(actual, expected.numpy()) <= RTOL, (reduce, dtype)


def test_marginal_log_probs_matches_transformers(hf_models):
    logits, doc_scores, _ = make_inputs(20, 3)
    seq_logits, scores = torch.tensor(logits.reshape(-1, T, V)), torch.tensor(doc_scores)
    expected = hf_models["token"].marginalize(seq_logits, scores, n_docs=3).numpy()
    np.testing.assert_allclose(objective.marginal_log_probs(logits, doc_scores), expected, rtol=RTOL, atol=1e-5)


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
@pytest.mark.parametrize("kind", ["sequence", "token"])
def test_gradients_match_torch_autograd(hf_models, kind, epsilon):
    logits, doc_scores, labels = make_inputs(30, 3)
    sequence = kind == "sequence"
    loss_fn = objective.rag_sequence_loss if sequence else objective.rag_token_loss
    options = {"bos_token_id": BOS, "exclude_bos_score": True} if sequence else {}
    loss_fn = functools.partial(loss_fn, pad_token_id=PAD, epsilon=epsilon, reduce=True, **options)
    grad_logits, grad_scores = jax.jit(jax.grad(loss_fn, argnums=(0, 1)))(logits, doc_scores, labels)

    seq_logits = torch.tensor(logits.reshape(-1, T, V), requires_grad=True)
    scores = torch.tensor(doc_scores, requires_grad=True)
    hf_options = {"exclude_bos_score": True} if sequence else {}
    loss = hf_models[kind].get_nll(
        seq_logits, scores, torch.tensor(labels), reduce_loss=True, epsilon=epsilon, n_docs=3, **hf_options
    )
    loss.backward()
    for ours, theirs in [(grad_logits.reshape(-1, T, V), seq_logits.grad), (grad_scores, scores.grad)]:
        theirs = theirs.numpy()
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5 * np.abs(theirs).max())


def naive_paper_losses(logits, doc_scores, labels, epsilon):
    """Paper-form RAG-Sequence and RAG-Token losses [B] by explicit loops over examples, docs and positions."""
    logits = logits.astype(np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    scores = doc_scores.astype(np.float64)
    prior = scores - np.log(np.exp(scores).sum(-1, keepdims=True))
    sequence, token = [], []
    for b in range(labels.shape[0]):
        positions = [t for t in range(labels.shape[1]) if labels[b, t] != PAD]
        seq_ll, seq_smooth = [], []
        for k in range(prior.shape[1]):
            seq_ll.append(prior[b, k] + sum(log_probs[b, k, t, labels[b, t]] for t in positions))
            seq_smooth.append(V * prior[b, k] + sum(log_probs[b, k, t].sum() for t in positions))
        seq_nll, seq_smooth_loss = -np.logaddexp.reduce(seq_ll), -np.logaddexp.reduce(seq_smooth)
        sequence.append((1 - epsilon) * seq_nll + epsilon / V * seq_smooth_loss)
        tok_nll = tok_smooth = 0.0
        for t in positions:
            marginal = np.logaddexp.reduce(prior[b][:, None] + log_probs[b, :, t], axis=0)
            tok_nll -= marginal[labels[b, t]]
            tok_smooth -= marginal.sum()
        token.append((1 - epsilon) * tok_nll + epsilon / V * tok_smooth)
    return np.array(sequence), np.array(token)


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_paper_form_equals_naive_loop(epsilon):
    logits, doc_scores, labels = make_inputs(40, 3)
    labels[:, 0] = 7  # a first token, as the paper form scores position 0
    labels[3, 1:] = PAD  # a one-token target
    expected_sequence, expected_token = naive_paper_losses(logits, doc_scores, labels, epsilon)
    kwargs = {"pad_token_id": PAD, "epsilon": epsilon, "form": "paper"}
    assert max_rel_diff(objective.rag_sequence_loss(logits, doc_scores, labels, **kwargs), expected_sequence) <= RTOL
    assert max_rel_diff(objective.rag_token_loss(logits, doc_scores, labels, **kwargs), expected_token) <= RTOL


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
@pytest.mark.parametrize("form", ["hf", "paper"])
def test_single_document_losses_agree(form, epsilon):
    logits, doc_scores, labels = make_inputs(50, 1)
    kwargs = {"pad_token_id": PAD, "epsilon": epsilon, "form": form}
    sequence = objective.rag_sequence_loss(logits, doc_scores, labels, bos_token_id=BOS, **kwargs)
    token = objective.rag_token_loss(logits, doc_scores, labels, **kwargs)
    plain = objective.seq2seq_nll(logits[:, 0], labels, **kwargs)
    np.testing.assert_allclose(sequence, plain, rtol=RTOL)
    np.testing.assert_allclose(token, plain, rtol=RTOL)


@pytest.mark.parametrize("form", ["hf", "paper"])
def test_one_token_targets(form):
    """hf: no scored position (token and seq2seq losses 0, RAG-Sequence -log K); paper: a real loss."""
    n_docs, epsilon = 3, 0.1
    logits, doc_scores, labels = make_inputs(60, n_docs)
    labels[:, 1:] = PAD
    kwargs = {"pad_token_id": PAD, "epsilon": epsilon, "form": form}
    sequence = objective.rag_sequence_loss(logits, doc_scores, labels, **kwargs)
    token = objective.rag_token_loss(logits, doc_scores, labels, **kwargs)
    plain = objective.seq2seq_nll(logits[:, 0], labels, **kwargs)
    if form == "hf":
        expected_sequence = -((1 - epsilon) + epsilon / V) * np.log(n_docs) * np.ones(B)
        np.testing.assert_allclose(sequence, expected_sequence, rtol=RTOL)
        np.testing.assert_array_equal(token, np.zeros(B))
        np.testing.assert_array_equal(plain, np.zeros(B))
    else:
        for loss in (sequence, token, plain):
            assert np.all(np.asarray(loss) > 1.0)


def test_paper_form_counts_the_prior_once():
    logits, doc_scores, labels = make_inputs(70, 3)
    kwargs = {"pad_token_id": PAD, "epsilon": 0.1, "form": "paper"}
    loss = objective.rag_sequence_loss(logits, doc_scores, labels, **kwargs)
    shifted = objective.rag_sequence_loss(logits, doc_scores + np.float32(4.0), labels, **kwargs)
    np.testing.assert_allclose(shifted, loss, rtol=RTOL)
    # One dominant document: the mixture is that document's seq2seq loss, whatever the target length.
    dominant = np.zeros_like(doc_scores)
    dominant[:, 1] = 1e3
    for fn in (objective.rag_sequence_loss, objective.rag_token_loss):
        np.testing.assert_allclose(
            fn(logits, dominant, labels, **kwargs), objective.seq2seq_nll(logits[:, 1], labels, **kwargs), rtol=RTOL
        )
    # Identical documents under a uniform prior: log K from the prior cancels against the logsumexp once.
    same_docs = np.repeat(logits[:, :1], 3, axis=1)
    np.testing.assert_allclose(
        objective.rag_sequence_loss(same_docs, np.zeros_like(doc_scores), labels, **{**kwargs, "epsilon": 0.0}),
        objective.seq2seq_nll(logits[:, 0], labels, **{**kwargs, "epsilon": 0.0}),
        rtol=RTOL,
    )


@pytest.mark.parametrize("form", ["hf", "paper"])
def test_ignore_index_labels_equal_pad_labels(form):
    logits, doc_scores, labels = make_inputs(80, 3)
    ignored = np.where(labels == PAD, objective.IGNORE_INDEX, labels)
    kwargs = {"pad_token_id": PAD, "epsilon": 0.1, "form": form}
    for fn in (objective.rag_sequence_loss, objective.rag_token_loss):
        np.testing.assert_array_equal(
            fn(logits, doc_scores, ignored, **kwargs), fn(logits, doc_scores, labels, **kwargs)
        )
    alignment = functools.partial(
        objective.decoder_inputs_and_targets, form=form, pad_token_id=PAD, decoder_start_token_id=EOS
    )
    for from_ignored, from_pad in zip(alignment(ignored), alignment(labels)):
        np.testing.assert_array_equal(from_ignored, from_pad)


def test_decoder_inputs_and_targets():
    labels = np.array([[5, 6, 7, PAD], [8, 9, PAD, PAD]])
    inputs, targets, mask = objective.decoder_inputs_and_targets(labels, form="hf", pad_token_id=PAD)
    np.testing.assert_array_equal(inputs, labels)
    np.testing.assert_array_equal(targets, [[6, 7, PAD, PAD], [9, PAD, PAD, PAD]])
    np.testing.assert_array_equal(mask, [[1, 1, 0, 0], [1, 0, 0, 0]])
    inputs, targets, mask = objective.decoder_inputs_and_targets(
        labels, form="paper", pad_token_id=PAD, decoder_start_token_id=EOS
    )
    np.testing.assert_array_equal(inputs, [[EOS, 5, 6, 7], [EOS, 8, 9, PAD]])
    np.testing.assert_array_equal(targets, labels)
    np.testing.assert_array_equal(mask, [[1, 1, 1, 0], [1, 1, 0, 0]])
    with pytest.raises(ValueError, match="decoder_start_token_id"):
        objective.decoder_inputs_and_targets(labels, form="paper", pad_token_id=PAD)


def test_bfloat16_logits_and_traced_epsilon():
    """bf16 logits are scored in float32; a traced epsilon gives the same loss as a static one."""
    logits, doc_scores, labels = make_inputs(90, 3)
    logits_bf16 = jnp.asarray(logits, jnp.bfloat16)
    kwargs = {"pad_token_id": PAD, "form": "paper"}
    for fn in (objective.rag_sequence_loss, objective.rag_token_loss):
        loss_bf16 = fn(logits_bf16, doc_scores, labels, epsilon=0.1, **kwargs)
        assert loss_bf16.dtype == jnp.float32
        loss_f32 = fn(logits_bf16.astype(jnp.float32), doc_scores, labels, epsilon=0.1, **kwargs)
        np.testing.assert_allclose(loss_bf16, loss_f32, rtol=1e-6)
        traced = jax.jit(lambda eps: fn(logits, doc_scores, labels, epsilon=eps, **kwargs))(jnp.float32(0.1))
        np.testing.assert_allclose(traced, fn(logits, doc_scores, labels, epsilon=0.1, **kwargs), rtol=RTOL)


def test_static_zero_epsilon_ignores_masked_vocabulary():
    """-inf logits (banned tokens) leave the epsilon = 0 loss and its gradients finite (no 0 * inf smoothing)."""
    logits, doc_scores, labels = make_inputs(100, 3)
    logits[..., V - 1] = -np.inf
    labels[labels == V - 1] = 3
    for fn in (objective.rag_sequence_loss, objective.rag_token_loss):
        loss_fn = functools.partial(fn, labels_BxT=labels, pad_token_id=PAD, reduce=True, form="paper")
        loss, grads = jax.value_and_grad(loss_fn, argnums=(0, 1))(logits, doc_scores)
        assert np.isfinite(loss) and all(np.all(np.isfinite(grad)) for grad in grads)


def test_prior_entropy_bounds():
    """0 nats when one document takes the mass, log K when the scores cannot tell documents apart."""
    scores_BxK = jnp.array([[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    entropy_B = np.asarray(objective.prior_entropy(scores_BxK))
    p = np.exp([1.0, 2.0, 3.0, 4.0]) / np.exp([1.0, 2.0, 3.0, 4.0]).sum()
    np.testing.assert_allclose(entropy_B, [np.log(4), 0.0, -(p * np.log(p)).sum()], atol=1e-6)
