"""The training state and the jitted, donated, sharded RAG training step.

``TrainState`` holds what changes during training: the step, the trainable parameters
``{"query_encoder": <BERT pytree>, "generator": <BART params as a plain dict>}``, the optax state
and the dropout key. The frozen document encoder is not in it: the batch brings the retrieved
documents' embeddings, and the step recomputes ``doc_scores = q(x) . d(z)`` from them so the
loss's gradient reaches the query encoder. The generator's graph (architecture, compute dtype,
remat) and its non-trainable buffer (``final_logits_bias``) are fixed per ``Trainer``.

Batches are dicts of arrays:

* RAG: ``question_input_ids`` / ``question_attention_mask`` ``[B, Sq]``, ``doc_embeddings``
  ``[B, K, D]``, ``context_input_ids`` / ``context_attention_mask`` ``[B, K, S]``, ``labels``
  ``[B, T]``; from a fixed retriever (BM25), ``doc_scores`` ``[B, K]`` instead of the question ids
  and doc embeddings (the loss then gives the question encoder no gradient: freeze it);
* closed-book (``variant="closed_book"``, the paper's BART baseline, k = 0): ``input_ids`` /
  ``attention_mask`` ``[B, S]`` (the question alone) and ``labels``.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rag_jax import objective, sharding
from rag_jax.models.bart import Bart
from rag_jax.optim import OptimizerConfig, chunk_size_for, global_norm, make_optimizer
from rag_jax.rag import RagModel, doc_scores_from_embeddings, marginal_nll, per_doc_logits, question_vectors

Variant = Literal["token", "sequence", "closed_book"]
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What the step computes. ``form`` and ``loss_reduction`` default to the training choices
    (see ``rag_jax.objective``: prior counted once, one-token answers scored; a per-example mean so
    the learning rate does not depend on the batch size); ``reference_recipe()`` gives the settings
    of the transformers fine-tuning recipe instead."""

    variant: Variant = "token"
    epsilon: float = 0.0
    exclude_bos_score: bool = False
    form: objective.Form = objective.TRAINING_FORM
    loss_reduction: Literal["mean", "sum"] = "mean"
    freeze_query_encoder: bool = False
    query_encoder_learning_rate: float | None = None  # None: the optimizer's learning rate
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    remat: bool = False
    grad_accum_steps: int = 1
    skip_nonfinite: bool = False
    optimizer: OptimizerConfig = OptimizerConfig()
    seed: int = 0

    @classmethod
    def reference_recipe(cls, **overrides) -> "TrainConfig":
        """lr 3e-5, label smoothing 0.1, weight decay 0.001, clip 0.1, warmup 500, polynomial decay,
        batch-summed loss: the recipe used with the transformers reference."""
        kw = dict(epsilon=0.1, loss_reduction="sum", optimizer=OptimizerConfig())
        kw.update(overrides)
        return cls(**kw)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: Any
    rng: jax.Array


def _param_groups(cfg: "TrainConfig"):
    """The optimizer group of every parameter: the query encoder is "frozen" when frozen or unused
    (closed-book), "query_encoder" when it has its own learning rate; everything else "train"."""

    def group(name: str) -> str:
        if name == "query_encoder" and (cfg.freeze_query_encoder or cfg.variant == "closed_book"):
            return "frozen"
        if name == "query_encoder" and cfg.query_encoder_learning_rate is not None:
            return "query_encoder"
        return "train"

    def groups(params):
        return {name: jax.tree.map(lambda _, g=group(name): g, tree) for name, tree in params.items()}

    return groups


class Trainer:
    """Builds the train state from a ``RagModel`` and runs the jitted step on a mesh."""

    def __init__(self, model: RagModel, cfg: TrainConfig, mesh: Mesh | None = None):
        if cfg.grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be >= 1, got {cfg.grad_accum_steps}")
        self.cfg = cfg
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
        self._initial_params = {
            "query_encoder": model.question_encoder.params,
            "generator": nnx.to_pure_dict(gen_params),
        }
        replicated = NamedSharding(self.mesh, P())
        self.buffers = jax.device_put(nnx.to_pure_dict(buffers), replicated)
        rates = {} if cfg.query_encoder_learning_rate is None else {"query_encoder": cfg.query_encoder_learning_rate}
        self.tx = make_optimizer(cfg.optimizer, _param_groups(cfg), rates)
        self._step = None

    # -- state ---------------------------------------------------------------------------------

    def state_shardings(self, state: TrainState) -> TrainState:
        replicated = NamedSharding(self.mesh, P())
        return TrainState(
            step=replicated,
            params=sharding.param_shardings(state.params, self.mesh),
            opt_state=sharding.param_shardings(state.opt_state, self.mesh),
            rng=replicated,
        )

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

    def per_example_loss(self, params, batch, dropout_key) -> jax.Array:
        """Loss per example ``[B]`` (float32); dropout on when ``dropout_key`` is given."""
        cfg = self.cfg
        gen_state = params["generator"]
        keys = [None, None] if dropout_key is None else list(jax.random.split(dropout_key))
        if cfg.variant == "closed_book":
            decoder_input_ids, _, _ = self._decoder_inputs(batch["labels"])
            model = nnx.merge(self.graphdef, gen_state, self.buffers)
            rngs = None if keys[1] is None else nnx.Rngs(dropout=keys[1])
            logits_BxTxV = model(
                batch["input_ids"], batch["attention_mask"], decoder_input_ids, deterministic=rngs is None, rngs=rngs
            )
            return objective.seq2seq_nll(
                logits_BxTxV, batch["labels"], pad_token_id=self.gen_cfg.pad_token_id, epsilon=cfg.epsilon, form=cfg.form
            )
        if "doc_scores" in batch:
            doc_scores_BxK = batch["doc_scores"]
        else:
            qe_params = params["query_encoder"]
            if cfg.freeze_query_encoder:
                qe_params = jax.lax.stop_gradient(qe_params)
            q_BxD = question_vectors(
                qe_params, batch["question_input_ids"], batch["question_attention_mask"], encoder=self.encoder,
                dropout_key=keys[0], compute_dtype=self.compute_dtype, remat=cfg.remat,
            )  # fmt: skip
            doc_scores_BxK = doc_scores_from_embeddings(q_BxD, batch["doc_embeddings"])
        decoder_input_ids, _, _ = self._decoder_inputs(batch["labels"])
        logits_BxKxTxV = per_doc_logits(
            self.graphdef, {**gen_state, **self.buffers}, batch["context_input_ids"], batch["context_attention_mask"],
            decoder_input_ids, dropout_key=keys[1],
        )  # fmt: skip
        return marginal_nll(
            logits_BxKxTxV, doc_scores_BxK, batch["labels"], variant=cfg.variant,
            pad_token_id=self.gen_cfg.pad_token_id, bos_token_id=self.gen_cfg.bos_token_id, epsilon=cfg.epsilon,
            exclude_bos_score=cfg.exclude_bos_score, form=cfg.form,
        )  # fmt: skip

    def _decoder_inputs(self, labels_BxT):
        return objective.decoder_inputs_and_targets(
            labels_BxT, form=self.cfg.form, pad_token_id=self.gen_cfg.pad_token_id,
            decoder_start_token_id=self.gen_cfg.decoder_start_token_id,
        )  # fmt: skip

    def _loss_and_grads(self, params, batch, dropout_key):
        def loss_fn(params):
            losses_B = self.per_example_loss(params, batch, dropout_key)
            return jnp.sum(losses_B), losses_B.shape[0]

        (total, count), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return total, count, grads

    # -- step ----------------------------------------------------------------------------------

    def _train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        n = self.cfg.grad_accum_steps
        rng, step_key = jax.random.split(jax.random.wrap_key_data(state.rng))
        if n == 1:
            total, count, grads = self._loss_and_grads(state.params, batch, step_key)
        else:
            micro = jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)

            def accumulate(carry, inputs):
                total, grads = carry
                micro_batch, key = inputs
                t, _, g = self._loss_and_grads(state.params, micro_batch, key)
                return (total + t, jax.tree.map(jnp.add, grads, g)), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (total, grads), _ = jax.lax.scan(accumulate, (0.0, zeros), (micro, jax.random.split(step_key, n)))
            count = jax.tree.leaves(batch)[0].shape[0]
        if self.cfg.loss_reduction == "mean":
            grads = jax.tree.map(lambda g: g / count, grads)
        grad_norm = global_norm(grads)
        finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
        skip = ~finite if self.cfg.skip_nonfinite else None  # skipped: the previous parameters and optimizer state
        params, opt_state = self.update(state.params, state.opt_state, grads, skip)
        metrics = {"loss": total / count, "grad_norm": grad_norm, "nonfinite": ~finite}
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=jax.random.key_data(rng))
        return new_state, metrics

    def update(self, params, opt_state, grads, skip: jax.Array | None = None):
        """The optimizer step: new parameters and optimizer state, written over the old ones when they
        are donated (in chunks on one CPU device, see ``rag_jax.optim.chunk_size_for``)."""
        return self.tx.step(params, opt_state, grads, skip=skip, chunk_size=chunk_size_for(self.mesh.devices.flat))

    def batch_shardings(self, batch: dict) -> dict:
        return {k: sharding.batch_sharding(self.mesh, np.ndim(v)) for k, v in batch.items()}

    def train_step(self, state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        """One optimizer step (jitted; ``state`` and ``batch`` are donated: do not reuse them)."""
        batch_size = jax.tree.leaves(batch)[0].shape[0]
        if batch_size % self.cfg.grad_accum_steps:
            raise ValueError(f"batch size {batch_size} is not a multiple of grad_accum_steps {self.cfg.grad_accum_steps}")
        if self._step is None:
            state_shardings = self.state_shardings(state)
            self._step = jax.jit(
                self._train_step,
                in_shardings=(state_shardings, self.batch_shardings(batch)),
                out_shardings=(state_shardings, NamedSharding(self.mesh, P())),
                donate_argnums=(0, 1),
            )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
            return self._step(state, sharding.shard_batch(batch, self.mesh))

    def to_model(self, params: dict) -> RagModel:
        """A ``RagModel`` with the given trainable parameters (for evaluation, generation, export);
        the generator keeps the source model's float32 graph."""
        graphdef, gen_params, buffers = nnx.split(self.source_model.generator.model, nnx.Param, ...)
        nnx.replace_by_pure_dict(gen_params, params["generator"])
        generator = dataclasses.replace(self.source_model.generator, model=nnx.merge(graphdef, gen_params, buffers))
        question_encoder = dataclasses.replace(self.source_model.question_encoder, params=params["query_encoder"])
        return dataclasses.replace(self.source_model, question_encoder=question_encoder, generator=generator)

    def eval_loss(self, params, batch) -> jax.Array:
        """Per-example loss without dropout (not jitted here: wrap in ``jax.jit`` as needed)."""
        return self.per_example_loss(params, batch, None)
