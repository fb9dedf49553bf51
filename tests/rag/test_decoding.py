"""Decoding against transformers' generate: RAG-Token greedy / beam search, RAG-Sequence thorough,
plain BART (closed-book); the KV-cached loop against a full recompute; fast decoding's properties;
one compiled program per shape bucket."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from tiny_models import VOCAB, tiny_rag

import rag_jax
from rag_jax.rag import decoding, objective
from rag_jax.rag.model import per_doc_logits

K, S, MAX_LEN = 4, 9, 10
PAD, EOS = 1, 2


def _biased_rag(variant: str, seed: int):
    """A tiny random RAG model whose EOS logit is raised, so hypotheses end at many different lengths
    (plain random models repeat one token up to max_length)."""
    model = tiny_rag(variant, seed=seed, n_docs=K, init_std=0.3)
    with torch.no_grad():
        bias = model.rag.generator.final_logits_bias
        bias.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(seed))
        bias[0, EOS] += 1.5
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(variant, seed) -> (torch model, rag_jax model loaded from its saved folder)."""
    cache = {}

    def get(variant: str, seed: int):
        if (variant, seed) not in cache:
            torch_model = _biased_rag(variant, seed)
            folder = tmp_path_factory.mktemp(f"rag_{variant}_{seed}")
            torch_model.save_pretrained(folder)
            cache[variant, seed] = torch_model, rag_jax.load_rag(folder)
        return cache[variant, seed]

    return get


def _contexts(batch: int, seed: int, padded: bool = True):
    """Right-padded contexts ``[B * K, S]`` (document fastest), their mask and doc scores ``[B, K]``."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, size=(batch * K, S))
    lengths = rng.integers(4, S + 1, size=batch * K) if padded else np.full(batch * K, S)
    mask = (np.arange(S)[None, :] < lengths[:, None]).astype(np.int64)
    ids[mask == 0] = PAD
    return ids, mask, (rng.normal(size=(batch, K)) * 2).astype(np.float32)


def _hf_generate(torch_model, ids, mask, doc_scores, **kwargs) -> np.ndarray:
    with torch.no_grad():
        out = torch_model.generate(
            context_input_ids=torch.tensor(ids), context_attention_mask=torch.tensor(mask),
            doc_scores=torch.tensor(doc_scores), n_docs=K, **kwargs,
        )  # fmt: skip
    return out.numpy()


def _assert_same_ids(ours: np.ndarray, theirs: np.ndarray):
    assert ours.shape == theirs.shape, f"shape {ours.shape} != transformers' {theirs.shape}\n{ours}\n{theirs}"
    np.testing.assert_array_equal(ours, theirs)


# ------------------------------------------------------------------------------------------------
# RAG-Token


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("num_beams", [1, 4])
def test_rag_token_matches_transformers(models, seed, batch, num_beams):
    torch_model, model = models("token", seed)
    ids, mask, doc_scores = _contexts(batch, seed=10 * seed + batch)
    expected = _hf_generate(torch_model, ids, mask, doc_scores, num_beams=num_beams, max_length=MAX_LEN)
    ours = model.generate(ids, mask, doc_scores, n_docs=K, num_beams=num_beams, max_length=MAX_LEN)
    _assert_same_ids(ours, expected)


def test_models_end_at_many_lengths(models):
    """Guard for the parity tests: the models must produce short, long and max-length hypotheses."""
    torch_model, _ = models("token", 0)
    ids, mask, doc_scores = _contexts(3, seed=3)
    out = _hf_generate(torch_model, ids, mask, doc_scores, num_beams=4, num_return_sequences=4, max_length=MAX_LEN)
    lengths = {int(np.argmax(row[1:] == EOS)) + 2 if EOS in row[1:] else MAX_LEN for row in out}
    assert len(lengths) >= 3, lengths


@pytest.mark.parametrize(
    "options",
    [
        dict(min_length=4, length_penalty=2.0, early_stopping=True, num_return_sequences=3, forced_bos_token_id=0),
        dict(length_penalty=0.5, early_stopping="never", num_return_sequences=2, ban_seen_words=True),
    ],
    ids=["minlen-lp2-early-bos", "never-lp05-badwords"],
)
def test_rag_token_beam_options_match_transformers(models, options):
    torch_model, model = models("token", 0)
    ids, mask, doc_scores = _contexts(3, seed=5)
    options = dict(options, num_beams=4, max_length=MAX_LEN)
    if options.pop("ban_seen_words", False):  # ban a token and a bigram that the unconstrained search produces
        free = _hf_generate(torch_model, ids, mask, doc_scores, num_beams=4, num_return_sequences=4, max_length=MAX_LEN)
        longest = free[np.argmax((free != PAD).sum(axis=1))]
        options["bad_words_ids"] = [[int(longest[2])], [int(longest[1]), int(longest[3])], [EOS]]
    expected = _hf_generate(torch_model, ids, mask, doc_scores, **options)
    _assert_same_ids(model.generate(ids, mask, doc_scores, n_docs=K, **options), expected)


def _naive_rag_token_greedy(model, ids, mask, doc_scores, max_length):
    """Greedy RAG-Token decoding that recomputes the full forward pass (``Bart.__call__`` over every
    document, no cache) for the whole prefix at every step; forced EOS at max_length - 1 and padding
    after EOS, as transformers. The prefix is right-padded to max_length so one program serves all
    steps (the decoder is causal: the padding does not reach the prefix's logits)."""
    graphdef, state = nnx.split(model.generator.model)
    b = doc_scores.shape[0]
    ids_BxKxS, mask_BxKxS = ids.reshape(b, K, S), mask.reshape(b, K, S)
    logits_fn = jax.jit(per_doc_logits)
    seq = np.full((b, max_length), PAD)
    seq[:, 0] = EOS  # BART's decoder start token
    unfinished = np.ones(b, bool)
    length = 1
    while length < max_length and unfinished.any():
        logits = logits_fn(graphdef, state, ids_BxKxS, mask_BxKxS, jnp.asarray(seq))[:, :, length - 1 : length]
        scores = np.asarray(objective.marginal_log_probs(logits, jnp.asarray(doc_scores)))[:, 0]
        if length == max_length - 1:
            scores = np.where(np.arange(VOCAB) == EOS, 0.0, -np.inf)[None, :].repeat(b, 0)
        seq[:, length] = np.where(unfinished, scores.argmax(-1), PAD)
        unfinished &= seq[:, length] != EOS
        length += 1
    return seq[:, :length]


def test_cached_decoding_equals_full_recompute(models):
    _, model = models("token", 1)
    ids, mask, doc_scores = _contexts(3, seed=7)
    expected = _naive_rag_token_greedy(model, ids, mask, doc_scores, MAX_LEN)
    _assert_same_ids(model.generate(ids, mask, doc_scores, n_docs=K, num_beams=1, max_length=MAX_LEN), expected)


# ------------------------------------------------------------------------------------------------
# RAG-Sequence


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize(("num_beams", "num_return_sequences"), [(1, 1), (3, 2)])
def test_rag_sequence_thorough_matches_transformers(models, seed, num_beams, num_return_sequences):
    """Padded contexts: transformers' candidate search ignores the context mask (see rag_jax.rag.decoding),
    reproduced with ``mask_candidate_search=False``."""
    torch_model, model = models("sequence", seed)
    ids, mask, doc_scores = _contexts(3, seed=20 + seed)
    kw = dict(num_beams=num_beams, num_return_sequences=num_return_sequences, max_length=MAX_LEN)
    expected = _hf_generate(torch_model, ids, mask, doc_scores, **kw)
    ours = model.generate(ids, mask, doc_scores, n_docs=K, decoding="thorough", mask_candidate_search=False, **kw)
    _assert_same_ids(ours, expected)


def test_rag_sequence_thorough_default_matches_transformers_without_padding(models):
    torch_model, model = models("sequence", 0)
    ids, mask, doc_scores = _contexts(2, seed=30, padded=False)
    kw = dict(num_beams=3, max_length=MAX_LEN)
    _assert_same_ids(
        model.generate(ids, mask, doc_scores, n_docs=K, **kw), _hf_generate(torch_model, ids, mask, doc_scores, **kw)
    )


def _per_doc_candidates(model, ids, mask, num_beams):
    """Every document's BART beams (as ``generate_seq2seq`` returns them), with their search log-probs."""
    graphdef, state = nnx.split(model.generator.model)
    opts = model.generation_options("sequence", num_beams=num_beams, num_return_sequences=num_beams, max_length=MAX_LEN)
    result = decoding.rag_token_search(
        graphdef, state, jnp.asarray(ids)[:, None], jnp.asarray(mask)[:, None], None, opts
    )
    return np.asarray(result.sequences_BxNxL), np.asarray(result.log_probs_BxN)


def test_fast_decoding_picks_the_best_merged_candidate(models):
    """Fast decoding returns per-document beam candidates, ranked by logsumexp over the documents that
    produced them of log p(z|x) + the search log-probability (recomputed here on the host)."""
    _, model = models("sequence", 1)
    b, n, r = 3, 3, 2
    ids, mask, doc_scores = _contexts(b, seed=41)
    ours = model.generate(ids, mask, doc_scores, n_docs=K, decoding="fast", num_beams=n, num_return_sequences=r,
                          max_length=MAX_LEN)  # fmt: skip
    seqs, log_probs = _per_doc_candidates(model, ids, mask, n)
    seqs, log_probs = seqs.reshape(b, K * n, MAX_LEN), log_probs.reshape(b, K, n)
    prior = np.asarray(objective.doc_log_prior(jnp.asarray(doc_scores)))
    for i in range(b):
        merged = {}
        for k in range(K):
            for j in range(n):
                key = tuple(seqs[i, k * n + j])
                merged[key] = np.logaddexp(merged.get(key, -np.inf), prior[i, k] + log_probs[i, k, j])
        ranked = sorted(merged, key=merged.get, reverse=True)[:r]
        width = ours.shape[1]
        assert [tuple(row) for row in ours[i * r : (i + 1) * r]] == [key[:width] for key in ranked]


def test_fast_and_thorough_agree_with_one_document(models):
    """With K = 1 and num_return_sequences = num_beams both return all of the document's beams (the
    search ranks them by the length-penalised score, the rescoring by the log-likelihood, so the
    order may differ)."""
    _, model = models("sequence", 0)
    ids, mask, doc_scores = _contexts(3, seed=50)
    n = 3
    kw = dict(n_docs=1, num_beams=n, num_return_sequences=n, max_length=MAX_LEN)
    fast = model.generate(ids[::K], mask[::K], doc_scores[:, :1], decoding="fast", **kw)
    thorough = model.generate(ids[::K], mask[::K], doc_scores[:, :1], decoding="thorough", **kw)
    assert fast.shape == thorough.shape
    for i in range(3):
        rows = slice(i * n, (i + 1) * n)
        assert len(set(map(tuple, fast[rows]))) == n
        assert sorted(map(tuple, fast[rows])) == sorted(map(tuple, thorough[rows]))


# ------------------------------------------------------------------------------------------------
# Closed-book BART, compilation, errors


def test_generate_seq2seq_matches_bart_generate(models):
    """Beam search (greedy is covered by RAG-Sequence's per-document searches)."""
    num_beams = 3
    torch_model, model = models("token", 0)
    ids, mask, _ = _contexts(3, seed=60)  # twelve padded inputs
    with torch.no_grad():
        expected = torch_model.rag.generator.generate(
            torch.tensor(ids), attention_mask=torch.tensor(mask), num_beams=num_beams, num_return_sequences=num_beams,
            max_length=MAX_LEN,
        ).numpy()  # fmt: skip
    ours = decoding.generate_seq2seq(
        model.generator, ids, mask, num_beams=num_beams, num_return_sequences=num_beams, max_length=MAX_LEN
    )
    _assert_same_ids(ours, expected)


def test_one_compiled_program_per_shape_bucket(models):
    _, model = models("token", 0)
    model.generate(*_contexts(3, seed=70), n_docs=K, num_beams=4, max_length=MAX_LEN)
    compiled = decoding.rag_token_search._cache_size()
    for seed in (71, 72):
        model.generate(*_contexts(3, seed=seed), n_docs=K, num_beams=4, max_length=MAX_LEN)
    assert decoding.rag_token_search._cache_size() == compiled


def test_loss_is_jitted_once_per_setting(models):
    _, model = models("token", 0)
    ids, mask, doc_scores = _contexts(2, seed=80)
    labels = np.random.default_rng(0).integers(3, VOCAB, size=(2, 5))
    for _ in range(3):
        model.loss(ids, mask, doc_scores, labels, n_docs=K)
    assert len(model._loss_jits) == 1
    assert next(iter(model._loss_jits.values()))._cache_size() == 1


def test_generation_options_come_from_the_configs(models):
    _, model = models("token", 0)
    token, sequence = model.generation_options("token"), model.generation_options("sequence")
    assert (token.max_length, sequence.max_length) == (20, 21)  # transformers' defaults for each generate
    assert (token.decoder_start_token_id, token.eos_token_id, token.pad_token_id) == (2, EOS, PAD)
    assert token.forced_eos_token_id == EOS and token.forced_bos_token_id is None
    no_forcing = dataclasses.replace(token, forced_eos_token_id=None)
    assert model.generation_options(options=no_forcing, max_length=7) == dataclasses.replace(no_forcing, max_length=7)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_beams=2, num_return_sequences=3), "num_return_sequences=3"),
        (dict(max_length=1), "max_length=1"),
        (dict(max_length=1000), "max_position_embeddings"),
        (dict(bad_words_ids=[[VOCAB]]), "bad_words_ids"),
        (dict(early_stopping="sometimes"), "early_stopping"),
        (dict(top_k=5), "unknown generation options"),
    ],
)
def test_bad_options_are_refused(models, kwargs, message):
    _, model = models("token", 0)
    ids, mask, doc_scores = _contexts(1, seed=90)
    with pytest.raises((ValueError, TypeError), match=message):
        model.generate(ids, mask, doc_scores, n_docs=K, **kwargs)
