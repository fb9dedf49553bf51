"""The RAG model: a question encoder and a generator, the per-document generator pass, the loss.

``per_example_loss`` is the one composition of the loss (decoder inputs, generator passes, doc
scores, ``rag_jax.rag.objective``) from a typed batch (``rag_jax.rag.batches``) and a ``LossSpec``:
``RagModel.loss`` and the training step both call it.

Generator inputs arrive as transformers lays them out, ``B * K`` rows with the document index
fastest (b0d0, b0d1, ...); inside rag_jax they are ``[B, K, S]`` and the generator runs over the
document axis with ``jax.vmap`` (one batched program, same weights for every document). The
decoder input is shared by the K documents of an example.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rag_jax.models import attention, bert
from rag_jax.models.bart import Bart
from rag_jax.models.configs import BartConfig, BertConfig, RagConfig
from rag_jax.models.encoder import Encoder, pooled_encode
from rag_jax.models.generator import Generator
from rag_jax.rag import objective
from rag_jax.rag.batches import Batch, DenseRagBatch, DocTokensRagBatch, FixedScoreRagBatch, Seq2SeqBatch
from rag_jax.rag.decoding import (
    Decoding,
    SearchOptions,
    as_dtype,
    default_options,
    hf_layout,
    rag_sequence_search,
    rag_token_search,
)

Variant = Literal["token", "sequence"]
ARCHITECTURES = {"token": "RagTokenForGeneration", "sequence": "RagSequenceForGeneration"}


def generator_logits(
    graphdef: nnx.GraphDef,
    generator_state: nnx.State,
    input_ids_BxS: jax.Array,
    attention_mask_BxS: jax.Array,
    decoder_input_ids_BxT: jax.Array,
    decoder_attention_mask_BxT: jax.Array | None = None,
    *,
    dropout_key: jax.Array | None = None,
) -> jax.Array:
    """Generator logits ``[B, T, V]`` (float32) of one input per example; dropout on with ``dropout_key``."""
    model = nnx.merge(graphdef, generator_state)
    rngs = None if dropout_key is None else nnx.Rngs(dropout=dropout_key)
    return model(
        input_ids_BxS, attention_mask_BxS, decoder_input_ids_BxT, decoder_attention_mask_BxT,
        deterministic=dropout_key is None, rngs=rngs,
    )  # fmt: skip


def per_doc_logits(
    graphdef: nnx.GraphDef,
    generator_state: nnx.State,
    context_input_ids_BxKxS: jax.Array,
    context_attention_mask_BxKxS: jax.Array,
    decoder_input_ids_BxT: jax.Array,
    decoder_attention_mask_BxT: jax.Array | None = None,
    *,
    dropout_key: jax.Array | None = None,
) -> jax.Array:
    """Generator logits ``[B, K, T, V]`` (float32) for every (example, document) pair.

    ``jax.vmap`` over the document axis; with ``dropout_key`` each document gets its own dropout
    mask (training), without it the pass is deterministic. Where attention may take cuDNN's fused
    kernel (``rag_jax.models.attention.FUSED_PLATFORMS``), the documents are instead rows of one batch
    of B * K, example-major, (decoder inputs repeated K times): the kernel's vmap rule merges the
    document axis in front of the batch axis, which, the batch being split over devices, GSPMD
    all-gathered (x 39 the collective bytes of an H100 x8 train step). Dropout then draws one mask over
    all rows, so its random stream differs from the vmap's.
    """
    b, k, s = context_input_ids_BxKxS.shape
    if attention.platform() in attention.FUSED_PLATFORMS:
        def repeated(x_BxT):
            return None if x_BxT is None else jnp.repeat(x_BxT, k, axis=0)

        logits_NxTxV = generator_logits(
            graphdef, generator_state, context_input_ids_BxKxS.reshape(b * k, s),
            context_attention_mask_BxKxS.reshape(b * k, s), repeated(decoder_input_ids_BxT),
            repeated(decoder_attention_mask_BxT), dropout_key=dropout_key,
        )  # fmt: skip
        return logits_NxTxV.reshape(b, k, *logits_NxTxV.shape[1:])
    keys_K = None if dropout_key is None else jax.random.split(dropout_key, k)

    def one_doc(ids_BxS, mask_BxS, key):
        return generator_logits(
            graphdef, generator_state, ids_BxS, mask_BxS, decoder_input_ids_BxT, decoder_attention_mask_BxT,
            dropout_key=key,
        )  # fmt: skip

    return jax.vmap(one_doc, in_axes=(1, 1, None if keys_K is None else 0), out_axes=1)(
        context_input_ids_BxKxS, context_attention_mask_BxKxS, keys_K
    )


def doc_scores_from_embeddings(
    question_vectors_BxD: jax.Array, doc_embeddings_BxKxD: jax.Array, score_scale: float | jax.Array = 1.0
) -> jax.Array:
    """``doc_scores[b, k] = score_scale * q_b . e_{b,k}`` in float32 (differentiable in the question
    vectors and the scale)."""
    return score_scale * jnp.einsum(
        "bd,bkd->bk", question_vectors_BxD, jnp.asarray(doc_embeddings_BxKxD).astype(question_vectors_BxD.dtype),
        preferred_element_type=jnp.float32,
    )  # fmt: skip


QuestionEncoderFn = Callable[..., jax.Array]
"""``(question_input_ids_BxQ, question_attention_mask_BxQ, *, dropout_key) -> question vectors [B, D]``."""
DocEncoderFn = Callable[..., jax.Array]
"""``(doc_input_ids_NxP, doc_attention_mask_NxP, *, dropout_key) -> document vectors [N, D]``."""


def doc_vectors(doc_encoder: DocEncoderFn, doc_input_ids_BxKxP, doc_attention_mask_BxKxP, dropout_key=None) -> jax.Array:
    """The documents' vectors ``[B, K, D]``: the B * K documents encoded as one batch."""
    b, k, p = doc_input_ids_BxKxP.shape
    vectors_NxD = doc_encoder(jnp.reshape(doc_input_ids_BxKxP, (b * k, p)),
                              jnp.reshape(doc_attention_mask_BxKxP, (b * k, p)), dropout_key=dropout_key)  # fmt: skip
    return vectors_NxD.reshape(b, k, -1)


def rerank_candidates(question_vectors_BxD: jax.Array, doc_vectors_BxLxD: jax.Array, k: int) -> jax.Array:
    """The rows ``[B, k]`` (of the L candidates) of the ``k`` documents with the largest ``q . d``, best
    first, ties to the lower row (a positive score scale ranks the same)."""
    return jax.lax.top_k(doc_scores_from_embeddings(question_vectors_BxD, doc_vectors_BxLxD), k)[1]


def reranked(batch: DocTokensRagBatch, question_vectors_BxD: jax.Array, doc_encoder: DocEncoderFn,
             k: int) -> DocTokensRagBatch:  # fmt: skip
    """``batch`` with its L candidates cut to the ``k`` the current encoders score highest (Atlas's
    re-rank): every candidate encoded without dropout and without a gradient (the choice is not
    differentiated; the loss re-encodes the kept ones)."""
    candidates_BxLxD = jax.lax.stop_gradient(
        doc_vectors(doc_encoder, batch.doc_input_ids_BxKxP, batch.doc_attention_mask_BxKxP))
    keep_BxK = rerank_candidates(jax.lax.stop_gradient(question_vectors_BxD), candidates_BxLxD, k)

    def kept(x_BxLxS):
        return jnp.take_along_axis(jnp.asarray(x_BxLxS), keep_BxK[:, :, None], axis=1)

    return dataclasses.replace(
        batch, doc_input_ids_BxKxP=kept(batch.doc_input_ids_BxKxP),
        doc_attention_mask_BxKxP=kept(batch.doc_attention_mask_BxKxP),
        context_input_ids_BxKxS=kept(batch.context_input_ids_BxKxS),
        context_attention_mask_BxKxS=kept(batch.context_attention_mask_BxKxS),
    )  # fmt: skip


def per_example_loss(
    spec: objective.LossSpec,
    generator: tuple[nnx.GraphDef, nnx.State],
    question_encoder: QuestionEncoderFn | None,
    batch: Batch,
    dropout_key: jax.Array | None = None,
    score_scale: float | jax.Array = 1.0,
    *,
    doc_encoder: DocEncoderFn | None = None,
    rerank_top_k: int | None = None,
) -> jax.Array:
    """The loss per example ``[B]`` (float32) of ``batch`` under ``spec``: decoder inputs from the
    labels, the generator pass (per document for RAG), the doc scores, the objective. The one loss
    composition, used by training (``rag_jax.training.step.Trainer``) and by ``RagModel.loss``.

    ``generator``: the generator's graph and state (parameters and buffers). ``question_encoder``
    scores a ``DenseRagBatch``'s documents (``doc_scores_from_embeddings``, times ``score_scale``), so
    the gradient reaches it (and the scale); other batches do not use either (None is fine; their
    fixed scores are used as given). The batch type must fit ``spec.variant``:
    ``Seq2SeqBatch`` for "closed_book", a ``DenseRagBatch``, ``DocTokensRagBatch`` or ``FixedScoreRagBatch``
    for RAG. A ``DocTokensRagBatch``'s documents are encoded by ``doc_encoder`` (end-to-end retriever
    training; ``rerank_top_k``: keep that many of its candidates, ``reranked``). With ``dropout_key``
    dropout is on: it splits into a key for the question encoder (and, split again, the document
    encoder) and one for the generator (which draws one per document).
    """
    return per_example_loss_and_doc_scores(spec, generator, question_encoder, batch, dropout_key, score_scale,
                                           doc_encoder=doc_encoder, rerank_top_k=rerank_top_k)[0]  # fmt: skip


def per_example_loss_and_doc_scores(
    spec: objective.LossSpec,
    generator: tuple[nnx.GraphDef, nnx.State],
    question_encoder: QuestionEncoderFn | None,
    batch: Batch,
    dropout_key: jax.Array | None = None,
    score_scale: float | jax.Array = 1.0,
    *,
    doc_encoder: DocEncoderFn | None = None,
    rerank_top_k: int | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """``per_example_loss`` and the doc scores ``[B, K]`` it used (None closed-book), for the
    training step's retrieval diagnostics."""
    expected = (Seq2SeqBatch,) if spec.variant == "closed_book" else (DenseRagBatch, DocTokensRagBatch, FixedScoreRagBatch)
    if not isinstance(batch, expected):
        names = " or ".join(t.__name__ for t in expected)
        raise TypeError(f"a {spec.variant!r} loss takes a {names}, got a {type(batch).__name__}")
    with attention.right_padded_masks():  # the batches' masks are checked right-padded (rag_jax.rag.batches)
        return _per_example_loss(spec, generator, question_encoder, batch, dropout_key, score_scale, doc_encoder,
                                 rerank_top_k)  # fmt: skip


def _per_example_loss(spec, generator, question_encoder, batch: Batch, dropout_key, score_scale, doc_encoder,
                      rerank_top_k):  # fmt: skip
    encoder_key, generator_key = (None, None) if dropout_key is None else jax.random.split(dropout_key)
    decoder_input_ids_BxT, _, _ = objective.decoder_inputs_and_targets(
        batch.labels_BxT, form=spec.form, pad_token_id=spec.pad_token_id,
        decoder_start_token_id=spec.decoder_start_token_id,
    )  # fmt: skip
    if isinstance(batch, Seq2SeqBatch):
        logits_BxTxV = generator_logits(
            *generator, batch.input_ids_BxS, batch.attention_mask_BxS, decoder_input_ids_BxT, dropout_key=generator_key
        )
        return objective.seq2seq_nll(
            logits_BxTxV, batch.labels_BxT, pad_token_id=spec.pad_token_id, epsilon=spec.epsilon, form=spec.form
        ), None
    if isinstance(batch, FixedScoreRagBatch):
        doc_scores_BxK = batch.doc_scores_BxK
    elif question_encoder is None:
        raise ValueError(f"a {type(batch).__name__} is scored by the question encoder: pass question_encoder")
    elif isinstance(batch, DenseRagBatch):
        q_BxD = question_encoder(
            batch.question_input_ids_BxQ, batch.question_attention_mask_BxQ, dropout_key=encoder_key
        )
        doc_scores_BxK = doc_scores_from_embeddings(q_BxD, batch.doc_embeddings_BxKxD, score_scale)
    elif doc_encoder is None:
        raise ValueError("a DocTokensRagBatch's documents are encoded by the document encoder: pass doc_encoder")
    else:
        encoder_key, doc_key = (None, None) if encoder_key is None else jax.random.split(encoder_key)
        q_BxD = question_encoder(
            batch.question_input_ids_BxQ, batch.question_attention_mask_BxQ, dropout_key=encoder_key
        )
        if rerank_top_k is not None:
            batch = reranked(batch, q_BxD, doc_encoder, rerank_top_k)
        d_BxKxD = doc_vectors(doc_encoder, batch.doc_input_ids_BxKxP, batch.doc_attention_mask_BxKxP, doc_key)
        doc_scores_BxK = doc_scores_from_embeddings(q_BxD, d_BxKxD, score_scale)
    logits_BxKxTxV = per_doc_logits(
        *generator, batch.context_input_ids_BxKxS, batch.context_attention_mask_BxKxS, decoder_input_ids_BxT,
        dropout_key=generator_key,
    )  # fmt: skip
    return objective.marginal_nll(spec, logits_BxKxTxV, doc_scores_BxK, batch.labels_BxT), doc_scores_BxK


def unflatten_docs(x_NxS: jax.Array, n_docs: int) -> jax.Array:
    """transformers' ``[B * K, S]`` (document fastest) -> ``[B, K, S]``, with a clear error."""
    n = x_NxS.shape[0]
    if n % n_docs:
        raise ValueError(f"context rows ({n}) are not a multiple of n_docs ({n_docs})")
    return x_NxS.reshape(n // n_docs, n_docs, *x_NxS.shape[1:])


@dataclasses.dataclass
class RagModel:
    """A question encoder (``Encoder``) and a generator (``Generator``) with the RAG settings.

    ``hf_config`` is the source RAG ``config.json`` (kept so an export preserves its other fields);
    ``variant`` is the default marginalisation, from the source architecture. ``score_scale``
    multiplies ``q(x) . d(z)`` wherever dense retrieval scores a document (``doc_scores``, the training
    loss, the retriever's scores at evaluation); transformers' RAG has none (1: a loaded folder's).
    """

    question_encoder: Encoder
    generator: Generator
    config: RagConfig = RagConfig()
    variant: Variant = "token"
    hf_config: dict | None = None
    score_scale: float = 1.0
    doc_encoder: Encoder | None = None
    # jitted loss functions by (LossSpec, reduce), built once each
    _loss_jits: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def bos_token_id(self) -> int | None:
        rag_bos = (self.hf_config or {}).get("bos_token_id")
        return rag_bos if rag_bos is not None else self.generator.config.bos_token_id

    def loss_spec(
        self,
        variant: objective.LossVariant | None = None,
        epsilon: float = 0.0,
        exclude_bos_score: bool = False,
        form: objective.Form = objective.PARITY_FORM,
    ) -> objective.LossSpec:
        """The ``LossSpec`` of ``variant`` (default the model's) with this model's special tokens."""
        gen_cfg = self.generator.config
        return objective.LossSpec(
            variant or self.variant, pad_token_id=gen_cfg.pad_token_id, bos_token_id=self.bos_token_id,
            decoder_start_token_id=gen_cfg.decoder_start_token_id, epsilon=epsilon,
            exclude_bos_score=exclude_bos_score, form=form,
        )  # fmt: skip

    def loss(
        self,
        context_input_ids,
        context_attention_mask,
        doc_scores,
        labels,
        variant: Variant | None = None,
        n_docs: int | None = None,
        epsilon: float = 0.0,
        exclude_bos_score: bool = False,
        reduce: bool = False,
        form: objective.Form = objective.PARITY_FORM,
    ) -> jax.Array:
        """The RAG loss, as ``Rag{Token,Sequence}ForGeneration(...).loss`` computes it with the same
        arguments (``form="hf"``): context ids/mask ``[B * K, S]`` (document fastest), doc_scores
        ``[B, K]``, labels ``[B, T]``. Returns ``[B]``, or the batch sum when ``reduce``. A
        ``FixedScoreRagBatch`` through ``per_example_loss`` (jitted once per setting)."""
        n_docs = n_docs or self.config.n_docs
        attention.check_right_padded(context_attention_mask, "context_attention_mask")  # a host mask, before the copy
        ids_NxS, mask_NxS, doc_scores_BxK, labels_BxT = map(
            jnp.asarray, (context_input_ids, context_attention_mask, doc_scores, labels)
        )
        batch = FixedScoreRagBatch(
            doc_scores_BxK=doc_scores_BxK, context_input_ids_BxKxS=unflatten_docs(ids_NxS, n_docs),
            context_attention_mask_BxKxS=unflatten_docs(mask_NxS, n_docs), labels_BxT=labels_BxT,
        )  # fmt: skip
        spec = self.loss_spec(variant, epsilon, exclude_bos_score, form)
        graphdef, state = self.generator.split()
        if (spec, reduce) not in self._loss_jits:

            def loss(state, batch):
                losses_B = per_example_loss(spec, (graphdef, state), None, batch)
                return jnp.sum(losses_B) if reduce else losses_B

            self._loss_jits[spec, reduce] = jax.jit(loss)
        return self._loss_jits[spec, reduce](state, batch)

    def generation_options(
        self, variant: Variant | None = None, options: SearchOptions | None = None, **overrides
    ) -> SearchOptions:
        """The ``SearchOptions`` ``generate`` uses for ``variant``: ``options``, or transformers' defaults
        from the configs (see ``rag_jax.rag.decoding.default_options``), with ``overrides`` (None values
        ignored) on top."""
        variant = variant or self.variant
        if variant not in ARCHITECTURES:
            raise ValueError(f"variant={variant!r}: expected 'token' or 'sequence'")
        return default_options(
            self.generator.config, self.hf_config, seq2seq_generate=variant == "sequence", base=options, **overrides
        )

    def generate(
        self,
        context_input_ids,
        context_attention_mask,
        doc_scores,
        variant: Variant | None = None,
        decoding: Decoding = "thorough",
        num_beams: int = 1,
        max_length: int | None = None,
        min_length: int | None = None,
        num_return_sequences: int = 1,
        n_docs: int | None = None,
        do_deduplication: bool | None = None,
        mask_candidate_search: bool = True,
        options: SearchOptions | None = None,
        **overrides,
    ) -> np.ndarray:
        """Generated ids ``[B * num_return_sequences, W]`` (int32, padded with the pad token), as
        ``Rag{Token,Sequence}ForGeneration.generate`` returns them for the same arguments.

        Inputs are transformers' layout: context ids/mask ``[B * K, S]`` (document fastest) and
        ``doc_scores [B, K]``. ``variant`` ("token" | "sequence", default the model's); ``decoding``
        applies to RAG-Sequence: "thorough" (rescoring, transformers' algorithm) or "fast" (the paper's,
        no extra forward pass). ``num_beams=1`` is greedy. Unset lengths and special tokens come from the
        configs as in transformers; other ``SearchOptions`` fields (``length_penalty``,
        ``early_stopping``, ``bad_words_ids``, ``forced_eos_token_id``, ...) go in ``overrides``, or pass a
        full ``options`` (e.g. ``dataclasses.replace(model.generation_options(), forced_eos_token_id=None)``).
        ``do_deduplication`` defaults to the RAG config's. ``mask_candidate_search=False`` reproduces a
        transformers quirk (RAG-Sequence's per-document searches attend to context padding). Every call
        with the same shapes and options runs one compiled program (``rag_jax.rag.decoding.rag_token_search``
        / ``rag_sequence_search``). See ``rag_jax.rag.decoding`` for the algorithms and the exact scores.
        """
        variant = variant or self.variant
        n_docs = n_docs or self.config.n_docs
        opts = self.generation_options(
            variant, options, num_beams=num_beams, max_length=max_length, min_length=min_length,
            num_return_sequences=num_return_sequences, **overrides,
        )  # fmt: skip
        gen_cfg = self.generator.config
        opts.check(
            gen_cfg.vocab_size,
            gen_cfg.max_position_embeddings,
            n_docs * opts.num_beams if variant == "sequence" else None,
        )
        ids_BxKxS = unflatten_docs(as_dtype(context_input_ids, np.int32), n_docs)
        mask_BxKxS = unflatten_docs(as_dtype(context_attention_mask, np.int32), n_docs)
        doc_scores_BxK = as_dtype(doc_scores, np.float32)
        if doc_scores_BxK.shape != ids_BxKxS.shape[:2]:
            raise ValueError(f"doc_scores has shape {doc_scores_BxK.shape}, expected {ids_BxKxS.shape[:2]} (B, n_docs)")
        graphdef, state = self.generator.decode_split()
        if variant == "token":
            result = rag_token_search(graphdef, state, ids_BxKxS, mask_BxKxS, doc_scores_BxK, opts)
            return hf_layout(result.sequences_BxNxL, result.lengths_BxN, opts.num_return_sequences)
        result = rag_sequence_search(
            graphdef, state, ids_BxKxS, mask_BxKxS, doc_scores_BxK, opts, decoding,
            pad_token_id=gen_cfg.pad_token_id, bos_token_id=self.bos_token_id, epsilon=self.config.label_smoothing,
            do_deduplication=self.config.do_deduplication if do_deduplication is None else do_deduplication,
            mask_candidate_search=mask_candidate_search,
        )  # fmt: skip
        return hf_layout(result.sequences_BxRxL, result.candidate_lengths_BxC)

    def doc_scores(self, question_input_ids, question_attention_mask, retrieved_doc_embeds) -> jax.Array:
        """``[B, K]`` scores of retrieved documents for the questions (``score_scale`` times the
        question encoder's vectors dotted with the documents' embeddings)."""
        q_BxD = self.question_encoder.encode(question_input_ids, question_attention_mask)
        return doc_scores_from_embeddings(q_BxD, retrieved_doc_embeds, self.score_scale)


def question_vectors(encoder_params, question_input_ids_BxS, question_attention_mask_BxS, *, encoder: Encoder, **kw):
    """The question encoder as a pure function of its parameters (so gradients reach them)."""
    return pooled_encode(
        encoder_params, question_input_ids_BxS, question_attention_mask_BxS,
        cfg=encoder.config, pooling=encoder.pooling, **kw,
    )  # fmt: skip


CONTRIEVER_TEMPERATURE = 0.05


def automatic_score_scale(question_encoder: Encoder) -> float:
    """The retrieval score scale when none is set: 1 for a question encoder with unnormalised vectors
    (DPR: ``q . d`` is already a logit), ``1 / 0.05 = 20`` (Contriever's temperature) for one that
    L2-normalises them: ``q . d`` is then a cosine in [-1, 1], and ``softmax`` over K cosines is nearly
    flat (at most ``e^2 / (e^2 + K - 1)`` for the top document), so p(z|x) could never concentrate."""
    return 1 / CONTRIEVER_TEMPERATURE if question_encoder.pooling == "mean_normalized" else 1.0


def init_rag_model(
    question_encoder_config: BertConfig,
    generator_config: BartConfig,
    config: RagConfig = RagConfig(),
    *,
    seed: int = 0,
    variant: Variant = "token",
) -> RagModel:
    """A randomly initialised RAG model (DPR-style CLS question encoder, BART generator)."""
    encoder_key, generator_key = jax.random.split(jax.random.key(seed))
    question_encoder = Encoder(
        params=bert.init_params(question_encoder_config, encoder_key),
        config=question_encoder_config,
        pooling="cls",
        kind="dpr_question",
    )
    bart = Bart(generator_config, rngs=nnx.Rngs(params=generator_key))
    return RagModel(question_encoder, Generator(model=bart, config=generator_config), config, variant)
