"""The programs a run compiles, built from a run config and a target with abstract shapes only (no
weights loaded, no data read): each is a jitted function and its arguments as ``jax.ShapeDtypeStruct``s
with their shardings over the target's devices, ready for ``.trace(*args).lower().compile()``.

* ``train_step``: ``Trainer.jitted_step`` with the config's mesh, remat, accumulation, compute dtype,
  batch, k and lengths (a dense-retrieval batch, or closed-book; with ``corpus.retriever=device``, the
  questions alone and a ``corpus_size`` x D corpus with its passages' tokens split over all devices,
  retrieved from inside the step: ``rag_jax.retrieval.device``);
* ``decode_token`` / ``decode_sequence``: RAG-Token search and RAG-Sequence thorough decoding at the
  config's test-time k, beams and length over ``eval.batch_size`` questions, the batch split over all
  devices and the (float32, as evaluation loads them) generator weights replicated;
* ``exact_search``: ``ExactIndex`` search of ``query_batch`` questions over a ``corpus_size`` x D
  bfloat16 index sharded over all devices.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from rag_jax.config import dense_rag, device_retrieval, resolve
from rag_jax.errors import ConfigError
from rag_jax.models import attention, bert
from rag_jax.models.bart import Bart
from rag_jax.models.encoder import Encoder
from rag_jax.models.generator import Generator
from rag_jax.planning import flops
from rag_jax.planning.architectures import model_architectures
from rag_jax.planning.targets import Target
from rag_jax.rag.batches import DenseRagBatch, QuestionsRagBatch, Seq2SeqBatch
from rag_jax.rag.decoding import rag_sequence_search, rag_token_search
from rag_jax.rag.model import RagModel
from rag_jax.retrieval import device
from rag_jax.retrieval.index.exact import abstract_search, corpus_layout
from rag_jax.training import sharding
from rag_jax.training.step import Trainer

PROGRAMS = ("train_step", "decode_token", "decode_sequence", "exact_search")
PAPER_CORPUS_SIZE = 21_015_300  # DPR's Wikipedia passages (psgs_w100.tsv)


@dataclasses.dataclass
class Program:
    """A jitted function, its abstract arguments, its analytic model FLOPs (whole program, all
    devices), the bound on ``while`` loop trips used when counting its traced FLOPs and collectives,
    and the bytes of weights each device reads at every trip (decoding: the decoder and the LM head)."""

    name: str
    function: Callable
    args: tuple
    model_flops: float
    while_trips: int = 1
    bytes_per_trip: int = 0
    settings: dict = dataclasses.field(default_factory=dict)


def abstract_rag_model(config: ml_collections.ConfigDict) -> RagModel:
    """A ``RagModel`` of the config's architectures whose parameters are ``jax.ShapeDtypeStruct``s
    (the generator's buffers are concrete zeros: they are constants of the programs)."""
    encoder_cfg, generator_cfg = model_architectures(config)
    encoder_params = jax.eval_shape(lambda: bert.init_params(encoder_cfg, jax.random.key(0)))
    encoder = Encoder(encoder_params, encoder_cfg, pooling="cls", kind="dpr_question")
    bart = nnx.eval_shape(lambda: Bart(generator_cfg, rngs=nnx.Rngs(0)))
    graphdef, params, buffers = nnx.split(bart, nnx.Param, ...)
    buffers = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), buffers)
    generator = Generator(nnx.merge(graphdef, params, buffers), generator_cfg)
    variant = "token" if config.rag.variant == "closed_book" else config.rag.variant
    return RagModel(encoder, generator, resolve(config).rag, variant)


def _struct(shape, dtype, sharding_) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding_)


def _device_corpus(config, mesh, model: RagModel, corpus_size: int) -> tuple[device.CorpusLayout, device.CorpusArrays]:
    """The layout and abstract arrays of a ``corpus_size``-passage corpus on ``mesh`` (BART's special tokens)."""
    gen = model.generator.config
    template = device.ContextTemplate(config.rag.max_combined_length, (gen.bos_token_id,), (gen.eos_token_id,),
                                      gen.pad_token_id)  # fmt: skip
    chunk, rows_per_device = corpus_layout(corpus_size, mesh.size, 32768)
    layout = device.CorpusLayout(mesh, corpus_size, chunk, template)
    dtype = jnp.bfloat16 if config.corpus.device_dtype == "bfloat16" else jnp.float32
    return layout, device.abstract_arrays(layout, rows_per_device, model.question_encoder.dim, gen.vocab_size,
                                          dtype)  # fmt: skip


def train_step(config: ml_collections.ConfigDict, target: Target, model: RagModel, *,
               corpus_size: int = PAPER_CORPUS_SIZE, **_) -> Program:  # fmt: skip
    if config.rag.variant != "closed_book" and not dense_rag(config):
        raise ConfigError("planning covers dense retrieval (host or device) and closed-book runs; set it to dense",
                          what="config.corpus.retriever")  # fmt: skip
    settings = resolve(config)
    mesh = sharding.make_mesh(settings.mesh, devices=target.devices)
    on_device = device_retrieval(config)
    layout, corpus = _device_corpus(config, mesh, model, corpus_size) if on_device else (None, None)
    trainer = Trainer(model, settings.train, mesh, corpus_layout=layout)
    state = trainer.abstract_state()
    d, b, k = config.data, config.train.batch_size, config.rag.k
    q, s, t = d.max_question_length, config.rag.max_combined_length, d.max_target_length
    closed_book = config.rag.variant == "closed_book"
    if closed_book:
        shapes = Seq2SeqBatch((b, d.max_source_length), (b, d.max_source_length), (b, t))
        batch_type = Seq2SeqBatch
    elif on_device:
        shapes = QuestionsRagBatch((b, q), (b, q), (b, layout.template.content_length), (b,), (b, t))
        batch_type = QuestionsRagBatch
    else:
        dim = model.question_encoder.dim
        shapes = DenseRagBatch((b, q), (b, q), (b, k, dim), (b, k, s), (b, k, s), (b, t))
        batch_type = DenseRagBatch
    dtypes = {"doc_embeddings_BxKxD": jnp.float32}
    batch = batch_type(**{
        name: _struct(shape, dtypes.get(name, jnp.int32), sharding.batch_sharding(mesh, len(shape)))
        for name, shape in dataclasses.asdict(shapes).items()
    })  # fmt: skip
    bert_cfg, bart_cfg = model.question_encoder.config, model.generator.config
    if closed_book:  # the question alone into the generator: one "document", no retrieval scores
        model_flops = flops.rag_train_step(bert_cfg, bart_cfg, batch=b, k=1, question=q, source=d.max_source_length,
                                           target=t, dense=False)  # fmt: skip
    else:
        model_flops = flops.rag_train_step(bert_cfg, bart_cfg, batch=b, k=k, question=q, source=s, target=t)
    settings_ = dict(batch=b, k=k, remat=settings.train.remat, grad_accum_steps=settings.train.grad_accum_steps,
                     compute_dtype=settings.train.compute_dtype)  # fmt: skip
    args = (state, batch)
    if on_device:  # the search's products (the retrieval's question-encoder pass is counted by the trace only)
        model_flops += 2.0 * b * corpus_size * model.question_encoder.dim
        args += (corpus,)
        settings_.update(retriever="device", corpus_size=corpus_size, corpus_dtype=config.corpus.device_dtype)
    mesh_shape = {axis: int(n) for axis, n in mesh.shape.items()}
    return Program("train_step", trainer.jitted_step(state, batch), args, model_flops,
                   settings=dict(mesh=mesh_shape, **settings_))


def _decode_inputs(config, target: Target, model: RagModel):
    """Replicated generator state and batch-sharded contexts / doc scores for decoding."""
    mesh = jax.make_mesh((target.num_devices,), ("data",), axis_types=(AxisType.Auto,), devices=target.devices)
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    graphdef, state = nnx.split(model.generator.model)
    state = jax.tree.map(lambda x: _struct(np.shape(x), x.dtype, replicated), state)
    b, k, s = config.eval.batch_size, config.eval.k, config.rag.max_combined_length
    ids = _struct((b, k, s), jnp.int32, split)
    scores = _struct((b, k), jnp.float32, split)
    return graphdef, state, ids, scores


def decode(config: ml_collections.ConfigDict, target: Target, model: RagModel, variant: str) -> Program:
    e = config.eval
    options = model.generation_options(variant, None, num_beams=e.num_beams, max_length=e.max_length)
    graphdef, state, ids, scores = _decode_inputs(config, target, model)
    b, k, s = ids.shape
    gen = model.generator.config

    def search(st, i, m, sc):
        with attention.traced_for(target.devices[0].platform):  # attention takes the target's path
            if variant == "token":
                return rag_token_search(graphdef, st, i, m, sc, options)
            return rag_sequence_search(graphdef, st, i, m, sc, options, "thorough", pad_token_id=gen.pad_token_id,
                                       bos_token_id=model.bos_token_id, epsilon=model.config.label_smoothing,
                                       do_deduplication=model.config.do_deduplication)  # fmt: skip

    function = jax.jit(search)
    model_flops = flops.rag_decode(model.generator.config, batch=b, k=k, source=s, length=options.max_length,
                                   beams=options.num_beams, rescore=variant == "sequence")  # fmt: skip
    per_token = nnx.state(model.generator.model.decoder), nnx.state(model.generator.model.shared)
    weight_bytes = sum(np.prod(np.shape(x)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(per_token))
    return Program(f"decode_{variant}", function, (state, ids, ids, scores), model_flops,
                   while_trips=options.max_length, bytes_per_trip=int(weight_bytes),
                   settings=dict(batch=b, k=k, num_beams=options.num_beams, max_length=options.max_length))  # fmt: skip


def exact_search(config: ml_collections.ConfigDict, target: Target, model: RagModel, *, corpus_size: int,
                 query_batch: int) -> Program:
    dim, k = model.question_encoder.dim, config.eval.k
    function, queries, corpus = abstract_search(corpus_size, dim, k=k, query_batch=query_batch, dtype="bfloat16",
                                                devices=list(target.devices))  # fmt: skip
    return Program("exact_search", function, (queries, corpus), 2.0 * query_batch * corpus_size * dim,
                   settings=dict(corpus_size=corpus_size, dim=dim, k=k, query_batch=query_batch, dtype="bfloat16"))


def build(name: str, config, target: Target, model: RagModel, **options: Any) -> Program:
    if name == "train_step":
        return train_step(config, target, model, **options)
    if name in ("decode_token", "decode_sequence"):
        return decode(config, target, model, name.removeprefix("decode_"))
    if name == "exact_search":
        return exact_search(config, target, model, **options)
    raise ValueError(f"unknown program {name!r}; expected one of {PROGRAMS}")
