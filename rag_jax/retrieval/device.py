"""Exact retrieval on the accelerators, inside the jitted training step (``corpus.retriever=device``,
TPU-KNN style): no host round trip per step.

The corpus lives on the training mesh, its rows split over every device (``DeviceCorpus``): the
document embeddings (an ``ExactIndex`` built on the mesh, float32 or bfloat16) and, row for row, each
passage's generator tokens, pre-tokenized once at start-up: ``prefix + title + title_sep + text`` as
``rag_jax.retrieval.context`` joins it, without special tokens, cut to the context length. The step
takes the question encoder's ids and the generator tokens of ``doc_sep + question``; it encodes the
questions with the current parameters (no dropout, no gradient, in the step's compute dtype: with
bfloat16 compute the ranking can differ from a float32 host search's at near-ties), takes each device's top-k over its
rows (``exact.local_topk``), gathers every device's candidates and merges them (ties to the lower row,
as ``ExactIndex.search``), reads the k winners' embeddings and tokens from the devices that hold them
(each device contributes its own rows, the rest add zeros: one ``psum`` of ``B x k`` rows), and
joins passage and question tokens into the generator's contexts (``join_contexts``): BOS, the
passage's tokens, the question part's, cut to ``max_length - 2`` tokens, EOS, padding. The result is
the ``DenseRagBatch`` the host path builds (``Retriever.retrieve``), so the loss is unchanged.

Equal to the host path: the same top-k as ``ExactIndex`` (the same code), and the same context tokens
as tokenizing the joined string, because a byte-level BPE (BART's) splits words at the space the
question part starts with. Passages whose ``title / text`` part ends in whitespace are the
exception (the host's ``"  " -> " "`` then merges that whitespace with the separator's space): one
trailing space is dropped here (exactly what the join does), other trailing whitespace is counted and
reported by ``passage_tokens`` (DPR's passages have none).

Memory per device: ``N / devices`` rows of ``D`` float32 (or bfloat16) plus ``L`` tokens (L: the context's
content length, ``max_length`` less its special tokens; uint16 for vocabularies up to 65,536 such as
BART's, else int32) and a length; for DPR's 21M passages on 8 devices in bfloat16 with L = 298: 3.8 + 1.5
GiB (``rag-jax plan --config.corpus.retriever=device`` compiles the step with them). Each process
tokenizes only the rows its devices hold (``PassageTokens``, asked by ``DeviceCorpus.of_index``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from rag_jax.retrieval.context import ContextFormat
from rag_jax.retrieval.corpus import Passage
from rag_jax.retrieval.index.exact import ExactIndex, held_rows, local_topk, merge_device_topk

log = logging.getLogger(__name__)

TOKENIZE_BATCH = 4096  # passages per tokenizer call when pre-tokenizing the corpus


# -- the context template ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ContextTemplate:
    """How the generator tokenizer frames one sequence: ``prefix_ids + content + suffix_ids`` (BART:
    ``<s>`` ... ``</s>``), padded with ``pad_id`` to ``max_length`` tokens."""

    max_length: int
    prefix_ids: tuple[int, ...]
    suffix_ids: tuple[int, ...]
    pad_id: int

    @classmethod
    def of(cls, generator_tokenizer, max_length: int) -> "ContextTemplate":
        content = generator_tokenizer("a", add_special_tokens=False)["input_ids"]
        framed = generator_tokenizer("a")["input_ids"]  # the same content with the tokenizer's special tokens
        at = next(i for i in range(len(framed)) if framed[i : i + len(content)] == content)
        return cls(max_length, tuple(framed[:at]), tuple(framed[at + len(content) :]), int(generator_tokenizer.pad_token_id))

    @property
    def content_length(self) -> int:
        """The most content tokens a context holds."""
        return self.max_length - len(self.prefix_ids) - len(self.suffix_ids)


def _passage_part(passage: Passage, fmt: ContextFormat) -> tuple[str, bool]:
    """``prefix + title + title_sep + text`` as ``context_string`` joins it (before the question part),
    and whether its tokens are exactly those the joined string gives (see the module docstring)."""
    title = passage.title.removeprefix('"').removesuffix('"')
    part = ((fmt.prefix or "") + title + fmt.title_sep + passage.text).replace("  ", " ")
    if part.endswith(" ") and not part[:-1][-1:].isspace() and fmt.doc_sep.startswith(" "):
        return part[:-1], True  # the join's "  " -> " " drops exactly this space
    return part, not part[-1:].isspace()


def question_part(question: str, fmt: ContextFormat) -> str:
    """``doc_sep + question`` as ``context_string`` ends the context."""
    return (fmt.doc_sep + question).replace("  ", " ")


def _tokens(tokenizer, strings: Sequence[str], width: int, dtype=np.int32) -> tuple[np.ndarray, np.ndarray]:
    """``(ids [n, width] (0-padded), lengths [n] int32)``: ``strings`` tokenized without special tokens,
    cut to ``width``."""
    encoded = tokenizer(list(strings), add_special_tokens=False)["input_ids"]
    ids = np.zeros((len(encoded), width), dtype)
    lengths = np.zeros(len(encoded), np.int32)
    for row, seq in enumerate(encoded):
        seq = seq[:width]
        ids[row, : len(seq)] = seq
        lengths[row] = len(seq)
    return ids, lengths


def token_dtype(vocab_size: int):
    """The narrowest storage for token ids: uint16 below 65,536 (BART's 50,265), else int32."""
    return np.uint16 if vocab_size <= 1 << 16 else np.int32


@dataclasses.dataclass
class PassageTokens:
    """The passages' context parts, pre-tokenized on demand: called with row ranges ``[(start, stop), ...]``
    (this process's rows, by ``DeviceCorpus.of_index``), returns ``(ids [n, L], lengths [n])`` for each, L
    the template's content length, ``token_dtype`` ids, under one progress bar. Passages whose tokens may
    differ from the host path's are counted and reported (a warning)."""

    store: object
    tokenizer: object
    fmt: ContextFormat
    progress: bool = True

    def __post_init__(self):
        self.width = ContextTemplate.of(self.tokenizer, self.fmt.max_length).content_length
        self.dtype = token_dtype(len(self.tokenizer))

    def __call__(self, ranges: Sequence[tuple[int, int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        out, inexact, total = [], 0, sum(stop - start for start, stop in ranges)
        with tqdm(total=total, unit=" passages", unit_scale=True, desc="tokenizing passages",
                  disable=not self.progress) as bar:  # fmt: skip
            for start, stop in ranges:
                blocks = [(np.zeros((0, self.width), self.dtype), np.zeros(0, np.int32))]
                for at in range(start, stop, TOKENIZE_BATCH):
                    parts = [_passage_part(p, self.fmt) for p in self.store.slice(at, min(at + TOKENIZE_BATCH, stop))]
                    inexact += sum(not exact for _, exact in parts)
                    blocks.append(_tokens(self.tokenizer, [part for part, _ in parts], self.width, self.dtype))
                    bar.update(len(parts))
                out.append((np.concatenate([b[0] for b in blocks]), np.concatenate([b[1] for b in blocks])))
        if inexact:
            log.warning("%d of %d passages end their title / text in whitespace other than one space: on device "
                        "their contexts may differ from the host's at the join (the reference's \"  \" -> \" \" "
                        "crosses it)", inexact, total)  # fmt: skip
        return out


def question_tokens(generator_tokenizer, questions: Sequence[str], fmt: ContextFormat) -> tuple[np.ndarray, np.ndarray]:
    """The questions' part of the context: ``(ids [B, M] int32, lengths [B] int32)``, M the content length."""
    width = ContextTemplate.of(generator_tokenizer, fmt.max_length).content_length
    return _tokens(generator_tokenizer, [question_part(q, fmt) for q in questions], width)


def join_contexts(passage_ids_BxKxL, passage_lengths_BxK, question_ids_BxM, question_lengths_B,
                  template: ContextTemplate) -> tuple[jax.Array, jax.Array]:  # fmt: skip
    """The generator's contexts ``(ids, mask) [B, K, S]`` int32: per (question, passage), the template's
    prefix, the passage's tokens then the question's, cut to the content length, the suffix, padding
    (what tokenizing the joined string with truncation gives)."""
    n_pre, n_suf = len(template.prefix_ids), len(template.suffix_ids)
    s_S = jnp.arange(template.max_length, dtype=jnp.int32)
    p_len_BxKx1 = passage_lengths_BxK[:, :, None]
    q_len_Bx1x1 = question_lengths_B[:, None, None]
    content_BxKx1 = jnp.minimum(p_len_BxKx1 + q_len_Bx1x1, template.content_length)
    j_BxKxS = jnp.broadcast_to(s_S - n_pre, (*passage_ids_BxKxL.shape[:2], template.max_length))
    from_passage = jnp.take_along_axis(passage_ids_BxKxL.astype(jnp.int32), jnp.clip(j_BxKxS, 0, passage_ids_BxKxL.shape[2] - 1), axis=2)
    q_at_BxKxS = jnp.clip(j_BxKxS - p_len_BxKx1, 0, question_ids_BxM.shape[1] - 1)
    from_question = jnp.take_along_axis(jnp.broadcast_to(question_ids_BxM[:, None, :], (*q_at_BxKxS.shape[:2],
                                                                                          question_ids_BxM.shape[1])),
                                        q_at_BxKxS, axis=2)  # fmt: skip
    prefix = jnp.asarray(template.prefix_ids or (0,), jnp.int32)[jnp.clip(s_S, 0, max(n_pre - 1, 0))]
    suffix = jnp.asarray(template.suffix_ids or (0,), jnp.int32)[jnp.clip(j_BxKxS - content_BxKx1, 0, max(n_suf - 1, 0))]
    ids = jnp.where(j_BxKxS < p_len_BxKx1, from_passage, from_question)
    ids = jnp.where(j_BxKxS < content_BxKx1, ids, suffix)
    ids = jnp.where(s_S < n_pre, prefix, ids)
    mask = j_BxKxS < content_BxKx1 + n_suf
    return jnp.where(mask, ids, template.pad_id).astype(jnp.int32), mask.astype(jnp.int32)


# -- the corpus on the mesh ------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CorpusArrays:
    """The device-resident corpus, rows split over every device of the mesh (padding rows past N)."""

    embeddings_NxD: jax.Array
    passage_ids_NxL: jax.Array
    passage_lengths_N: jax.Array


@dataclasses.dataclass(frozen=True)
class CorpusLayout:
    """What a step needs to know about the corpus to trace its retrieval (hashable, static)."""

    mesh: Mesh
    size: int
    chunk: int
    template: ContextTemplate

    @property
    def axes(self) -> tuple[str, ...]:
        return tuple(self.mesh.axis_names)

    def shardings(self) -> CorpusArrays:
        rows = NamedSharding(self.mesh, P(self.axes))
        return CorpusArrays(NamedSharding(self.mesh, P(self.axes, None)), NamedSharding(self.mesh, P(self.axes, None)),
                            rows)  # fmt: skip


@dataclasses.dataclass(frozen=True, eq=False)
class DeviceCorpus:
    """The corpus for retrieval inside the step: its layout and arrays, and the ``ExactIndex`` over the
    same embeddings (host-side searches: evaluation, decoding)."""

    layout: CorpusLayout
    arrays: CorpusArrays
    index: ExactIndex

    @classmethod
    def build(cls, embeddings, passage_rows, mesh: Mesh, template: ContextTemplate, *,
              dtype: str = "float32") -> "DeviceCorpus":  # fmt: skip
        """Place ``embeddings [N, D]`` (any row-sliceable array) and the passages' tokens (``passage_rows``:
        ``[(start, stop), ...] -> [(ids, lengths), ...]``, e.g. ``PassageTokens``) on ``mesh``."""
        return cls.of_index(ExactIndex.build(embeddings, dtype=dtype, mesh=mesh), passage_rows, template)

    @classmethod
    def of_index(cls, index: ExactIndex, passage_rows, template: ContextTemplate) -> "DeviceCorpus":
        """The corpus over ``index``'s embeddings (an ``ExactIndex`` built on a mesh) and the passages'
        tokens, asked of ``passage_rows`` for this process's row ranges only (one call, each range once)."""
        padded_rows, n = index.emb_NxD.shape[0], index.size
        layout = CorpusLayout(index.mesh, n, index.chunk, template)
        shardings = layout.shardings()
        ranges = sorted({shard.index[0].indices(padded_rows)[:2] for shard in index.emb_NxD.addressable_shards})
        blocks = {}
        for (start, stop), (ids, lengths) in zip(ranges, passage_rows([(min(a, n), min(b, n)) for a, b in ranges])):
            pad = stop - start - len(ids)
            blocks[start, stop] = (np.pad(ids, ((0, pad), (0, 0))), np.pad(lengths, (0, pad)))

        def placed(part: int, sharding: NamedSharding) -> jax.Array:
            example = next(iter(blocks.values()))[part]
            return jax.make_array_from_callback((padded_rows, *example.shape[1:]), sharding,
                                                lambda at: blocks[at[0].indices(padded_rows)[:2]][part])  # fmt: skip

        arrays = CorpusArrays(index.emb_NxD, placed(0, shardings.passage_ids_NxL), placed(1, shardings.passage_lengths_N))
        return cls(layout, arrays, index)


def abstract_arrays(layout: CorpusLayout, rows_per_device: int, dim: int, vocab_size: int,
                    dtype=jnp.bfloat16) -> CorpusArrays:  # fmt: skip
    """``CorpusArrays`` as ``jax.ShapeDtypeStruct``s (ahead-of-time compilation without the corpus): passages
    as long as the template's content, in ``token_dtype(vocab_size)``."""
    rows = rows_per_device * layout.mesh.size
    s = layout.shardings()
    width = layout.template.content_length
    return CorpusArrays(jax.ShapeDtypeStruct((rows, dim), dtype, sharding=s.embeddings_NxD),
                        jax.ShapeDtypeStruct((rows, width), token_dtype(vocab_size), sharding=s.passage_ids_NxL),
                        jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=s.passage_lengths_N))  # fmt: skip


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DeviceRetrieved:
    """The k passages of each question: rows, embeddings (float32) and tokens."""

    rows_BxK: jax.Array
    embeddings_BxKxD: jax.Array
    passage_ids_BxKxL: jax.Array
    passage_lengths_BxK: jax.Array


def _retrieve_local(q_QxD, emb_RxD, ids_RxL, lengths_R, *, k: int, chunk: int, size: int, axes: tuple[str, ...]):
    """One device's share of ``retrieve``: its top-k, the global merge, its rows of the winners."""
    s_1xQxK, i_1xQxK = local_topk(q_QxD, emb_RxD, k=k, chunk=chunk, n_valid=size, approx_recall=None, axes=axes)
    _, rows_QxK = merge_device_topk(lax.all_gather(s_1xQxK[0], axes), lax.all_gather(i_1xQxK[0], axes), k)
    rows_M = rows_QxK.reshape(-1)
    row_ids_R = lax.axis_index(axes) * emb_RxD.shape[0] + jnp.arange(emb_RxD.shape[0], dtype=rows_M.dtype)

    def read(x, dtype=None):  # the winners' rows of x, [Q, k, ...], replicated
        return held_rows(x, rows_M, axes, dtype).reshape(*rows_QxK.shape, *x.shape[1:])

    # the rows themselves read where they are held: the same values, replicated (all_gather's are per device)
    return read(row_ids_R), read(emb_RxD, jnp.float32), read(ids_RxL), read(lengths_R)


def retrieve(q_BxD: jax.Array, arrays: CorpusArrays, layout: CorpusLayout, k: int) -> DeviceRetrieved:
    """The exact top-``k`` rows by ``q . d`` of every question (inside a jitted function, on
    ``layout.mesh``), with their embeddings and passage tokens, replicated."""
    local = functools.partial(_retrieve_local, k=k, chunk=layout.chunk, size=layout.size, axes=layout.axes)
    rows = P(layout.axes)
    per_device = jax.shard_map(local, mesh=layout.mesh, in_specs=(P(), P(layout.axes, None), P(layout.axes, None), rows),
                               out_specs=(P(), P(), P(), P()))  # fmt: skip
    return DeviceRetrieved(*per_device(lax.stop_gradient(q_BxD), arrays.embeddings_NxD, arrays.passage_ids_NxL,
                                       arrays.passage_lengths_N))  # fmt: skip


def distinct_count(rows_BxK: jax.Array) -> jax.Array:
    """The number of distinct rows in ``rows_BxK`` (int32; a retrieval-collapse diagnostic)."""
    flat = jnp.sort(rows_BxK.reshape(-1))
    return 1 + jnp.sum(flat[1:] != flat[:-1]).astype(jnp.int32)
