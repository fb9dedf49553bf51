"""The training state and the jitted, donated, sharded RAG training step.

``TrainState`` holds what changes during training: the step, the trainable parameters
``{"query_encoder": <BERT pytree>, "generator": <BART params as a plain dict>}`` (and
``"score_scale"``, a float32 scalar ``log(scale)``, when the retrieval score scale is learned, and
``"doc_encoder"``, a BERT pytree, when the document encoder is trained and not shared), the optax state
and the dropout key. A frozen document encoder is not in it: the batch brings the retrieved documents'
embeddings, and the step recomputes ``doc_scores = q(x) . d(z)`` from them so the loss's gradient
reaches the query encoder. A trained one (``TrainConfig.train_doc_encoder``) encodes the retrieved
documents' tokens inside the step (``DocTokensRagBatch``), so the gradient reaches it too; shared
(``share_encoders``), the question encoder's parameters encode both sides. The generator's graph (architecture, compute dtype,
remat) and its non-trainable buffer (``final_logits_bias``) are fixed per ``Trainer``.

Batches are typed (``rag_jax.rag.batches``) and the loss is ``rag_jax.rag.model.per_example_loss``,
which dispatches on the batch's type (static under ``jit``):

* ``DenseRagBatch``: the step scores the retrieved documents from the question ids and the
  documents' embeddings;
* ``DocTokensRagBatch``: end-to-end, the step encodes the retrieved documents with the document
  encoder (and, with ``rerank_top_k``, first keeps the best of the batch's candidates);
* ``QuestionsRagBatch``: retrieval inside the step (``corpus.retriever=device``): the step encodes the
  questions with the current parameters, retrieves from the ``DeviceCorpus`` on the mesh (an argument
  of the jitted step, not donated) and joins the contexts, making a ``DenseRagBatch``
  (``rag_jax.retrieval.device``);
* ``FixedScoreRagBatch``: from a fixed retriever (BM25), fixed ``doc_scores`` (the loss then gives
  the question encoder no gradient: freeze it);
* ``Seq2SeqBatch``: closed-book (``variant="closed_book"``, the paper's BART baseline, k = 0), the
  question alone.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rag_jax.config import TrainConfig
from rag_jax.models.bart import Bart, param_logical_axes
from rag_jax.rag import objective
from rag_jax.rag.batches import Batch, DenseRagBatch, QuestionsRagBatch
from rag_jax.rag.model import RagModel, per_example_loss_and_doc_scores, question_vectors
from rag_jax.retrieval import device
from rag_jax.training import sharding
from rag_jax.training.optim import AdamWState, global_norm, make_optimizer

COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}  # config.train.compute_dtype -> dtype


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: Any
    rng: jax.Array


def _param_groups(cfg: "TrainConfig"):
    """The optimizer group of every parameter: the query encoder is "frozen" when frozen or unused
    (closed-book), "query_encoder" when it has its own learning rate; a learned score scale is
    "score_scale"; everything else "train"."""

    def group(name: str) -> str:
        if name == "score_scale":
            return "score_scale"
        if name == "doc_encoder":
            return "train" if cfg.doc_encoder_learning_rate is None else "doc_encoder"
        if name == "query_encoder" and (cfg.freeze_query_encoder or cfg.variant == "closed_book"):
            return "frozen"
        if name == "query_encoder" and cfg.query_encoder_learning_rate is not None:
            return "query_encoder"
        return "train"

    def groups(params):
        return {name: jax.tree.map(lambda _, g=group(name): g, tree) for name, tree in params.items()}

    return groups


def _group_learning_rates(cfg: TrainConfig) -> dict[str, float]:
    """The peak learning rates of the groups that have their own (``make_optimizer``)."""
    rates = {} if cfg.query_encoder_learning_rate is None else {"query_encoder": cfg.query_encoder_learning_rate}
    if cfg.doc_encoder_learning_rate is not None:
        rates["doc_encoder"] = cfg.doc_encoder_learning_rate
    if cfg.learn_score_scale:
        rate = cfg.score_scale_learning_rate
        rates["score_scale"] = cfg.optimizer.learning_rate if rate is None else rate
    return rates


class Trainer:
    """Builds the train state from a ``RagModel`` and runs the jitted step on a mesh."""

    def __init__(self, model: RagModel, cfg: TrainConfig, mesh: Mesh | None = None,
                 corpus_layout: device.CorpusLayout | None = None):  # fmt: skip
        """``corpus_layout``: the ``DeviceCorpus``'s layout (on ``mesh``), for ``QuestionsRagBatch``es."""
        self.cfg = cfg
        self.corpus_layout = corpus_layout
        self.mesh = mesh if mesh is not None else sharding.make_mesh(devices=jax.devices()[:1])
        self.encoder = model.question_encoder
        self.gen_cfg = model.generator.config
        self.compute_dtype = COMPUTE_DTYPES[cfg.compute_dtype]
        abstract = nnx.eval_shape(
            lambda: Bart(self.gen_cfg, rngs=nnx.Rngs(0), dtype=self.compute_dtype, remat=cfg.remat)
        )
        self.graphdef = nnx.split(abstract, nnx.Param, ...)[0]
        _, gen_params, buffers = nnx.split(model.generator.model, nnx.Param, ...)
        self.source_model = model
        self.loss_spec = model.loss_spec(cfg.variant, cfg.epsilon, cfg.exclude_bos_score, cfg.form)
        self._initial_params = {
            "query_encoder": model.question_encoder.params,
            "generator": nnx.to_pure_dict(gen_params),
        }
        # the logical axes of every trainable parameter, declared by the models (the scale is a scalar)
        self.logical_axes = {"query_encoder": model.question_encoder.logical_axes(),
                             "generator": param_logical_axes(abstract)}  # fmt: skip
        self.doc_encoder = self._trained_doc_encoder(model, cfg)
        if self.doc_encoder is not None and not cfg.share_encoders:
            self._initial_params["doc_encoder"] = self.doc_encoder.params
            self.logical_axes["doc_encoder"] = self.doc_encoder.logical_axes()
        if cfg.learn_score_scale:  # learned in log space: the scale stays positive
            self._initial_params["score_scale"] = np.log(np.float32(model.score_scale))
            self.logical_axes["score_scale"] = ()
        # non-trainable buffers (final_logits_bias) are constants of the step, on the host until it runs:
        # a trainer over compile-only devices (ahead-of-time planning) holds no device arrays
        self.buffers = jax.tree.map(np.asarray, nnx.to_pure_dict(buffers))
        self.tx = make_optimizer(cfg.optimizer, _param_groups(cfg), _group_learning_rates(cfg))
        self._steps = {}  # the jitted step by batch type

    @staticmethod
    def _trained_doc_encoder(model: RagModel, cfg: TrainConfig):
        """The document encoder the step trains (the question encoder when shared), or None."""
        if not cfg.train_doc_encoder:
            return None
        if cfg.share_encoders:
            return model.question_encoder
        if model.doc_encoder is None:
            raise ValueError("train_doc_encoder needs the model's doc_encoder (or share_encoders)")
        if model.doc_encoder.dim != model.question_encoder.dim:
            raise ValueError(f"the document encoder gives {model.doc_encoder.dim}-dim vectors, the question encoder "
                             f"{model.question_encoder.dim}")  # fmt: skip
        return model.doc_encoder

    # -- state ---------------------------------------------------------------------------------

    def state_shardings(self, state: TrainState) -> TrainState:
        """The layout of ``state`` on the mesh: parameters and their AdamW moments by the parameters'
        logical axes, the rest replicated."""
        replicated = NamedSharding(self.mesh, P())
        opt_state = state.opt_state
        return TrainState(
            step=replicated,
            params=sharding.param_shardings(state.params, self.logical_axes, self.mesh),
            opt_state=AdamWState(
                count=replicated,
                mu=sharding.param_shardings(opt_state.mu, self.logical_axes, self.mesh),
                nu=sharding.param_shardings(opt_state.nu, self.logical_axes, self.mesh),
            ),
            rng=replicated,
        )

    def abstract_state(self) -> TrainState:
        """The ``TrainState`` as ``jax.ShapeDtypeStruct`` leaves with this trainer's shardings: the
        restore target, computed without allocating the state (``jax.eval_shape`` of the init)."""
        abstract = jax.eval_shape(self._init_state, self._initial_params)
        shardings = self.state_shardings(abstract)
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)

    def init_state(self) -> TrainState:
        """The initial state, with parameters and optimizer state laid out on the mesh."""
        abstract = jax.eval_shape(self._init_state, self._initial_params)
        shardings = self.state_shardings(abstract)
        params = jax.device_put(self._initial_params, shardings.params)
        return jax.jit(self._init_state, out_shardings=shardings)(params)

    def _init_state(self, params) -> TrainState:
        params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)  # float32 master weights
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=self.tx.init(params),
            rng=jax.random.key_data(jax.random.key(self.cfg.seed)),
        )

    # -- loss ----------------------------------------------------------------------------------

    def per_example_loss(self, params, batch: Batch, dropout_key) -> jax.Array:
        """Loss per example ``[B]`` (float32); dropout on when ``dropout_key`` is given."""
        return self._per_example_loss_and_doc_scores(params, batch, dropout_key)[0]

    def _per_example_loss_and_doc_scores(self, params, batch: Batch, dropout_key):
        generator = (self.graphdef, {**params["generator"], **self.buffers})
        question_encoder = self._question_encoder(params["query_encoder"])
        return per_example_loss_and_doc_scores(self.loss_spec, generator, question_encoder, batch, dropout_key,
                                               self.score_scale(params), doc_encoder=self._doc_encoder(params),
                                               rerank_top_k=self.cfg.rerank_top_k)  # fmt: skip

    def score_scale(self, params) -> float | jax.Array:
        """The retrieval score scale: ``exp(params["score_scale"])`` when learned, else the model's."""
        return jnp.exp(params["score_scale"]) if "score_scale" in params else self.source_model.score_scale

    def _question_encoder(self, encoder_params):
        """The question encoder with ``encoder_params`` (no gradient when frozen), as ``per_example_loss`` calls it."""
        if self.cfg.freeze_query_encoder:
            encoder_params = jax.lax.stop_gradient(encoder_params)
        return self._encoder_fn(self.encoder, encoder_params)

    def _doc_encoder(self, params):
        """The trained document encoder as ``per_example_loss`` calls it, or None (frozen)."""
        return None if self.doc_encoder is None else self._encoder_fn(self.doc_encoder, self.doc_params(params))

    def doc_params(self, params):
        """The trained document encoder's parameters in ``params`` (a shared one's are the question encoder's)."""
        return params["query_encoder" if self.cfg.share_encoders else "doc_encoder"]

    def _encoder_fn(self, encoder, encoder_params):
        return functools.partial(question_vectors, encoder_params, encoder=encoder, compute_dtype=self.compute_dtype,
                                 remat=self.cfg.remat)  # fmt: skip

    def _loss_and_grads(self, params, batch, dropout_key):
        """The summed loss, the gradients, and the summed entropy of p(z|x) (0 closed-book: no retrieval)."""

        def loss_fn(params):
            losses_B, doc_scores_BxK = self._per_example_loss_and_doc_scores(params, batch, dropout_key)
            entropy = 0.0 if doc_scores_BxK is None else jnp.sum(objective.prior_entropy(doc_scores_BxK))
            return jnp.sum(losses_B), jax.lax.stop_gradient(entropy)

        (total, entropy), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return total, entropy, grads

    # -- step ----------------------------------------------------------------------------------

    def retrieved_on_device(self, params, batch: QuestionsRagBatch, corpus: device.CorpusArrays):
        """``batch`` with its documents retrieved on the devices by the question encoder of ``params``
        (no dropout, no gradient), a ``DenseRagBatch`` laid out like a host batch; and the rows ``[B, K]``."""
        if self.corpus_layout is None or self.cfg.device_retrieval_k is None:
            raise ValueError("a QuestionsRagBatch needs the trainer's corpus_layout and TrainConfig.device_retrieval_k")
        encode = self._encoder_fn(self.encoder, jax.lax.stop_gradient(params["query_encoder"]))
        q_BxD = encode(batch.question_input_ids_BxQ, batch.question_attention_mask_BxQ, dropout_key=None)
        got = device.retrieve(q_BxD, corpus, self.corpus_layout, self.cfg.device_retrieval_k)
        ids_BxKxS, mask_BxKxS = device.join_contexts(got.passage_ids_BxKxL, got.passage_lengths_BxK,
                                                     batch.question_part_ids_BxM, batch.question_part_lengths_B,
                                                     self.corpus_layout.template)  # fmt: skip
        dense = DenseRagBatch(question_input_ids_BxQ=batch.question_input_ids_BxQ,
                              question_attention_mask_BxQ=batch.question_attention_mask_BxQ,
                              doc_embeddings_BxKxD=got.embeddings_BxKxD, context_input_ids_BxKxS=ids_BxKxS,
                              context_attention_mask_BxKxS=mask_BxKxS, labels_BxT=batch.labels_BxT)  # fmt: skip
        dense = jax.lax.with_sharding_constraint(dense, sharding.batch_shardings(dense, self.mesh))
        return dense, got.rows_BxK

    def _train_step(self, state: TrainState, batch: Batch, corpus: device.CorpusArrays | None = None
                    ) -> tuple[TrainState, dict]:  # fmt: skip
        extra_metrics = {}
        if isinstance(batch, QuestionsRagBatch):
            batch, rows_BxK = self.retrieved_on_device(state.params, batch, corpus)
            extra_metrics["distinct_passages"] = device.distinct_count(rows_BxK)
        n = self.cfg.grad_accum_steps
        rng, step_key = jax.random.split(jax.random.wrap_key_data(state.rng))
        count = jax.tree.leaves(batch)[0].shape[0]
        if n == 1:
            total, entropy, grads = self._loss_and_grads(state.params, batch, step_key)
        else:
            micro = jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)

            def accumulate(carry, inputs):
                total, entropy, grads = carry
                micro_batch, key = inputs
                t, e, g = self._loss_and_grads(state.params, micro_batch, key)
                return (total + t, entropy + e, jax.tree.map(jnp.add, grads, g)), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (total, entropy, grads), _ = jax.lax.scan(accumulate, (0.0, 0.0, zeros),
                                                      (micro, jax.random.split(step_key, n)))  # fmt: skip
        if self.cfg.loss_reduction == "mean":
            grads = jax.tree.map(lambda g: g / count, grads)
        grad_norm = global_norm(grads)
        finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
        skip = ~finite if self.cfg.skip_nonfinite else None  # skipped: the previous parameters and optimizer state
        params, opt_state = self.tx.step(state.params, state.opt_state, grads, skip)
        metrics = {"loss": total / count, "grad_norm": grad_norm, "nonfinite": ~finite, **extra_metrics}
        if self.loss_spec.variant != "closed_book":  # the mean entropy of p(z|x) in nats, as the loss saw it
            metrics["retrieval_entropy"] = entropy / count
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=jax.random.key_data(rng))
        return new_state, metrics

    def _train_step_on_mesh(self, state: TrainState, batch: Batch, *corpus) -> tuple[TrainState, dict]:
        """``_train_step`` with the mesh and the logical-axis rules current, so the models' activation
        constraints apply wherever the jitted step is traced."""
        with sharding.use_mesh(self.mesh):
            return self._train_step(state, batch, *corpus)

    def train_step(self, state: TrainState, batch: Batch, corpus: device.CorpusArrays | None = None
                   ) -> tuple[TrainState, dict]:  # fmt: skip
        """One optimizer step (jitted once per batch type; ``state`` and ``batch`` are donated: do not reuse
        them). A ``QuestionsRagBatch`` retrieves from ``corpus`` (``DeviceCorpus.arrays``)."""
        batch_size = jax.tree.leaves(batch)[0].shape[0]
        if batch_size % self.cfg.grad_accum_steps:
            raise ValueError(f"batch size {batch_size} is not a multiple of grad_accum_steps {self.cfg.grad_accum_steps}")
        step = self.jitted_step(state, batch)
        corpus_args = (corpus,) if isinstance(batch, QuestionsRagBatch) else ()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
            return step(state, sharding.shard_batch(batch, self.mesh), *corpus_args)

    def jitted_step(self, state: TrainState, batch: Batch):
        """The jitted, donated step for ``batch``'s type (one per type), laid out for ``state`` and the
        mesh; ``state`` and ``batch`` may be abstract (``abstract_state()``, ``jax.ShapeDtypeStruct``s):
        ``jitted_step(state, batch).trace(state, batch).lower().compile()`` compiles ahead of time
        (a ``QuestionsRagBatch``'s step takes the ``CorpusArrays`` third: ``device.abstract_arrays``)."""
        if type(batch) not in self._steps:
            state_shardings = self.state_shardings(state)
            in_shardings = (state_shardings, sharding.batch_shardings(batch, self.mesh))
            if isinstance(batch, QuestionsRagBatch):
                in_shardings += (self.corpus_layout.shardings(),)
            self._steps[type(batch)] = jax.jit(
                self._train_step_on_mesh,
                in_shardings=in_shardings,
                out_shardings=(state_shardings, NamedSharding(self.mesh, P())),
                donate_argnums=(0, 1),
            )
        return self._steps[type(batch)]

    def to_model(self, params: dict) -> RagModel:
        """A ``RagModel`` with the given trainable parameters (for evaluation, generation, export) and
        score scale; the generator keeps the source model's float32 graph."""
        graphdef, gen_params, buffers = nnx.split(self.source_model.generator.model, nnx.Param, ...)
        nnx.replace_by_pure_dict(gen_params, params["generator"])
        generator = dataclasses.replace(self.source_model.generator, model=nnx.merge(graphdef, gen_params, buffers))
        question_encoder = dataclasses.replace(self.source_model.question_encoder, params=params["query_encoder"])
        doc_encoder = self.source_model.doc_encoder
        if self.doc_encoder is not None:  # trained: the run's parameters (a shared one: the question encoder's)
            doc_encoder = dataclasses.replace(self.doc_encoder, params=self.doc_params(params))
        return dataclasses.replace(self.source_model, question_encoder=question_encoder, generator=generator,
                                   score_scale=float(self.score_scale(params)), doc_encoder=doc_encoder)  # fmt: skip

    def eval_loss(self, params, batch: Batch) -> jax.Array:
        """Per-example loss without dropout (not jitted here: wrap in ``jax.jit`` as needed)."""
        return self.per_example_loss(params, batch, None)
