"""Decoding: greedy and beam search with the BART KV cache, RAG-Token and RAG-Sequence generation.

Everything that runs per token is one ``jax.lax.while_loop`` inside one ``jax.jit`` program, batched
over all questions at once. Compiled programs are keyed on the array shapes and the (hashable, static)
``SearchOptions``, never on data values, so one program serves every batch of a padded shape bucket.

What is reproduced, and from where (transformers 5.23)
------------------------------------------------------
* Greedy search (``num_beams == 1``) is ``GenerationMixin._sample`` without sampling: the arg-max of the
  processed scores; a finished row is continued with ``pad_token_id``; the loop stops when every row
  has produced ``eos_token_id`` or the sequences reach ``max_length`` tokens (decoder start included).
* Beam search is the vectorised ``GenerationMixin._beam_search``: ``log_softmax`` of the scores, the
  logits processors, the top ``2 * num_beams`` continuations, the running / finished beam sets, the
  length penalty ``score / generated_length ** length_penalty``, ``early_stopping`` (``True``,
  ``False`` or ``"never"``) with transformers' stopping heuristic, and its ``-1e9`` bookkeeping.
* Logits processors, in transformers' order: ``bad_words_ids`` (an EOS-only entry is ignored),
  ``min_length`` (EOS banned while the sequence is shorter), ``forced_bos_token_id`` (forced as the
  second token), ``forced_eos_token_id`` (forced at position ``max_length - 1``).
* The step scores are what transformers searches over: RAG-Token uses the marginal
  ``M[v] = logsumexp_k(log_softmax(logits_k)[v] + log_softmax(doc_scores)[k])`` (greedy takes its
  arg-max, beam search its ``log_softmax``, as ``RagTokenForGeneration.generate`` does); plain BART
  uses the raw logits (greedy) or their ``log_softmax`` (beam search).
* Returned ids are shaped as transformers returns them: ``[B * num_return_sequences, W]`` where ``W``
  is the longest returned sequence, rows padded with ``pad_token_id``.

RAG-Sequence (``rag_sequence_search``)
--------------------------------------
Every (question, document) pair gets its own plain BART search (``num_beams`` beams, all of them
kept), so each question has ``C = K * num_beams`` candidates, ordered document-major as transformers
orders them. Exact duplicates (equal padded id rows) are merged. Then:

* ``decoding="thorough"`` (``RagSequenceForGeneration.generate``): every candidate is rescored with
  the RAG-Sequence loss over all K documents exactly as transformers' forward computes it
  (``form="hf"``, ``exclude_bos_score=True`` decided per question over its candidates, label
  smoothing ``epsilon`` from the RAG config), and the ``num_return_sequences`` best are returned.
  The encoder runs once; the rescoring reuses the cross-attention keys/values of the search.
* ``decoding="fast"`` (the paper's Fast Decoding, no extra forward pass): a candidate ``y`` found by
  the search on document ``z`` gets ``log p(y|x,z) ~=`` its search log-probability, which is the sum
  over its generated tokens of the processed per-token log-probabilities the search used (a forced
  BOS/EOS counts ``log 1 = 0``; no length penalty); under a document whose search did not produce it,
  ``p(y|x,z) = 0``. The candidate's score is ``logsumexp_z [log p(z|x) + log p(y|x,z)]`` over the
  documents that produced it.

If a question has fewer distinct candidates than ``num_return_sequences`` (transformers raises in
that case), the missing rows are all ``pad_token_id``.

A transformers quirk, reproduced only on request: ``RagSequenceForGeneration.generate`` runs the
candidate search as ``generator.generate(context_input_ids, attention_mask=None)``, and for an
encoder-decoder model ``generate`` (5.23) does not infer a mask from the padding, so its per-document
searches attend to the contexts' padding tokens (its rescoring does use the mask).
``mask_candidate_search=True`` (the default) masks padding in the searches too;
``mask_candidate_search=False`` reproduces transformers token for token on padded contexts. Both
agree when no context is padded.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from rag_jax.models.bart import Bart, DecodeCache, take_decoder_rows, with_decoder_rows
from rag_jax.models.configs import BartConfig
from rag_jax.rag import objective

NEG_SCORE = -1.0e9
"""transformers' "very large negative" beam score (masks beams without making them -inf)."""

HF_DEFAULT_NEW_TOKENS = 20
"""``GenerationConfig().max_length``; ``generate`` of a plain seq2seq model adds the decoder start to it."""

Decoding = Literal["thorough", "fast"]
StepFn = Callable[[jax.Array, DecodeCache], tuple[jax.Array, DecodeCache]]


@dataclasses.dataclass(frozen=True)
class SearchOptions:
    """Settings of one search (hashable: a static argument of the jitted programs).

    Lengths count the decoder start token, as transformers' ``max_length`` / ``min_length`` do.
    ``bad_words_ids`` is a tuple of token-id tuples.
    """

    max_length: int
    num_beams: int = 1
    min_length: int = 0
    length_penalty: float = 1.0
    early_stopping: bool | Literal["never"] = False
    num_return_sequences: int = 1
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    decoder_start_token_id: int = 2
    eos_token_id: int | None = 2
    pad_token_id: int = 1
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = None

    def check(self, vocab_size: int, max_positions: int, max_return_sequences: int | None = None) -> None:
        """Raise a ``ValueError`` naming the field when the options cannot be searched with.
        ``max_return_sequences`` defaults to ``num_beams`` (RAG-Sequence allows K * num_beams)."""
        if self.max_length < 2:
            raise ValueError(f"SearchOptions.max_length={self.max_length}: must be >= 2 (decoder start + 1 token)")
        if self.max_length > max_positions:
            raise ValueError(
                f"SearchOptions.max_length={self.max_length} exceeds the generator's "
                f"max_position_embeddings={max_positions}"
            )
        if self.num_beams < 1:
            raise ValueError(f"SearchOptions.num_beams={self.num_beams}: must be >= 1")
        most = self.num_beams if max_return_sequences is None else max_return_sequences
        if not 1 <= self.num_return_sequences <= most:
            raise ValueError(
                f"SearchOptions.num_return_sequences={self.num_return_sequences}: must be between 1 and {most} "
                f"(num_beams={self.num_beams}; a RAG-Token or BART search returns at most num_beams sequences)"
            )
        if self.early_stopping not in (True, False, "never"):
            raise ValueError(f"SearchOptions.early_stopping={self.early_stopping!r}: expected True, False or 'never'")
        tokens = {
            "decoder_start_token_id": self.decoder_start_token_id, "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id, "forced_bos_token_id": self.forced_bos_token_id,
            "forced_eos_token_id": self.forced_eos_token_id,
        }  # fmt: skip
        for name, token in tokens.items():
            if token is not None and not 0 <= token < vocab_size:
                raise ValueError(f"SearchOptions.{name}={token} is outside the vocabulary [0, {vocab_size})")
        for word in self.bad_words_ids:
            if not word or any(not 0 <= t < vocab_size for t in word):
                raise ValueError(f"SearchOptions.bad_words_ids: {word} is empty or outside [0, {vocab_size})")


TOKEN_FIELDS = ("decoder_start_token_id", "eos_token_id", "pad_token_id", "forced_bos_token_id", "forced_eos_token_id")


def default_options(
    generator_config: BartConfig,
    outer_config: dict | None = None,
    *,
    seq2seq_generate: bool,
    base: SearchOptions | None = None,
    **overrides,
) -> SearchOptions:
    """The options transformers would use, with ``overrides`` (``SearchOptions`` fields) on top.

    Special tokens come from ``generator_config``; for RAG-Token, non-None values of the same keys in
    the RAG config (``outer_config``) win, as ``RagTokenForGeneration.generation_config`` is built
    from the RAG config first. As transformers, a missing decoder start falls back to BOS and a
    missing pad to EOS. ``max_length`` defaults to 20 for RAG-Token (``RagTokenForGeneration.generate``
    takes ``GenerationConfig().max_length`` as is) and to 21 for a plain BART ``generate``
    (``seq2seq_generate``: RAG-Sequence's per-document searches and the closed-book baseline, where
    transformers adds the decoder start to the default 20 new tokens), capped at the position table.
    An override whose value is None keeps the default; start from ``base`` (e.g. a
    ``dataclasses.replace`` of these defaults) to set a token to None.
    """
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(SearchOptions)})
    if unknown:
        raise TypeError(
            f"unknown generation options {unknown}; known: {[f.name for f in dataclasses.fields(SearchOptions)]}"
        )
    if base is None:
        tokens = {name: getattr(generator_config, name) for name in TOKEN_FIELDS}
        if not seq2seq_generate:
            tokens.update({k: v for k, v in (outer_config or {}).items() if k in TOKEN_FIELDS and v is not None})
        if tokens["decoder_start_token_id"] is None:
            tokens["decoder_start_token_id"] = generator_config.bos_token_id
        if tokens["pad_token_id"] is None:
            tokens["pad_token_id"] = tokens["eos_token_id"]
        if seq2seq_generate:
            max_length = min(HF_DEFAULT_NEW_TOKENS + 1, generator_config.max_position_embeddings)
        else:
            max_length = HF_DEFAULT_NEW_TOKENS
        base = SearchOptions(max_length=max_length, **tokens)
    given = {k: v for k, v in overrides.items() if v is not None}
    if "bad_words_ids" in given:
        given["bad_words_ids"] = tuple(tuple(int(t) for t in word) for word in given["bad_words_ids"])
    return dataclasses.replace(base, **given)


class SearchResult(NamedTuple):
    """Per example, ``N`` hypotheses (``N = num_beams``; best first for beam search).

    ``sequences_BxNxL`` start with the decoder start token and are padded with ``pad_token_id``;
    ``lengths_BxN`` count their tokens (decoder start and EOS included); ``log_probs_BxN`` is the sum
    over generated tokens of the processed per-token log-probabilities (no length penalty).
    """

    sequences_BxNxL: jax.Array
    lengths_BxN: jax.Array
    log_probs_BxN: jax.Array


# ------------------------------------------------------------------------------------------------
# Logits processors and the two searches (model-agnostic: the model enters through ``step_fn``)


def process_scores(scores_RxV: jax.Array, sequences_RxL: jax.Array, cur_len: jax.Array, options: SearchOptions):
    """transformers' logits processors for the next token of sequences that hold ``cur_len`` tokens."""
    vocab_1xV = jnp.arange(scores_RxV.shape[-1])[None, :]
    eos = options.eos_token_id
    for word in options.bad_words_ids:
        if len(word) == 1 and word[0] == eos:
            continue  # transformers never bans EOS on its own
        prefix = len(word) - 1
        if prefix == 0:
            banned_RxV = jnp.broadcast_to(vocab_1xV == word[0], scores_RxV.shape)
        else:
            tail_RxP = jax.lax.dynamic_slice_in_dim(sequences_RxL, jnp.maximum(cur_len - prefix, 0), prefix, axis=1)
            match_R = jnp.all(tail_RxP == jnp.asarray(word[:-1])[None, :], axis=1) & (cur_len >= prefix)
            banned_RxV = match_R[:, None] & (vocab_1xV == word[-1])
        scores_RxV = jnp.where(banned_RxV, -jnp.inf, scores_RxV)
    if options.min_length > 0 and eos is not None:
        scores_RxV = jnp.where((cur_len < options.min_length) & (vocab_1xV == eos), -jnp.inf, scores_RxV)
    for token, position in ((options.forced_bos_token_id, 1), (options.forced_eos_token_id, options.max_length - 1)):
        if token is not None:
            forced_1xV = jnp.where(vocab_1xV == token, 0.0, -jnp.inf)
            scores_RxV = jnp.where(cur_len == position, forced_1xV, scores_RxV)
    return scores_RxV


def _first_tokens(batch_shape: tuple[int, ...], options: SearchOptions) -> jax.Array:
    """``[*batch_shape, L]`` ids: the decoder start token, then padding."""
    ids = jnp.full((*batch_shape, options.max_length), options.pad_token_id, jnp.int32)
    return ids.at[..., 0].set(options.decoder_start_token_id)


def greedy_search(step_fn: StepFn, cache: DecodeCache, batch_size: int, options: SearchOptions) -> SearchResult:
    """Arg-max decoding of ``batch_size`` rows; ``step_fn(last_tokens_R, cache) -> (scores_RxV, cache)``."""
    eos, length = options.eos_token_id, options.max_length

    def cond(carry):
        cur_len, _, unfinished_B, *_ = carry
        return (cur_len < length) & jnp.any(unfinished_B)

    def body(carry):
        cur_len, seq_BxL, unfinished_B, lengths_B, log_probs_B, cache = carry
        scores_BxV, cache = step_fn(jax.lax.dynamic_index_in_dim(seq_BxL, cur_len - 1, 1, keepdims=False), cache)
        token_B = jnp.argmax(process_scores(scores_BxV, seq_BxL, cur_len, options), axis=-1).astype(jnp.int32)
        token_B = jnp.where(unfinished_B, token_B, options.pad_token_id)
        log_probs_BxV = process_scores(jax.nn.log_softmax(scores_BxV, axis=-1), seq_BxL, cur_len, options)
        token_log_prob_B = jnp.take_along_axis(log_probs_BxV, token_B[:, None], axis=1)[:, 0]
        log_probs_B = log_probs_B + jnp.where(unfinished_B, token_log_prob_B, 0.0)
        lengths_B = jnp.where(unfinished_B, cur_len + 1, lengths_B)
        if eos is not None:
            unfinished_B = unfinished_B & (token_B != eos)
        seq_BxL = jax.lax.dynamic_update_slice_in_dim(seq_BxL, token_B[:, None], cur_len, axis=1)
        return cur_len + 1, seq_BxL, unfinished_B, lengths_B, log_probs_B, cache

    b = batch_size
    init = (jnp.int32(1), _first_tokens((b,), options), jnp.ones((b,), bool), jnp.ones((b,), jnp.int32),
            jnp.zeros((b,), jnp.float32), cache)  # fmt: skip
    _, seq_BxL, _, lengths_B, log_probs_B, _ = jax.lax.while_loop(cond, body, init)
    return SearchResult(seq_BxL[:, None], lengths_B[:, None], log_probs_B[:, None])


class _BeamState(NamedTuple):
    cur_len: jax.Array
    running_BxNxL: jax.Array  # live hypotheses
    running_scores_BxN: jax.Array  # their accumulated log-probabilities
    finished_BxNxL: jax.Array  # best finished hypotheses (transformers' `sequences`)
    finished_scores_BxN: jax.Array  # length-penalised (transformers' `beam_scores`)
    finished_log_probs_BxN: jax.Array
    finished_lengths_BxN: jax.Array
    is_finished_BxN: jax.Array
    can_improve_Bx1: jax.Array  # transformers' `is_early_stop_heuristic_unsatisfied`
    done: jax.Array
    cache: DecodeCache


def _gather_beams(x_BxNx___: jax.Array, index_BxM: jax.Array) -> jax.Array:
    index = index_BxM.reshape(index_BxM.shape + (1,) * (x_BxNx___.ndim - 2))
    return jnp.take_along_axis(x_BxNx___, index, axis=1)


def _penalty_table(options: SearchOptions) -> jax.Array:
    """``n ** length_penalty`` for n = 0..max_length, in float64 then rounded to float32 (as torch divides
    a float32 tensor by a Python float)."""
    table = [1.0] + [n**options.length_penalty for n in range(1, options.max_length + 1)]
    return jnp.asarray(np.asarray(table, np.float32))


def beam_search(
    step_fn: StepFn,
    reorder_fn: Callable[[DecodeCache, jax.Array], DecodeCache],
    cache: DecodeCache,
    batch_size: int,
    vocab_size: int,
    options: SearchOptions,
) -> SearchResult:
    """transformers' vectorised beam search over ``batch_size`` examples of ``num_beams`` rows each.

    ``step_fn(last_tokens_R, cache) -> (scores_RxV, cache)`` with rows ``R = B * N`` (example-major);
    ``reorder_fn(cache, source_beam_BxN)`` makes row ``(b, n)`` continue from beam ``source[b, n]``.
    """
    b, n, length, v = batch_size, options.num_beams, options.max_length, vocab_size
    eos, early_stopping = options.eos_token_id, options.early_stopping
    keep = 2 * n  # transformers keeps max(2, 1 + number of EOS ids) * num_beams continuations
    is_top_n_1x2N = (jnp.arange(keep) < n)[None, :]
    penalty_M = _penalty_table(options)
    neg = jnp.float32(NEG_SCORE)

    def body(s: _BeamState) -> _BeamState:
        cur_len = s.cur_len
        last_R = jax.lax.dynamic_index_in_dim(s.running_BxNxL, cur_len - 1, 2, keepdims=False).reshape(b * n)
        scores_RxV, cache = step_fn(last_R, s.cache)
        log_probs_RxV = jax.nn.log_softmax(scores_RxV, axis=-1)
        log_probs_RxV = process_scores(log_probs_RxV, s.running_BxNxL.reshape(b * n, length), cur_len, options)
        total_BxNV = (log_probs_RxV.reshape(b, n, v) + s.running_scores_BxN[:, :, None]).reshape(b, n * v)

        # the best 2N continuations over all beams of an example
        top_log_probs_Bx2N, top_index_Bx2N = jax.lax.top_k(total_BxNV, keep)
        source_Bx2N, token_Bx2N = top_index_Bx2N // v, (top_index_Bx2N % v).astype(jnp.int32)
        top_seq_Bx2NxL = _gather_beams(s.running_BxNxL, source_Bx2N)
        top_seq_Bx2NxL = jax.lax.dynamic_update_slice_in_dim(top_seq_Bx2NxL, token_Bx2N[:, :, None], cur_len, axis=2)
        hits_Bx2N = jnp.broadcast_to(cur_len + 1 >= length, token_Bx2N.shape)
        if eos is not None:
            hits_Bx2N = hits_Bx2N | (token_Bx2N == eos)

        # the N best that did not stop run on
        running_log_probs_Bx2N = top_log_probs_Bx2N + jnp.where(hits_Bx2N, neg, 0.0)
        _, next_BxN = jax.lax.top_k(running_log_probs_Bx2N, n)
        running_BxNxL = _gather_beams(top_seq_Bx2NxL, next_BxN)
        running_scores_BxN = _gather_beams(running_log_probs_Bx2N, next_BxN)
        cache = reorder_fn(cache, _gather_beams(source_Bx2N, next_BxN))

        # those of the top N that stopped compete with the finished ones
        just_finished_Bx2N = hits_Bx2N & is_top_n_1x2N
        candidate_scores_Bx2N = top_log_probs_Bx2N / penalty_M[cur_len]
        if early_stopping is True:
            candidate_scores_Bx2N += jnp.where(jnp.all(s.is_finished_BxN, axis=1, keepdims=True), neg, 0.0)
        candidate_scores_Bx2N += jnp.where(s.can_improve_Bx1, 0.0, neg)
        candidate_scores_Bx2N += jnp.where(just_finished_Bx2N, 0.0, neg)
        merged_scores = jnp.concatenate([s.finished_scores_BxN, candidate_scores_Bx2N], axis=1)
        _, best_BxN = jax.lax.top_k(merged_scores, n)

        def merge(finished, candidates):
            return _gather_beams(jnp.concatenate([finished, candidates], axis=1), best_BxN)

        finished_scores_BxN = _gather_beams(merged_scores, best_BxN)
        is_finished_BxN = merge(s.is_finished_BxN, just_finished_Bx2N)

        # transformers' stopping heuristic and loop condition
        cur_len = cur_len + 1
        best_length = length - 1 if early_stopping == "never" and options.length_penalty > 0.0 else cur_len - 1
        best_possible_Bx1 = running_scores_BxN[:, :1] / penalty_M[best_length]
        worst_finished_BxN = jnp.where(
            is_finished_BxN, jnp.min(finished_scores_BxN, axis=1, keepdims=True), jnp.float32(-1.0e9)
        )
        can_improve_Bx1 = s.can_improve_Bx1 & jnp.any(best_possible_Bx1 > worst_finished_BxN, axis=-1, keepdims=True)
        go_on = jnp.any(can_improve_Bx1) & ~jnp.all(hits_Bx2N)
        if early_stopping is True:
            go_on = go_on & ~jnp.all(is_finished_BxN)
        return _BeamState(
            cur_len=cur_len,
            running_BxNxL=running_BxNxL,
            running_scores_BxN=running_scores_BxN,
            finished_BxNxL=merge(s.finished_BxNxL, top_seq_Bx2NxL),
            finished_scores_BxN=finished_scores_BxN,
            finished_log_probs_BxN=merge(s.finished_log_probs_BxN, top_log_probs_Bx2N),
            finished_lengths_BxN=merge(s.finished_lengths_BxN, jnp.broadcast_to(cur_len, (b, keep))),
            is_finished_BxN=is_finished_BxN,
            can_improve_Bx1=can_improve_Bx1,
            done=~go_on,
            cache=cache,
        )

    first_BxNxL = _first_tokens((b, n), options)
    init = _BeamState(
        cur_len=jnp.int32(1),
        running_BxNxL=first_BxNxL,
        running_scores_BxN=jnp.zeros((b, n), jnp.float32).at[:, 1:].set(neg),  # only beam 0 starts
        finished_BxNxL=first_BxNxL,
        finished_scores_BxN=jnp.full((b, n), neg),
        finished_log_probs_BxN=jnp.full((b, n), neg),
        finished_lengths_BxN=jnp.ones((b, n), jnp.int32),
        is_finished_BxN=jnp.zeros((b, n), bool),
        can_improve_Bx1=jnp.ones((b, 1), bool),
        done=jnp.bool_(False),
        cache=cache,
    )
    final = jax.lax.while_loop(lambda s: ~s.done, body, init)
    return SearchResult(final.finished_BxNxL, final.finished_lengths_BxN, final.finished_log_probs_BxN)


# ------------------------------------------------------------------------------------------------
# The BART side: cache rows, the per-token step, beam reordering


def _reorder_beams(cache: DecodeCache, source_BxN: jax.Array, n_docs: int) -> DecodeCache:
    """Rows ``(b, k, n)`` continue the self-attention state of rows ``(b, k, source[b, n])``: every
    (question, document) group of N beam rows is reordered alike, within itself.

    Only the self-attention keys/values move: the cross-attention state is per (b, k), shared by the
    beams (see ``with_decoder_rows``).
    """
    return take_decoder_rows(cache, jnp.repeat(source_BxN, n_docs, axis=0))


def _step_fn(model: Bart, n_docs: int, num_beams: int, doc_scores_BxK: jax.Array | None) -> StepFn:
    """One decoder step for the search rows ``(b, n)``, each backed by ``n_docs`` cache rows ``(b, k, n)``.

    With ``doc_scores`` the step returns the RAG-Token marginal log-probabilities ``[B * N, V]``; without
    (``n_docs == 1``) the raw BART logits.
    """

    def step(last_tokens_R: jax.Array, cache: DecodeCache):
        last_tokens_Bx1xN = last_tokens_R.reshape(-1, 1, num_beams)
        b = last_tokens_Bx1xN.shape[0]
        ids_Rx1 = jnp.broadcast_to(last_tokens_Bx1xN, (b, n_docs, num_beams)).reshape(-1, 1)
        logits_Rx1xV, cache = model.decode(ids_Rx1, None, None, cache=cache)
        logits_BxKxNxV = logits_Rx1xV.reshape(b, n_docs, num_beams, -1)
        if doc_scores_BxK is None:
            scores_BxNxV = logits_BxKxNxV[:, 0]
        else:  # the beam axis stands where marginal_log_probs has the target positions
            scores_BxNxV = objective.marginal_log_probs(logits_BxKxNxV, doc_scores_BxK)
        return scores_BxNxV.reshape(b * num_beams, -1), cache

    return step


def _encode(model: Bart, ids_NxS: jax.Array, mask_NxS: jax.Array) -> DecodeCache:
    """The encoder pass, once, as a cache holding every layer's cross-attention keys/values."""
    return model.init_cache(model.encode(ids_NxS, mask_NxS), mask_NxS, max_length=0)


def _search(model: Bart, base: DecodeCache, n_examples: int, n_docs: int, doc_scores_BxK, options) -> SearchResult:
    """Greedy or beam search for ``n_examples`` examples whose ``n_docs`` documents are base-cache rows
    ``b * n_docs + k``; marginalised over the documents (RAG-Token) when ``doc_scores`` is given."""
    n = options.num_beams
    cache = with_decoder_rows(base, n, options.max_length - 1)
    step = _step_fn(model, n_docs, n, doc_scores_BxK)
    if n == 1:
        return greedy_search(step, cache, n_examples, options)
    reorder = functools.partial(_reorder_beams, n_docs=n_docs)
    return beam_search(step, reorder, cache, n_examples, model.config.vocab_size, options)


# ------------------------------------------------------------------------------------------------
# The jitted programs


@functools.partial(jax.jit, static_argnames=("options",))
def rag_token_search(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    context_input_ids_BxKxS: jax.Array,
    context_attention_mask_BxKxS: jax.Array,
    doc_scores_BxK: jax.Array | None,
    options: SearchOptions,
) -> SearchResult:
    """RAG-Token greedy / beam search (``RagTokenForGeneration.generate``), or with ``doc_scores=None``
    and K = 1 plain BART generation (``BartForConditionalGeneration.generate``)."""
    model = nnx.merge(graphdef, state)
    b, k, s = context_input_ids_BxKxS.shape
    if doc_scores_BxK is None and k != 1:
        raise ValueError(f"plain BART generation takes one input per example, got K={k} (doc_scores is None)")
    base = _encode(model, context_input_ids_BxKxS.reshape(b * k, s), context_attention_mask_BxKxS.reshape(b * k, s))
    return _search(model, base, b, k, doc_scores_BxK, options)


class SequenceResult(NamedTuple):
    """RAG-Sequence output: ``sequences_BxRxL`` (R = num_return_sequences, best first, rows without a
    candidate all padding) and ``candidate_lengths_BxC`` (transformers' output width is their max)."""

    sequences_BxRxL: jax.Array
    candidate_lengths_BxC: jax.Array


def _duplicates(candidates_BxCxL: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``same_BxCxC`` (candidate i equals candidate j) and ``first_BxC`` (i is the first of its kind)."""
    same_BxCxC = jnp.all(candidates_BxCxL[:, :, None, :] == candidates_BxCxL[:, None, :, :], axis=-1)
    c = candidates_BxCxL.shape[1]
    earlier_CxC = jnp.arange(c)[None, :] < jnp.arange(c)[:, None]
    return same_BxCxC, ~jnp.any(same_BxCxC & earlier_CxC[None], axis=-1)


def _fast_scores(search: SearchResult, same_BxCxC, doc_scores_BxK) -> jax.Array:
    """``log p(y|x) ~= logsumexp over the documents whose search produced y of log p(z|x) + log p(y|x,z)``."""
    b, k = doc_scores_BxK.shape
    n = search.log_probs_BxN.shape[1]
    joint_BxC = search.log_probs_BxN.reshape(b, k, n) + objective.doc_log_prior(doc_scores_BxK)[:, :, None]
    joint_BxC = joint_BxC.reshape(b, k * n)
    return jax.nn.logsumexp(jnp.where(same_BxCxC, joint_BxC[:, None, :], -jnp.inf), axis=-1)


def _rescoring_chunk(
    n_candidates: int, n_rows: int, length: int, vocab: int, most: int, budget_bytes: int = 2**28
) -> int:
    """Candidates rescored per pass: the largest divisor of C, at most ``most``, whose float32 logits fit in
    ``budget_bytes``."""
    fits = [
        c
        for c in range(1, min(most, n_candidates) + 1)
        if n_candidates % c == 0 and c * n_rows * length * vocab * 4 <= budget_bytes
    ]
    return max(fits, default=1)


def _thorough_scores(
    model, base, candidates_BxCxL, doc_scores_BxK, n_live, *, chunk_limit, pad_token_id, bos_token_id, epsilon
):
    """``-loss`` of every candidate: ``RagSequenceForGeneration``'s forward with the candidate as labels over
    the question's K documents (``exclude_bos_score=True`` when every candidate of the question has BOS
    as its first target), computed in passes over chunks of at most ``chunk_limit`` candidates. Passes
    that hold only candidates ``>= n_live`` (an int32 scalar) are skipped: those candidates score -inf.

    The loss is ``rag_jax.rag.objective.marginal_nll``, the objective of ``rag_jax.rag.model.per_example_loss``;
    the rest of that composition does not apply here: the logits come from decoding against the search's
    cached encoder states (the encoder runs once, not once per candidate), and ``exclude_bos_score`` is
    decided per question over its candidates, as transformers scores each question's candidates as one batch."""
    b, c, length = candidates_BxCxL.shape
    k = doc_scores_BxK.shape[1]
    chunk = _rescoring_chunk(c, b * k, length, model.config.vocab_size, chunk_limit)
    cache = with_decoder_rows(base, chunk, length)  # rows (b, k, c)
    with_bos = objective.LossSpec(
        "sequence", pad_token_id=pad_token_id, bos_token_id=bos_token_id, epsilon=epsilon, form=objective.PARITY_FORM
    )
    specs = (with_bos, dataclasses.replace(with_bos, exclude_bos_score=True))

    def per_question(spec):
        """The loss of every candidate under ``spec``: over the question's candidates (axis 1 of the
        ``[B, K, c, L, V]`` logits), then over the questions."""

        def loss_one_candidate(logits_KxLxV, scores_K, labels_L):
            return objective.marginal_nll(spec, logits_KxLxV[None], scores_K[None], labels_L[None])[0]

        return jax.vmap(jax.vmap(loss_one_candidate, in_axes=(1, None, 0)))

    def losses(labels_cxBxL):
        labels_BxcxL = labels_cxBxL.transpose(1, 0, 2)
        labels_RxL = jnp.broadcast_to(labels_BxcxL[:, None], (b, k, chunk, length)).reshape(-1, length)
        logits_RxLxV, _ = model.decode(labels_RxL, None, None, cache=cache)
        logits_BxKxcxLxV = logits_RxLxV.reshape(b, k, chunk, length, -1)
        return tuple(per_question(spec)(logits_BxKxcxLxV, doc_scores_BxK, labels_BxcxL).T for spec in specs)

    def losses_unless_dead(start_and_labels):
        start, labels_cxBxL = start_and_labels
        dead = jnp.full((chunk, b), jnp.inf, jnp.float32)
        return jax.lax.cond(start < n_live, losses, lambda _: (dead, dead), labels_cxBxL)

    labels_PxcxBxL = candidates_BxCxL.transpose(1, 0, 2).reshape(c // chunk, chunk, b, length)
    starts_P = jnp.arange(c // chunk, dtype=jnp.int32) * chunk
    with_bos_PxcxB, without_bos_PxcxB = jax.lax.map(losses_unless_dead, (starts_P, labels_PxcxBxL))
    with_bos_BxC, without_bos_BxC = (x.reshape(c, b).T for x in (with_bos_PxcxB, without_bos_PxcxB))
    exclude_B = jnp.zeros((b,), bool)
    if bos_token_id is not None:
        exclude_B = jnp.all(candidates_BxCxL[:, :, 1] == bos_token_id, axis=1)
    return -jnp.where(exclude_B[:, None], without_bos_BxC, with_bos_BxC)


@functools.partial(
    jax.jit,
    static_argnames=(
        "options",
        "decoding",
        "pad_token_id",
        "bos_token_id",
        "epsilon",
        "do_deduplication",
        "mask_candidate_search",
    ),
)
def rag_sequence_search(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    context_input_ids_BxKxS: jax.Array,
    context_attention_mask_BxKxS: jax.Array,
    doc_scores_BxK: jax.Array,
    options: SearchOptions,
    decoding: Decoding = "thorough",
    *,
    pad_token_id: int,
    bos_token_id: int | None,
    epsilon: float = 0.0,
    do_deduplication: bool = True,
    mask_candidate_search: bool = True,
) -> SequenceResult:
    """RAG-Sequence decoding (see the module docstring). ``options`` drive every per-document search
    (all ``num_beams`` hypotheses kept) and ``options.num_return_sequences`` picks the final count;
    ``pad_token_id`` / ``bos_token_id`` / ``epsilon`` are the rescoring loss's (RAG config)."""
    model = nnx.merge(graphdef, state)
    b, k, s = context_input_ids_BxKxS.shape
    ids_NxS, mask_NxS = context_input_ids_BxKxS.reshape(b * k, s), context_attention_mask_BxKxS.reshape(b * k, s)
    base = _encode(model, ids_NxS, mask_NxS)
    search_base = base if mask_candidate_search else _encode(model, ids_NxS, jnp.ones_like(mask_NxS))
    per_doc = _search(model, search_base, b * k, 1, None, options)
    c = k * options.num_beams
    candidates_BxCxL = per_doc.sequences_BxNxL.reshape(b, c, options.max_length)
    same_BxCxC, first_BxC = _duplicates(candidates_BxCxL)
    if decoding == "fast":
        scores_BxC = jnp.where(first_BxC, _fast_scores(per_doc, same_BxCxC, doc_scores_BxK), -jnp.inf)
    elif decoding == "thorough":
        n_live, chunk_limit = jnp.int32(c), c
        if do_deduplication:  # distinct candidates first (in order), so passes over duplicates only are skipped
            order_BxC = jnp.argsort(jnp.where(first_BxC, 0, 1), axis=1, stable=True)
            candidates_BxCxL = _gather_beams(candidates_BxCxL, order_BxC)
            first_BxC = _gather_beams(first_BxC, order_BxC)
            n_live, chunk_limit = jnp.max(jnp.sum(first_BxC, axis=1, dtype=jnp.int32)), options.num_beams
        scores_BxC = _thorough_scores(
            model, base, candidates_BxCxL, doc_scores_BxK, n_live, chunk_limit=chunk_limit,
            pad_token_id=pad_token_id, bos_token_id=bos_token_id, epsilon=epsilon,
        )  # fmt: skip
        if do_deduplication:
            scores_BxC = jnp.where(first_BxC, scores_BxC, -jnp.inf)
    else:
        raise ValueError(f"decoding={decoding!r}: expected 'thorough' or 'fast'")
    best_scores_BxR, best_BxR = jax.lax.top_k(scores_BxC, options.num_return_sequences)
    best_BxRxL = _gather_beams(candidates_BxCxL, best_BxR)
    best_BxRxL = jnp.where(jnp.isneginf(best_scores_BxR)[:, :, None], options.pad_token_id, best_BxRxL)
    return SequenceResult(best_BxRxL, per_doc.lengths_BxN.reshape(b, c))


# ------------------------------------------------------------------------------------------------
# Host side


def as_dtype(x, dtype) -> np.ndarray | jax.Array:
    """``x`` as ``dtype``: host data converted on the host (NumPy), device arrays on the device; an
    eager ``jnp.asarray(x, dtype)`` of host data would cost a dispatch per call."""
    if isinstance(x, jax.Array):
        return x if x.dtype == dtype else x.astype(dtype)
    return np.asarray(x, dtype)


def host_array(x) -> np.ndarray:
    """``x`` whole on the host. A global array spread over several processes (decoding a batch sharded
    over a multi-host mesh) is gathered from all of them, so every process must call this together."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def hf_layout(sequences_BxNxL, lengths_BxN, r: int | None = None) -> np.ndarray:
    """``[B * R, W]`` int32 ids as transformers returns them, from the first ``r`` (default all N)
    sequences of every example: W = the largest of their lengths. Sliced on the host (an eager slice of
    a device array costs a dispatch)."""
    sequences_BxRxL, lengths_BxR = host_array(sequences_BxNxL)[:, :r], host_array(lengths_BxN)[:, :r]
    width = int(np.max(lengths_BxR))
    b, r, _ = sequences_BxRxL.shape
    return sequences_BxRxL[:, :, :width].reshape(b * r, width)


def generate_seq2seq(
    generator,
    input_ids,
    attention_mask,
    *,
    num_beams: int = 1,
    max_length: int | None = None,
    num_return_sequences: int = 1,
    options: SearchOptions | None = None,
    **overrides,
) -> np.ndarray:
    """Plain BART generation from ``input_ids`` ``[B, S]`` (the paper's closed-book baseline), equal to
    ``BartForConditionalGeneration.generate(input_ids, attention_mask=..., num_beams=..., max_length=...)``.

    ``generator`` is a ``rag_jax.Generator``; the search is the RAG-Token one with one document per
    example and no marginalisation (so the step scores are the raw logits, as transformers'). Returns
    ``[B * num_return_sequences, W]`` int32 ids. Other ``SearchOptions`` fields go in ``overrides``.
    """
    opts = default_options(
        generator.config, seq2seq_generate=True, base=options, num_beams=num_beams, max_length=max_length,
        num_return_sequences=num_return_sequences, **overrides,
    )  # fmt: skip
    opts.check(generator.config.vocab_size, generator.config.max_position_embeddings)
    ids_Bx1xS, mask_Bx1xS = (as_dtype(x, np.int32)[:, None] for x in (input_ids, attention_mask))
    result = rag_token_search(*generator.decode_split(), ids_Bx1xS, mask_Bx1xS, None, opts)
    return hf_layout(result.sequences_BxNxL, result.lengths_BxN, opts.num_return_sequences)
