"""The RAG training objective: pure functions over per-document generator logits.

Inputs are ``logits_BxKxTxV`` (one decoder pass per retrieved document; transformers' flattened
``B*K`` rows are document-fastest, so ``seq_logits.reshape(B, K, T, V)`` gives this layout),
``doc_scores_BxK`` (retrieval scores, not yet normalised) and ``labels_BxT``. Labels may be padded
with ``-100`` (the usual "ignore" value) as well as with ``pad_token_id``: ``-100`` is mapped to
the pad token first, so both mean "no token here".

Two alignment forms
-------------------
``"hf"`` reproduces ``RagSequenceForGeneration.get_nll`` / ``RagTokenForGeneration.get_nll``
(transformers 5.23) exactly:

* the decoder input is the label sequence itself; the target is the labels shifted LEFT with
  ``pad_token_id`` appended; target positions equal to the pad token are masked;
* RAG-Sequence adds the document log-prior at target position 1 only (so not at all when that
  position is padding or ``T == 1``); with ``exclude_bos_score`` and when EVERY row's first target
  is ``bos_token_id``, position 0 is left out of the log-likelihood (the smoothing term keeps it);
* quirk: a one-token target has no unmasked position, so RAG-Token gives it loss 0 and
  RAG-Sequence gives it ``-((1 - eps) + eps / V) * log K`` (a logsumexp over K zeros), i.e. 0 only
  for ``K == 1``.

``"paper"`` is the standard seq2seq alignment of Lewis et al. (2020):

* decoder input = labels shifted RIGHT behind ``decoder_start_token_id``; target = labels; pad
  positions masked;
* RAG-Sequence: ``log p(y|x) = logsumexp_z [log p(z|x) + sum_i log p(y_i | x, z, y_<i)]``: the
  prior is counted exactly once per sequence, whatever its length;
* RAG-Token: ``log p(y|x) = sum_i logsumexp_z [log p(z|x) + log p(y_i | x, z, y_<i)]``;
* ``exclude_bos_score`` has the same meaning as in ``"hf"`` (position 0 leaves the
  log-likelihood when every row's first target is BOS).

Label smoothing (both forms, fairseq-style as in transformers): ``loss = (1 - eps) * nll +
(eps / V) * smooth``, where ``smooth`` is ``nll`` with the target log-probability replaced by the
sum over the vocabulary of the log-probabilities at the same position:

* RAG-Token: ``smooth = -sum_i sum_v M[i, v]`` with the marginal
  ``M[i, v] = logsumexp_z [log p(z|x) + log p(v | x, z, y_<i)]``;
* RAG-Sequence: ``smooth = -logsumexp_z [c * V * log p(z|x) + sum_i sum_v log p(v | x, z, y_<i)]``,
  where ``c`` is 1 in ``"paper"`` form and, in ``"hf"`` form, 1 exactly when target position 1 is
  unmasked (transformers adds the prior to every vocabulary entry at that position);
* ``seq2seq_nll``: ``smooth = -sum_i sum_v log p(v | x, y_<i)``.

With ``K == 1`` all three losses coincide in both forms (in ``"hf"`` form only without
``exclude_bos_score``, which ``rag_token_loss`` and ``seq2seq_nll`` do not have). Losses are per
example ``[B]``, or their SUM with ``reduce=True`` (as transformers: there is no mean anywhere, so
values of 30-100 per batch are normal).

Which form for what
-------------------
``TRAINING_FORM`` ("paper") is the default for training: it counts the document prior once per
sequence, and it does not throw away one-token targets, which short factoid answers often are
(transformers' shift-left drops the first label, and a single-token answer then contributes nothing
and no gradient to the retriever). ``PARITY_FORM`` ("hf") is for checking against transformers and
for fine-tuning from recipes tuned with it. The functions default to ``PARITY_FORM``; callers that
train pass ``form=TRAINING_FORM`` (the model must build its decoder inputs with the same form,
through ``decoder_inputs_and_targets``). A ``LossSpec`` holds these settings for a whole loss
(``marginal_nll`` reads one; ``rag_jax.rag.model.per_example_loss`` composes the full loss from one).

Cost
----
The ``[B, K, T, V]`` logits are the largest activation; nothing here materialises log-probabilities
of that size beyond the one fused pass over the logits. RAG-Sequence and ``seq2seq_nll`` need only
``[B, K, T]`` statistics (log-normaliser, target log-probability and, when smoothing, the
vocabulary sum of log-probabilities ``sum_v logits - V * lse``); RAG-Token needs the ``[B, T, V]``
marginal only for the smoothing term, so when ``epsilon`` is a Python ``0`` (static) it is never
built and the target term comes from ``[B, K, T]`` values. Everything is computed in (at least)
float32 whatever the logits' dtype. A static ``epsilon == 0`` also keeps ``-inf`` logits (masked
vocabulary entries) from turning the unused smoothing term into ``0 * inf = nan``.
"""

import dataclasses
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

Form = Literal["hf", "paper"]
FORMS: tuple[Form, ...] = ("hf", "paper")

TRAINING_FORM: Form = "paper"
"""Alignment used for training: prior counted once, one-token targets kept (see module docstring)."""

PARITY_FORM: Form = "hf"
"""Alignment identical to transformers' ``get_nll``."""

IGNORE_INDEX = -100
"""Label value treated exactly like ``pad_token_id``."""

LossVariant = Literal["token", "sequence", "closed_book"]


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """Everything a loss computes besides its arrays (hashable: a static argument of jitted functions).

    ``variant``: RAG-Token or RAG-Sequence (``marginal_nll``), or the closed-book seq2seq baseline
    (``seq2seq_nll``). ``epsilon`` (label smoothing), ``exclude_bos_score`` (RAG-Sequence only) and
    ``form`` as in the loss functions; ``decoder_start_token_id`` is read by ``form="paper"`` only.
    """

    variant: LossVariant
    pad_token_id: int
    bos_token_id: int | None = None
    decoder_start_token_id: int | None = None
    epsilon: float = 0.0
    exclude_bos_score: bool = False
    form: Form = PARITY_FORM

    def __post_init__(self):
        if self.variant not in ("token", "sequence", "closed_book"):
            raise ValueError(f"variant={self.variant!r}: expected 'token', 'sequence' or 'closed_book'")
        if self.exclude_bos_score and self.variant == "token":
            raise ValueError("exclude_bos_score applies to RAG-Sequence only (as in transformers)")


def doc_log_prior(doc_scores_BxK: jax.Array) -> jax.Array:
    """``log p(z|x)``: log-softmax of the retrieval scores over the K documents, in float32 or wider."""
    return jax.nn.log_softmax(doc_scores_BxK.astype(_compute_dtype(doc_scores_BxK.dtype)), axis=-1)


def prior_entropy(doc_scores_BxK: jax.Array) -> jax.Array:
    """The entropy of ``p(z|x)`` over the K documents, in nats, per example ``[B]``: 0 when one
    document takes all the mass, ``log K`` when retrieval cannot tell them apart (a retrieval-collapse
    diagnostic)."""
    log_p_BxK = doc_log_prior(doc_scores_BxK)
    return -jnp.sum(jnp.exp(log_p_BxK) * log_p_BxK, axis=-1)


def targets_and_mask(labels_BxT: jax.Array, *, form: Form, pad_token_id: int) -> tuple[jax.Array, jax.Array]:
    """Loss targets ``[B, T]`` and the mask of scored positions (target != pad) for ``form``."""
    labels_BxT = _ignore_index_to_pad(labels_BxT, pad_token_id)
    if form == "hf":
        pad_Bx1 = jnp.full((labels_BxT.shape[0], 1), pad_token_id, labels_BxT.dtype)
        targets_BxT = jnp.concatenate([labels_BxT[:, 1:], pad_Bx1], axis=1)
    elif form == "paper":
        targets_BxT = labels_BxT
    else:
        raise ValueError(f"form must be 'hf' or 'paper', got {form!r}")
    return targets_BxT, targets_BxT != pad_token_id


def decoder_inputs_and_targets(
    labels_BxT: jax.Array, *, form: Form, pad_token_id: int, decoder_start_token_id: int | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(decoder_input_ids_BxT, targets_BxT, target_mask_BxT)`` for teacher forcing in ``form``.

    ``"hf"``: the decoder reads the labels themselves (``-100`` mapped to pad) and
    ``decoder_start_token_id`` is unused. ``"paper"``: the decoder reads the labels shifted right
    behind ``decoder_start_token_id`` (required).
    """
    targets_BxT, mask_BxT = targets_and_mask(labels_BxT, form=form, pad_token_id=pad_token_id)
    if form == "hf":
        return _ignore_index_to_pad(labels_BxT, pad_token_id), targets_BxT, mask_BxT
    if decoder_start_token_id is None:
        raise ValueError("form='paper' needs decoder_start_token_id")
    start_Bx1 = jnp.full((targets_BxT.shape[0], 1), decoder_start_token_id, targets_BxT.dtype)
    return jnp.concatenate([start_Bx1, targets_BxT[:, :-1]], axis=1), targets_BxT, mask_BxT


def marginal_log_probs(logits_BxKxTxV: jax.Array, doc_scores_BxK: jax.Array) -> jax.Array:
    """RAG-Token marginal ``M[b,t,v] = logsumexp_k(log_softmax(logits)[b,k,t,v] + log p(k|x))``, ``[B, T, V]``."""
    logits_BxKxTxV = logits_BxKxTxV.astype(_compute_dtype(logits_BxKxTxV.dtype))
    lse_BxKxTx1 = jax.nn.logsumexp(logits_BxKxTxV, axis=-1, keepdims=True)
    prior_BxKx1x1 = doc_log_prior(doc_scores_BxK)[:, :, None, None]
    return jax.nn.logsumexp(logits_BxKxTxV - lse_BxKxTx1 + prior_BxKx1x1, axis=1)


def rag_sequence_loss(
    logits_BxKxTxV: jax.Array,
    doc_scores_BxK: jax.Array,
    labels_BxT: jax.Array,
    *,
    pad_token_id: int,
    bos_token_id: int | None = None,
    epsilon: float | jax.Array = 0.0,
    exclude_bos_score: bool = False,
    reduce: bool = False,
    form: Form = PARITY_FORM,
) -> jax.Array:
    """RAG-Sequence negative log-likelihood (with label smoothing ``epsilon``): ``[B]``, or the sum if ``reduce``."""
    targets_BxT, mask_BxT = targets_and_mask(labels_BxT, form=form, pad_token_id=pad_token_id)
    smoothing = not _is_static_zero(epsilon)
    stats = _token_log_prob_stats(logits_BxKxTxV, targets_BxT, with_vocab_sum=smoothing)
    vocab_size = logits_BxKxTxV.shape[-1]

    if form == "hf":
        # transformers adds the prior at target position 1, where it is masked along with the token.
        prior_count_B = mask_BxT[:, 1] if mask_BxT.shape[1] > 1 else jnp.zeros(mask_BxT.shape[:1], bool)
    else:
        prior_count_B = jnp.ones(mask_BxT.shape[:1], bool)
    prior_BxK = jnp.where(prior_count_B[:, None], doc_log_prior(doc_scores_BxK), 0.0)

    scored_BxT = mask_BxT
    if exclude_bos_score:
        scored_BxT = mask_BxT & ~_first_position_is_all_bos(targets_BxT, bos_token_id)
    ll_BxK = jnp.sum(jnp.where(scored_BxT[:, None, :], stats.target_BxKxT, 0.0), axis=-1) + prior_BxK
    nll_B = -jax.nn.logsumexp(ll_BxK, axis=-1)
    if not smoothing:
        return _combine(nll_B, None, epsilon, vocab_size, reduce)
    smooth_BxK = jnp.sum(jnp.where(mask_BxT[:, None, :], stats.vocab_sum_BxKxT, 0.0), axis=-1)
    smooth_B = -jax.nn.logsumexp(smooth_BxK + vocab_size * prior_BxK, axis=-1)
    return _combine(nll_B, smooth_B, epsilon, vocab_size, reduce)


def rag_token_loss(
    logits_BxKxTxV: jax.Array,
    doc_scores_BxK: jax.Array,
    labels_BxT: jax.Array,
    *,
    pad_token_id: int,
    epsilon: float | jax.Array = 0.0,
    reduce: bool = False,
    form: Form = PARITY_FORM,
) -> jax.Array:
    """RAG-Token negative log-likelihood (with label smoothing ``epsilon``): ``[B]``, or the sum if ``reduce``."""
    targets_BxT, mask_BxT = targets_and_mask(labels_BxT, form=form, pad_token_id=pad_token_id)
    stats = _token_log_prob_stats(logits_BxKxTxV, targets_BxT, with_vocab_sum=False)
    prior_BxKx1 = doc_log_prior(doc_scores_BxK)[:, :, None]
    ll_BxT = jax.nn.logsumexp(stats.target_BxKxT + prior_BxKx1, axis=1)
    nll_B = -jnp.sum(jnp.where(mask_BxT, ll_BxT, 0.0), axis=-1)
    vocab_size = logits_BxKxTxV.shape[-1]
    if _is_static_zero(epsilon):
        return _combine(nll_B, None, epsilon, vocab_size, reduce)
    marginal_sum_BxT = jnp.sum(marginal_log_probs(logits_BxKxTxV, doc_scores_BxK), axis=-1)
    smooth_B = -jnp.sum(jnp.where(mask_BxT, marginal_sum_BxT, 0.0), axis=-1)
    return _combine(nll_B, smooth_B, epsilon, vocab_size, reduce)


def marginal_nll(
    spec: LossSpec, logits_BxKxTxV: jax.Array, doc_scores_BxK: jax.Array, labels_BxT: jax.Array
) -> jax.Array:
    """``spec``'s RAG loss per example ``[B]``: ``rag_token_loss`` or ``rag_sequence_loss`` with its settings."""
    if spec.variant == "token":
        return rag_token_loss(
            logits_BxKxTxV, doc_scores_BxK, labels_BxT,
            pad_token_id=spec.pad_token_id, epsilon=spec.epsilon, form=spec.form,
        )  # fmt: skip
    if spec.variant == "sequence":
        return rag_sequence_loss(
            logits_BxKxTxV, doc_scores_BxK, labels_BxT,
            pad_token_id=spec.pad_token_id, bos_token_id=spec.bos_token_id, epsilon=spec.epsilon,
            exclude_bos_score=spec.exclude_bos_score, form=spec.form,
        )  # fmt: skip
    raise ValueError(f"a {spec.variant!r} loss has no documents to marginalise over")


def seq2seq_nll(
    logits_BxTxV: jax.Array,
    labels_BxT: jax.Array,
    *,
    pad_token_id: int,
    epsilon: float | jax.Array = 0.0,
    reduce: bool = False,
    form: Form = PARITY_FORM,
) -> jax.Array:
    """Plain seq2seq negative log-likelihood (the closed-book, k = 0 baseline): ``[B]``, or the sum if ``reduce``.

    Same alignment forms and label smoothing as the RAG losses, which it equals for K = 1.
    """
    targets_BxT, mask_BxT = targets_and_mask(labels_BxT, form=form, pad_token_id=pad_token_id)
    smoothing = not _is_static_zero(epsilon)
    stats = _token_log_prob_stats(logits_BxTxV[:, None], targets_BxT, with_vocab_sum=smoothing)
    nll_B = -jnp.sum(jnp.where(mask_BxT, stats.target_BxKxT[:, 0], 0.0), axis=-1)
    vocab_size = logits_BxTxV.shape[-1]
    if not smoothing:
        return _combine(nll_B, None, epsilon, vocab_size, reduce)
    smooth_B = -jnp.sum(jnp.where(mask_BxT, stats.vocab_sum_BxKxT[:, 0], 0.0), axis=-1)
    return _combine(nll_B, smooth_B, epsilon, vocab_size, reduce)


class _TokenLogProbStats(NamedTuple):
    """Per-token reductions over the vocabulary of ``log_softmax(logits)``."""

    target_BxKxT: jax.Array  # log p(target)
    vocab_sum_BxKxT: jax.Array | None  # sum_v log p(v); None when not asked for


def _token_log_prob_stats(
    logits_BxKxTxV: jax.Array, targets_BxT: jax.Array, *, with_vocab_sum: bool
) -> _TokenLogProbStats:
    """Target log-probability and vocabulary sum of log-probabilities, without building log-probs ``[B,K,T,V]``.

    The logits are shifted by their (gradient-stopped) max over V, which leaves every result and
    gradient unchanged but keeps ``sum_v logits - V * lse`` free of cancellation. All reductions read
    the same logits, so XLA fuses them into passes over the logits with ``[B, K, T]`` outputs.
    """
    logits_BxKxTxV = logits_BxKxTxV.astype(_compute_dtype(logits_BxKxTxV.dtype))
    max_BxKxTx1 = jax.lax.stop_gradient(jnp.max(logits_BxKxTxV, axis=-1, keepdims=True))
    shifted_BxKxTxV = logits_BxKxTxV - max_BxKxTx1
    lse_BxKxT = jnp.log(jnp.sum(jnp.exp(shifted_BxKxTxV), axis=-1))
    vocab_1x1x1xV = jax.lax.broadcasted_iota(targets_BxT.dtype, (1, 1, 1, logits_BxKxTxV.shape[-1]), 3)
    is_target_BxKxTxV = targets_BxT[:, None, :, None] == vocab_1x1x1xV
    target_BxKxT = jnp.sum(jnp.where(is_target_BxKxTxV, shifted_BxKxTxV, 0.0), axis=-1) - lse_BxKxT
    if not with_vocab_sum:
        return _TokenLogProbStats(target_BxKxT, None)
    vocab_sum_BxKxT = jnp.sum(shifted_BxKxTxV, axis=-1) - logits_BxKxTxV.shape[-1] * lse_BxKxT
    return _TokenLogProbStats(target_BxKxT, vocab_sum_BxKxT)


def _ignore_index_to_pad(labels_BxT: jax.Array, pad_token_id: int) -> jax.Array:
    """Labels with every ``IGNORE_INDEX`` replaced by the pad token."""
    return jnp.where(labels_BxT == IGNORE_INDEX, pad_token_id, labels_BxT)


def _first_position_is_all_bos(targets_BxT: jax.Array, bos_token_id: int | None) -> jax.Array:
    """``[1, T]`` mask of position 0 when every row's first target is BOS (batch-wide, as transformers)."""
    is_first_1xT = jnp.arange(targets_BxT.shape[1])[None, :] == 0
    if bos_token_id is None:
        return jnp.zeros_like(is_first_1xT)
    return is_first_1xT & jnp.all(targets_BxT[:, 0] == bos_token_id)


def _combine(
    nll_B: jax.Array, smooth_B: jax.Array | None, epsilon: float | jax.Array, vocab_size: int, reduce: bool
) -> jax.Array:
    """``(1 - eps) * nll + (eps / V) * smooth`` per example, or summed over the batch if ``reduce``."""
    if smooth_B is None:
        return jnp.sum(nll_B) if reduce else nll_B
    loss_B = (1.0 - epsilon) * nll_B + (epsilon / vocab_size) * smooth_B
    return jnp.sum(loss_B) if reduce else loss_B


def _is_static_zero(epsilon: float | jax.Array) -> bool:
    """True when ``epsilon`` is a Python number equal to 0, so the smoothing term can be skipped at trace time."""
    return isinstance(epsilon, (int, float)) and epsilon == 0


def _compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """float32, or the input dtype when it is wider (float64 under x64)."""
    return jnp.promote_types(dtype, jnp.float32)
